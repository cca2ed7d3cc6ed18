"""Check a training log against the speedrun record rules in records/README.md; Python and git only, no torch.

    python records/check.py logs/RUN.txt --rev=GIT_REV

One verdict line (PASS, or FAIL with every reason, and the train time); exit 0 on PASS, 1 on any violation, 2 when
the log cannot be read. Every number is checked against the config and the other lines, so an edited line
contradicts another. It knows train.py's log format, model.py's parameter count and, with --rev, that commit's code.
"""

import argparse, ast, json, math, re, subprocess, sys
from dataclasses import dataclass, field
from pathlib import Path

# The rules of records/README.md; train.py's record preset meets them (tests/test_records.py).
TARGET = 3.44  # val NELBO, nats/token
VAL_NOISE_MARGIN = 0.01  # a log must show TARGET less this: the val estimate's noise (records/README.md)
VAL_TOKENS, BLOCK_SIZE, MAX_PARAMS = 10_485_760, 16, 162_000_000
SHARD_HEADER_BYTES = 1024  # data/shards.py: 256 int32 values, then 2 bytes per token
FILE_START = re.compile(r"==== file: (.+) ====")
HEADER_LINES = {
    "config": re.compile(r"config:(?P<json>\{.*\})"),
    "runtime": re.compile(r"runtime:entry=(?P<entry>\S+) outside_modules=(?P<outside>\S+) clock=(?P<clock>\S+)"),
    "train_data": re.compile(r"train_data:pattern=(?P<pattern>.+) shards=(?P<shards>\d+) tokens=(?P<tokens>\d+)"),
    "val_data": re.compile(r"val_data:path=(?P<path>.+) tokens=(?P<tokens>\d+)"),
    "params": re.compile(r"params:(?P<count>\d+)"),
    "train_tokens": re.compile(r"train_tokens:(?P<count>\d+)"),
    "resumed": re.compile(r"resumed:(?P<path>.+) step:(?P<step>\d+)"),
}
SHARD_LINE = re.compile(r"shard:(?P<split>train|val) path=(?P<path>.+) tokens=(?P<tokens>\d+) bytes=(?P<bytes>\d+) "
                        r"sha256=(?P<sha256>[0-9a-f]{64})")
STEP_LINE = re.compile(r"step:(?P<step>\d+)/(?P<total>\d+) ")
TRAIN_LINE = re.compile(r"step:(?P<step>\d+)/(?P<total>\d+) train_loss:(?P<loss>\S+) train_time:(?P<ms>\d+)ms "
                        r"step_avg:(?P<avg>[0-9.]+)ms")
VAL_LINE = re.compile(r"step:(?P<step>\d+)/(?P<total>\d+) val_loss:(?P<loss>\S+) ppl:(?P<ppl>\S+) "
                      r"train_time:(?P<ms>\d+)ms tokens:(?P<tokens>\d+)")
CONFIG_KEYS = ("block_size", "estimator", "t_lo", "t_hi", "steps", "batch_size", "seq_len", "val_tokens",
               "val_every", "resume", "vocab_size", "n_layer", "n_head", "head_dim", "model_dim", "mlp_hidden")
# train.py's estimators whose expected loss is the records' objective (noise.ESTIMATORS), on its interval
RECORD_ESTIMATORS, RECORD_INTERVAL = ("iid", "stratified", "proposal"), (0.3, 0.8)

class MalformedLog(ValueError):
    """The log cannot be read as a training log, so no verdict is possible."""

@dataclass
class ParsedLog:
    files: dict[str, str]  # embedded path -> text between its markers
    header: dict[str, re.Match]  # HEADER_LINES key -> its (single) match
    events: list[tuple[str, re.Match]] = field(default_factory=list)  # (kind, match) in log order
    shards: list[re.Match] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[re.Match]:
        return [match for event, match in self.events if event == kind]

    val_lines = property(lambda self: self.of_kind("val"))

