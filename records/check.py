"""Check a training log against the speedrun record rules in records/README.md.

    python records/check.py logs/RUN.txt --rev=GIT_REV

It prints one verdict line (PASS, or FAIL with every reason) that includes the train time, and exits 0 when
the log meets the rules, 1 on any violation, 2 when the log cannot be read or parsed. It knows only the log
format train.py writes, not the model or torch, so a record can be checked with Python (and git, for --rev).
"""

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

FILE_START = re.compile(r"==== file: (.+) ====")
HEADER_LINES = {
    "config": re.compile(r"config:(?P<json>\{.*\})"),
    "train_data": re.compile(r"train_data:pattern=(?P<pattern>.+) shards=(?P<shards>\d+) tokens=(?P<tokens>\d+)"),
    "val_data": re.compile(r"val_data:path=(?P<path>.+) tokens=(?P<tokens>\d+)"),
    "params": re.compile(r"params:(?P<count>\d+)"),
    "train_tokens": re.compile(r"train_tokens:(?P<count>\d+)"),
    "resumed": re.compile(r"resumed:(?P<path>.+) step:(?P<step>\d+)"),
}
STEP_LINE = re.compile(r"step:(?P<step>\d+)/(?P<total>\d+) ")
VAL_LINE = re.compile(r"step:(?P<step>\d+)/(?P<total>\d+) val_loss:(?P<loss>\S+) ppl:\S+ "
                      r"train_time:(?P<ms>\d+)ms tokens:(?P<tokens>\d+)")


class MalformedLog(ValueError):
    """The log cannot be read as a training log, so no verdict is possible."""


@dataclass
class ParsedLog:
    files: dict[str, str]                  # embedded path -> text between its markers
    header: dict[str, re.Match]            # HEADER_LINES key -> its (single) match
    val_lines: list[re.Match]


def parse_log(text: str) -> ParsedLog:
    lines = text.split("\n")
    files, header, val_lines, totals = {}, {}, [], set()
    i = 0
    while i < len(lines):
        line = lines[i]
        start = FILE_START.fullmatch(line)
        if start:
            name = start.group(1)
            try:
                end = lines.index(f"==== end file: {name} ====", i + 1)
            except ValueError:
                raise MalformedLog(f"embedded file {name} has no end marker; the log is truncated") from None
            if name in files:
                raise MalformedLog(f"the log embeds {name} twice; give one run per log")
            body = lines[i + 1:end]
            files[name] = "\n".join(body) + "\n" if body else ""
            i = end + 1
            continue
        for key, pattern in HEADER_LINES.items():
            match = pattern.fullmatch(line)
            if match:
                if key in header:
                    raise MalformedLog(f"the log holds more than one '{key}:' line; give one run per log")
                header[key] = match
        step = STEP_LINE.match(line)
        if step:
            totals.add(int(step.group("total")))
            val = VAL_LINE.fullmatch(line)
            if val:
                val_lines.append(val)
            elif " val_loss:" in line:
                raise MalformedLog(f"cannot parse the val line {line!r}")
        i += 1
    for key in ("config", "train_data", "val_data", "params"):
        if key not in header:
            raise MalformedLog(f"the log has no '{key}:' line")
    if len(totals) > 1:
        raise MalformedLog(f"step lines disagree on the number of steps ({sorted(totals)}); one run per log")
    return ParsedLog(files, header, val_lines)


def check_rules(log: ParsedLog, args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Returns (violations, summary fields for the verdict line)."""
    problems, summary = [], {}
    try:
        config = json.loads(log.header["config"].group("json"))
    except json.JSONDecodeError as error:
        raise MalformedLog(f"the config line is not valid JSON ({error})") from None
    if config.get("block_size") != args.block_size:
        problems.append(f"block_size {config.get('block_size')} != {args.block_size}")
    if config.get("schedule", "linear") != "linear":  # the val noise's margin below the target is the linear one's
        problems.append(f"schedule {config['schedule']}: a record trains and validates with the linear schedule")

    params = int(log.header["params"].group("count"))
    summary["params"] = f"{params:,}"
    if params > args.max_params:
        problems.append(f"params {params:,} > {args.max_params:,}")

    train_pattern = log.header["train_data"].group("pattern")
    if not re.fullmatch(args.train_files, Path(train_pattern).name):
        problems.append(f"train data {train_pattern} is not FineWeb-Edu train shards ({args.train_files})")
    val_path = log.header["val_data"].group("path")
    if not re.fullmatch(args.val_file, Path(val_path).name):
        problems.append(f"val data {val_path} is not the FineWeb-Edu val shard ({args.val_file})")

    if "resumed" in log.header:
        problems.append(f"the run resumed at step {log.header['resumed'].group('step')}: its train_time misses the "
                        "steps before, so a record needs one uninterrupted run")
    available = int(log.header["train_data"].group("tokens"))
    if "train_tokens" not in log.header:
        problems.append("no train_tokens line: the run did not finish")
    else:
        consumed = int(log.header["train_tokens"].group("count"))
        summary["train_tokens"] = f"{consumed:,}"
        if consumed > available:
            problems.append(f"train_tokens {consumed:,} > {available:,} in the train shards: data repeated")

    if not log.val_lines:
        return problems + ["no val_loss line: the run did not finish"], {**summary, "train_time": "unknown"}
    final = log.val_lines[-1]
    step, total = int(final.group("step")), int(final.group("total"))
    loss_text, val_tokens = final.group("loss"), int(final.group("tokens"))
    summary = {"val_loss": loss_text, "train_time": f"{int(final.group('ms')) / 60000:.2f}min",
               "step": f"{step}/{total}", **summary}
    if step != total:
        problems.append(f"the last val_loss is at step {step}/{total}, not the final step: the run did not finish")
    try:
        loss = float(loss_text)
    except ValueError:
        raise MalformedLog(f"val_loss {loss_text!r} is not a number") from None
    if not loss <= args.target:
        problems.append(f"val_loss {loss_text} is not <= target {args.target}")
    if val_tokens != args.val_tokens:
        problems.append(f"val measured on {val_tokens:,} tokens, not {args.val_tokens:,}")
    return problems, summary


def check_code(files: dict[str, str], repo: Path, rev: str) -> list[str]:
    """Each embedded file must equal `git show REV:path`, byte for byte."""
    resolved = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet",
                               f"{rev}^{{commit}}"], capture_output=True, text=True)
    if resolved.returncode != 0:
        raise MalformedLog(f"{rev!r} is not a commit in the git repo at {repo}")
    if not files:
        return [f"the log embeds no source files to compare with {rev}"]
    problems = []
    for path, body in files.items():
        shown = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{path}"], capture_output=True)
        if shown.returncode != 0:
            problems.append(f"{path} is not in {rev}")
        # The writer may end the last source line with its own newline before the end marker.
        elif body.encode() not in (shown.stdout, shown.stdout + b"\n"):
            problems.append(f"{path} differs from {rev}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a training log against records/README.md.")
    parser.add_argument("log", type=Path, help="the training log (logs/<run_id>.txt)")
    parser.add_argument("--target", type=float, default=3.43,
                        help="highest final val NELBO, nats/token: 3.44 less the 0.01 margin for the val noise")
    parser.add_argument("--val_tokens", type=int, default=10_485_760, help="val tokens the final evaluation must use")
    parser.add_argument("--max_params", type=int, default=162_000_000, help="most parameters, embeddings included")
    parser.add_argument("--block_size", type=int, default=16, help="required denoising block size")
    parser.add_argument("--train_files", default=r"finewebedu_train_[^/]*\.bin",
                        help="regex the file name in the train_data pattern must match ('.*' for the demo)")
    parser.add_argument("--val_file", default=r"finewebedu_val_000000\.bin",
                        help="regex the file name in the val_data path must match ('.*' for the demo)")
    parser.add_argument("--rev", help="git revision whose files the code embedded in the log must equal")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="git repo for --rev (default: the repo holding this script)")
    args = parser.parse_args(argv)
    try:
        try:
            with open(args.log, encoding="utf-8", newline="") as log_file:  # keep \r for byte-exact code
                text = log_file.read()
        except (OSError, UnicodeDecodeError) as error:
            raise MalformedLog(f"cannot read {args.log} ({error})") from None
        log = parse_log(text)
        problems, summary = check_rules(log, args)
        if args.rev:
            code_problems = check_code(log.files, args.repo, args.rev)
            problems += code_problems
            summary["code"] = f"{'mismatch' if code_problems else 'matches'}@{args.rev}"
    except MalformedLog as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 2
    details = " ".join(f"{key}:{value}" for key, value in summary.items())
    print(f"FAIL: {'; '.join(problems)} | {details}" if problems else f"PASS {details}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