def parse_log(text: str) -> ParsedLog:
    lines, log, totals, i = text.split("\n"), ParsedLog({}, {}), set(), 0
    while i < len(lines):
        line = lines[i]
        if start := FILE_START.fullmatch(line):
            name = start.group(1)
            try:
                end = lines.index(f"==== end file: {name} ====", i + 1)
            except ValueError:
                raise MalformedLog(f"embedded file {name} has no end marker; the log is truncated") from None
            if name in log.files:
                raise MalformedLog(f"the log embeds {name} twice; give one run per log")
            body = lines[i + 1:end]
            log.files[name] = "\n".join(body) + "\n" if body else ""
            i = end + 1
            continue
        for key, pattern in HEADER_LINES.items():
            if match := pattern.fullmatch(line):
                if key in log.header:
                    raise MalformedLog(f"the log holds more than one '{key}:' line; give one run per log")
                log.header[key] = match
                log.events.append((key, match))
        if shard := SHARD_LINE.fullmatch(line):
            log.shards.append(shard)
        if step := STEP_LINE.match(line):
            totals.add(int(step["total"]))
            if not (match := VAL_LINE.fullmatch(line) or TRAIN_LINE.fullmatch(line)):
                raise MalformedLog(f"cannot parse the step line {line!r}")
            log.events.append(("val" if match.re is VAL_LINE else "step", match))
        i += 1
    if missing := [key for key in ("config", "train_data", "val_data", "params") if key not in log.header]:
        raise MalformedLog(f"the log has no '{missing[0]}:' line")
    if len(totals) > 1:
        raise MalformedLog(f"step lines disagree on the number of steps ({sorted(totals)}); one run per log")
    return log

def expected_params(config: dict) -> int:
    """model.BD3LM's parameters (tests/test_records.py compares): embeddings with [MASK], per layer q, k, v, out and
    the MLP, a value-mix scalar per layer but the first, a skip weight per pair of layers, the head padded to 128."""
    dim, layers, inner = config["model_dim"], config["n_layer"], config["n_head"] * config["head_dim"]
    padded_vocab = math.ceil((config["vocab_size"] + 1) / 128) * 128
    per_layer = 4 * dim * inner + 2 * dim * config["mlp_hidden"]
    return (config["vocab_size"] + 1) * dim + layers * per_layer + (layers - 1) + layers // 2 + padded_vocab * dim

def broken(*rules: tuple[bool, str]) -> list[str]:
    """The message of each (is broken, message) rule that is broken."""
    return [message for is_broken, message in rules if is_broken]

def check_rules(log: ParsedLog, args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Returns (violations, summary fields for the verdict line)."""
    try:
        config = json.loads(log.header["config"]["json"])
    except json.JSONDecodeError as error:
        raise MalformedLog(f"the config line is not valid JSON ({error})") from None
    if missing := [key for key in CONFIG_KEYS if key not in config]:
        return [f"the config lacks {', '.join(missing)}: not a log of this train.py"], {"train_time": "unknown"}
    params, expected, resumed = int(log.header["params"]["count"]), expected_params(config), log.header.get("resumed")
    summary = {"params": f"{params:,}"}
    problems = broken(
        (config["block_size"] != BLOCK_SIZE, f"block_size {config['block_size']} != {BLOCK_SIZE}"),
        (config["estimator"] not in RECORD_ESTIMATORS, f"estimator {config['estimator']}: its expected loss is not "
         f"the records' objective (allowed: {', '.join(RECORD_ESTIMATORS)})"),
        ((config["t_lo"], config["t_hi"]) != RECORD_INTERVAL, f"t_lo {config['t_lo']} t_hi {config['t_hi']}: the "
         f"records' objective clips t to {RECORD_INTERVAL[0]}-{RECORD_INTERVAL[1]}"),
        (params > args.max_params, f"params {params:,} > {args.max_params:,}"),
        (params != expected, f"params {params:,} is not the {expected:,} of the config's model"))
    problems += check_runtime(log) + check_data(log, config, args, summary)
    if resumed:
        problems.append(f"the run resumed at step {resumed['step']}: its train_time misses the steps before, so a "
                        "record needs one uninterrupted run")
    elif config["resume"]:
        problems.append(f"config resume={config['resume']}: the run continued a checkpoint, so its train_time misses "
                        "the steps before (and its resumed: line is gone)")
    else:
        problems += check_steps(log, config)
    return problems + check_final(log, config, args, summary), summary

def check_runtime(log: ParsedLog) -> list[str]:
    """train.py itself ran, with no code from outside the repo and the Python installation, and the genuine clock."""
    if "runtime" not in log.header:
        return ["no runtime: line: the log does not say what ran train.py"]
    runtime = log.header["runtime"]
    return broken(
        (runtime["entry"] != "train.py", f"the process started in {runtime['entry']}, not train.py: code outside the "
         "log ran"),
        (runtime["outside"] != "none", f"modules from outside the repo and the Python installation ran: "
         f"{runtime['outside']}"),
        (runtime["clock"] != "genuine", "time.perf_counter was replaced: train_time is not wall-clock"))

def check_data(log: ParsedLog, config: dict, args: argparse.Namespace, summary: dict) -> list[str]:
    train_data, val_data = log.header["train_data"], log.header["val_data"]
    problems = broken(
        (not re.fullmatch(args.train_files, Path(train_data["pattern"]).name),
         f"train data {train_data['pattern']} is not FineWeb-Edu train shards ({args.train_files})"),
        (not re.fullmatch(args.val_file, Path(val_data["path"]).name),
         f"val data {val_data['path']} is not the FineWeb-Edu val shard ({args.val_file})"),
        (int(val_data["tokens"]) != config["val_tokens"],
         f"val_data tokens={val_data['tokens']} but the config's val_tokens is {config['val_tokens']}"))
    train, val = ([s for s in log.shards if s["split"] == split] for split in ("train", "val"))
    if len(train) != int(train_data["shards"]) or len(val) != 1:
        return problems + [f"{len(train)} train and {len(val)} val shard: lines for {train_data['shards']} train "
                           "shards and 1 val shard: the log does not identify its data"]
    problems += [f"shard {s['path']}: {s['tokens']} tokens do not fill {s['bytes']} bytes"
                 for s in log.shards if int(s["bytes"]) != SHARD_HEADER_BYTES + 2 * int(s["tokens"])]
    train_tokens, listed, val_hash = sum(int(s["tokens"]) for s in train), int(train_data["tokens"]), val[0]["sha256"]
    if train_tokens != listed:
        problems.append(f"the train shards hold {train_tokens:,} tokens, not the {listed:,} of the train_data line")
    seen = {}
    for shard in train:
        if shard["sha256"] == val_hash:
            problems.append(f"train shard {shard['path']} is the val shard (same sha256)")
        elif shard["sha256"] in seen:
            problems.append(f"train shard {shard['path']} repeats {seen[shard['sha256']]} (same sha256)")
        seen.setdefault(shard["sha256"], shard["path"])
    summary["val_shard"] = f"sha256:{val_hash[:16]}" + ("" if args.val_sha256 else "(unverified)")
    return problems + broken(
        (args.val_shard_tokens and int(val[0]["tokens"]) != args.val_shard_tokens,
         f"the val shard holds {int(val[0]['tokens']):,} tokens, not FineWeb-Edu's {args.val_shard_tokens:,}"),
        (args.val_sha256 and val_hash != args.val_sha256,
         f"the val shard's sha256 {val_hash} is not {args.val_sha256}"))

def check_steps(log: ParsedLog, config: dict) -> list[str]:
    """Step lines 1..steps in order, times that never fall and agree with their averages, validations where due."""
    steps, problems, train_lines = config["steps"], [], log.of_kind("step")
    numbers = [int(m["step"]) for m in train_lines]
    if not train_lines:
        problems.append("the log has no step lines")
    elif numbers != list(range(1, steps + 1)):
        gap = next((i + 1 for i, n in enumerate(numbers) if n != i + 1), len(numbers) + 1)
        problems.append(f"the step lines are not 1..{steps} in order ({len(numbers)} lines, the first wrong or missing "
                        f"is step {gap})")
    timed = [(kind, m) for kind, m in log.events if kind in ("step", "val")]
    if {int(m["total"]) for _, m in timed} - {steps}:
        problems.append(f"the step lines count to {timed[0][1]['total']} but the config has steps {steps}")
    for m in train_lines:
        step, ms, avg = int(m["step"]), int(m["ms"]), float(m["avg"])
        if abs(avg * step - ms) > 0.005 * step + 1:
            problems.append(f"step {step}: step_avg {avg}ms x {step} steps is not its train_time {ms}ms")
            break
    for (_, before), (kind, m) in zip(timed, timed[1:]):
        if int(m["ms"]) < int(before["ms"]):
            problems.append(f"train_time falls from {before['ms']}ms to {m['ms']}ms at {m[0].split()[0]} "
                            f"{'val' if kind == 'val' else 'train'} line")
            break
    val_steps, every = [int(m["step"]) for m in log.val_lines], config["val_every"]
    expected = sorted({0, steps} | (set(range(every, steps, every)) if every else set()))
    if repeated := sorted({s for s in val_steps if val_steps.count(s) > 1}):
        problems.append(f"more than one val line at step {', '.join(map(str, repeated))}")
    elif val_steps != expected:
        problems.append(f"val lines at steps {val_steps}, where the config (val_every {every}) puts them at {expected}")
    kinds = [kind for kind, _ in log.events]
    if "train_tokens" in kinds and "val" in kinds[kinds.index("train_tokens"):]:
        problems.append("a val line follows the train_tokens line that closes the run")
    return problems

def check_final(log: ParsedLog, config: dict, args: argparse.Namespace, summary: dict) -> list[str]:
    """The final val line finite, agreeing with its ppl and the last step line, on the right tokens; the train
    tokens consumed within what the steps needed and the shards hold."""
    problems, available = [], int(log.header["train_data"]["tokens"])
    if "train_tokens" not in log.header:
        problems.append("no train_tokens line: the run did not finish")
    else:
        consumed = int(log.header["train_tokens"]["count"])
        needed = config["steps"] * config["batch_size"] * config["seq_len"]
        summary["train_tokens"] = f"{consumed:,}"
        problems += broken(
            (consumed > available, f"train_tokens {consumed:,} > {available:,} in the train shards: data repeated"),
            (consumed < needed, f"train_tokens {consumed:,} < the {needed:,} that steps x batch_size x seq_len "
             "consume"))
    for m in log.val_lines:
        problems += check_val_line(m, config)
    if not log.val_lines:
        summary["train_time"] = "unknown"
        return problems + ["no val_loss line: the run did not finish"]
    final, train_lines = log.val_lines[-1], log.of_kind("step")
    step, total, loss = int(final["step"]), int(final["total"]), float(final["loss"])
    last_ms = int(train_lines[-1]["ms"]) if train_lines else 0
    summary.update(val_loss=final["loss"], train_time=f"{int(final['ms']) / 60000:.2f}min", step=f"{step}/{total}")
    return problems + broken(
        (step != total, f"the last val_loss is at step {step}/{total}, not the final step: the run did not finish"),
        (int(final["ms"]) < last_ms, f"the final train_time {final['ms']}ms is less than the {last_ms}ms of the last "
         "step line"),
        (math.isfinite(loss) and not loss <= args.target, f"val_loss {final['loss']} is not <= target {args.target}"),
        (int(final["tokens"]) != args.val_tokens,
         f"val measured on {int(final['tokens']):,} tokens, not {args.val_tokens:,}"))

def check_val_line(m: re.Match, config: dict) -> list[str]:
    try:
        loss, ppl = float(m["loss"]), float(m["ppl"])
    except ValueError:
        raise MalformedLog(f"val_loss {m['loss']!r} or ppl {m['ppl']!r} at step {m['step']} is not a number") from None
    valid = math.isfinite(loss) and loss >= 0
    exact = math.exp(min(loss, 700)) if valid else 0.0
    return broken(
        (not valid, f"val_loss {m['loss']} at step {m['step']} is not a finite, non-negative NELBO"),
        # train.py prints exp(loss) to 2 decimals from the loss before its rounding to 4
        (valid and abs(ppl - exact) > exact * 6e-5 + 0.006,
         f"val_loss {m['loss']} and ppl {m['ppl']} disagree at step {m['step']} (exp gives {exact:.2f})"),
        (int(m["tokens"]) != config["val_tokens"], f"the val line at step {m['step']} measured {m['tokens']} tokens, "
         f"the config's val_tokens {config['val_tokens']}"))

# -----------------------------------------------------------------------------
# The code: every repository module train.py imports is embedded, and equals the commit

def imported_repo_files(sources: dict[str, str], repo_files: set[str], entry: str = "train.py") -> set[str]:
    """The files of repo_files that running `entry` imports, from the sources' import statements."""
    needed, todo = set(), [entry]
    while todo:
        path = todo.pop()
        if path in needed or path not in repo_files:
            continue
        needed.add(path)
        try:  # a file missing from the log, or that does not parse, is reported by check_code
            tree = ast.parse(sources[path])
        except (KeyError, SyntaxError):
            continue
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for parts in (name.split(".") for name in names):
                stems = ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
                todo += [f"{stem}{end}" for stem in stems for end in (".py", "/__init__.py")]
    return needed

def check_code(files: dict[str, str], repo: Path, rev: str) -> list[str]:
    """Each embedded file equals `git show REV:path` byte for byte; every repo module train.py imports is embedded."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True)

    if git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").returncode != 0:
        raise MalformedLog(f"{rev!r} is not a commit in the git repo at {repo}")
    if not files:
        return [f"the log embeds no source files to compare with {rev}"]
    listed = git("ls-tree", "-r", "--name-only", rev).stdout.decode().split("\n")
    problems = [f"{path} is imported by the run but not embedded in the log"
                for path in sorted(imported_repo_files(files, {p for p in listed if p.endswith(".py")}) - set(files))]
    for path, body in files.items():
        shown = git("show", f"{rev}:{path}")
        if shown.returncode != 0:
            problems.append(f"{path} is not in {rev}")
        # The writer may end the last source line with its own newline before the end marker.
        elif body.encode() not in (shown.stdout, shown.stdout + b"\n"):
            problems.append(f"{path} differs from {rev}")
    return problems

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a training log against records/README.md.")
    parser.add_argument("log", type=Path, help="the training log (logs/<run_id>.txt)")
    parser.add_argument("--target", type=float, default=round(TARGET - VAL_NOISE_MARGIN, 6),
                        help=f"highest final val NELBO, nats/token: {TARGET} less {VAL_NOISE_MARGIN} for the val noise")
    parser.add_argument("--val_tokens", type=int, default=VAL_TOKENS, help="val tokens the final evaluation must use")
    parser.add_argument("--max_params", type=int, default=MAX_PARAMS, help="most parameters, embeddings included")
    parser.add_argument("--train_files", default=r"finewebedu_train_[^/]*\.bin", help="regex of the train shards' "
                        "file names ('.*' for the demo)")
    parser.add_argument("--val_file", default=r"finewebedu_val_000000\.bin", help="regex of the val shard's file name")
    parser.add_argument("--val_shard_tokens", type=int, default=100_000_000, help="tokens of the val shard (0: any)")
    parser.add_argument("--val_sha256", default="", help="the val shard's sha256 (records/README.md: none known yet)")
    parser.add_argument("--rev", help="git revision whose files the code embedded in the log must equal")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent, help="git repo for --rev")
    args = parser.parse_args(argv)
    try:
        try:
            text = args.log.read_bytes().decode("utf-8")  # \r kept, for byte-exact code
        except (OSError, UnicodeDecodeError) as error:
            raise MalformedLog(f"cannot read {args.log} ({error})") from None
        log = parse_log(text)
        problems, summary = check_rules(log, args)
        code_problems = check_code(log.files, args.repo, args.rev) if args.rev else []
        problems += code_problems
        summary["code"] = f"{'mismatch' if code_problems else 'matches'}@{args.rev}" if args.rev else \
            "NOT CHECKED (no --rev)"
    except MalformedLog as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 2
    details = " ".join(f"{key}:{value}" for key, value in summary.items())
    print(f"FAIL: {'; '.join(problems)} | {details}" if problems else f"PASS {details}")
    return 1 if problems else 0

if __name__ == "__main__":
    sys.exit(main())
