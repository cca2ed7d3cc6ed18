"""Tests for records/check.py on real logs of train.py: an honest tiny run passes with demo limits and fails the
record rules only for what a demo is; each forgery of its log, and each run with patched code or data, fails for
its own named reason.

    python -m pytest -q tests/test_records.py
"""

import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TRAINED, read_log, run_train

import train
from model import BD3LM, ModelConfig

CHECK = Path(REPO) / "records" / "check.py"
DEMO = ["--target=11", "--val_tokens=1024", "--train_files=.*", "--val_file=.*", "--val_shard_tokens=0"]
HONEST = TRAINED  # the flags of the shared trained run
pytestmark = pytest.mark.usefixtures("demo_corpus")


def run_check(tmp_path: Path, text: str, *flags: str) -> tuple[int, str]:
    log = tmp_path / "checked.txt"
    log.write_text(text, encoding="utf-8", newline="")
    done = subprocess.run([sys.executable, str(CHECK), str(log), *flags], capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr


def reasons(out: str) -> list[str]:
    assert out.startswith("FAIL: ") and out.count("\n") == 1, out
    return out.removeprefix("FAIL: ").split(" | ")[0].split("; ")


def line_of(text: str, pattern: str) -> str:
    """The one whole line of the log (outside the embedded files) that matches `pattern`."""
    header = text[text.rindex("==== end file:"):]
    found = re.findall(rf"^{pattern}$", header, re.M)
    assert len(found) == 1, (pattern, found)
    return found[0]


def replace_line(text: str, old: str, new: str) -> str:
    assert text.count(f"\n{old}\n") == 1, old
    return text.replace(f"\n{old}\n", f"\n{new}\n" if new else "\n")


def git(repo: Path, *args: str) -> str:
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
    return subprocess.run(["git", "-C", str(repo), *identity, *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def commit_files(repo: Path, files: dict[str, str]) -> str:
    repo.mkdir(exist_ok=True)
    git(repo, "init", "-q")
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text, encoding="utf-8", newline="")
    git(repo, "add", *files)
    git(repo, "commit", "-q", "-m", "the code of the run")
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def honest(tmp_path_factory, trained_run) -> dict:
    """The shared honest tiny run (4 steps, validations at 0, 2 and 4, a checkpoint at step 2), its resumed twin, and
    a git repo holding the code they embed."""
    tmp = tmp_path_factory.mktemp("honest")
    run_train(tmp, *HONEST, "--run_id=resumed", f"--resume={trained_run.latest}")
    text = trained_run.text
    embedded = re.findall(r"^==== file: (\S+) ====$", text, re.M)
    rev = commit_files(tmp / "code", {name: (Path(REPO) / name).read_text(encoding="utf-8") for name in embedded})
    return dict(text=text, resumed=read_log(tmp, "resumed"), repo=tmp / "code", rev=rev)


def code_flags(honest: dict) -> list[str]:
    return [f"--rev={honest['rev']}", f"--repo={honest['repo']}"]


def test_honest_log_passes_and_says_when_the_code_was_not_checked(tmp_path, honest):
    code, out = run_check(tmp_path, honest["text"], *DEMO, *code_flags(honest))
    assert code == 0 and out.startswith("PASS ") and out.count("\n") == 1, out
    assert f"code:matches@{honest['rev']}" in out and "step:4/4" in out
    code, out = run_check(tmp_path, honest["text"], *DEMO)
    assert code == 0 and "code:NOT CHECKED (no --rev)" in out, out


def test_honest_demo_log_fails_the_record_rules_only_for_being_a_demo(tmp_path, honest):
    code, out = run_check(tmp_path, honest["text"], *code_flags(honest))
    assert code == 1
    found = reasons(out)
    expected = ["is not FineWeb-Edu train shards", "is not the FineWeb-Edu val shard", "not FineWeb-Edu's 100,000,000",
                "is not <= target 3.43", "not 10,485,760"]
    assert len(found) == len(expected) and all(any(e in r for r in found) for e in expected), found


def test_limits_are_inclusive(tmp_path, honest):
    text = honest["text"]
    params = int(line_of(text, r"params:\d+").split(":")[1])
    loss = line_of(text, r"step:4/4 val_loss:\S+ .*").split()[1].split(":")[1]
    code, out = run_check(tmp_path, text, *DEMO, f"--max_params={params}", f"--target={loss}")
    assert code == 0, out
    code, out = run_check(tmp_path, text, *DEMO, f"--max_params={params - 1}",
                          f"--target={float(loss) - 0.0001:.4f}")
    assert code == 1 and len(reasons(out)) == 2 and f"params {params:,} > {params - 1:,}" in out, out


# -----------------------------------------------------------------------------
# 1. Code that runs but is not in the log


def test_a_patched_loader_and_a_patched_clock_fail(tmp_path, honest, demo_corpus):
    """A copy of the repo whose loader repeats the first tokens every step, run with a sitecustomize that makes
    train_time 8x smaller."""
    copy = tmp_path / "copy"
    for name in subprocess.run(["git", "-C", REPO, "ls-files", "*.py"], capture_output=True, text=True,
                               check=True).stdout.split():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(REPO) / name, copy / name)
    loader = (copy / "data" / "loader.py").read_text()
    honest_read = "self.stream.read(start, start + self.seq_len) for start in mine"
    assert honest_read in loader
    (copy / "data" / "loader.py").write_text(loader.replace(honest_read, "self.stream.read(0, self.seq_len) "
                                                                         "for start in mine"))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text("import time\n_real = time.perf_counter\n"
                                                         "time.perf_counter = lambda: _real() / 8\n")
    run_train(tmp_path, *HONEST, "--run_id=patched", f"--data={os.path.dirname(demo_corpus[0])}/demo",
              launcher=(sys.executable, str(copy / "train.py")), env={"PYTHONPATH": str(tmp_path / "site")})
    code, out = run_check(tmp_path, read_log(tmp_path, "patched"), *DEMO, *code_flags(honest))
    found = reasons(out)
    assert code == 1 and len(found) == 3, out
    assert f"data/loader.py differs from {honest['rev']}" in found
    assert f"modules from outside the repo and the Python installation ran: {tmp_path}/site/sitecustomize.py" in found
    assert "time.perf_counter was replaced: train_time is not wall-clock" in found


def test_a_wrapper_script_fails(tmp_path, honest):
    wrapper = (f"import runpy, sys; sys.path.insert(0, {REPO!r}); "
               f"runpy.run_path({REPO + '/train.py'!r}, run_name='__main__')")
    run_train(tmp_path, *HONEST, "--run_id=wrapped", launcher=(sys.executable, "-c", wrapper))
    code, out = run_check(tmp_path, read_log(tmp_path, "wrapped"), *DEMO, *code_flags(honest))
    assert code == 1 and reasons(out) == [f"the process started in {tmp_path}/<string>, not train.py: code outside "
                                          f"the log ran"]


@pytest.mark.parametrize("deleted", ["model.py", "data/loader.py", "common.py"])
def test_a_deleted_module_block_fails(tmp_path, honest, deleted):
    text = honest["text"]
    start, end = f"==== file: {deleted} ====\n", f"==== end file: {deleted} ====\n"
    forged = text[:text.index(start)] + text[text.index(end) + len(end):]
    code, out = run_check(tmp_path, forged, *DEMO, *code_flags(honest))
    assert code == 1 and reasons(out) == [f"{deleted} is imported by the run but not embedded in the log"], out


def test_code_that_differs_from_its_revision_fails(tmp_path, honest):
    text = honest["text"]
    model_end = text.index("==== end file: model.py ====")
    forged = text[:model_end] + "# one more line\n" + text[model_end:]
    code, out = run_check(tmp_path, forged, *DEMO, *code_flags(honest))
    assert code == 1 and reasons(out) == [f"model.py differs from {honest['rev']}"], out
    code, out = run_check(tmp_path, text, *DEMO, "--rev=no-such-branch", f"--repo={honest['repo']}")
    assert code == 2 and "not a commit" in out, out


# -----------------------------------------------------------------------------
# 2. Data identified by content


def test_the_val_shard_as_train_shards_fails(tmp_path, demo_corpus):
    """The review's forgery, run for real: the val shard copied under the train shard names."""
    _, val = demo_corpus
    folder = tmp_path / "fineweb"
    folder.mkdir()
    for name in ("finewebedu_val_000000.bin", "finewebedu_train_000001.bin", "finewebedu_train_000002.bin"):
        shutil.copy(val, folder / name)
    run_train(tmp_path, *HONEST, "--run_id=val_as_train", f"--data={folder}/finewebedu")
    code, out = run_check(tmp_path, read_log(tmp_path, "val_as_train"), *DEMO, "--train_files=finewebedu_train_.*",
                          "--val_file=finewebedu_val_000000.bin")
    assert code == 1 and reasons(out) == [
        f"train shard {folder}/finewebedu_train_000001.bin is the val shard (same sha256)",
        f"train shard {folder}/finewebedu_train_000002.bin is the val shard (same sha256)"], out


def test_forged_shard_lines_fail(tmp_path, honest):
    text = honest["text"]
    train_line = line_of(text, r"shard:train .*")
    val_line = line_of(text, r"shard:val .*")
    code, out = run_check(tmp_path, replace_line(text, train_line, ""), *DEMO)
    assert code == 1 and reasons(out) == ["0 train and 1 val shard: lines for 1 train shards and 1 val shard: the log "
                                          "does not identify its data"], out
    tokens = re.search(r"tokens=(\d+)", val_line).group(1)
    code, out = run_check(tmp_path, replace_line(text, val_line, val_line.replace(f"tokens={tokens}",
                                                                                  f"tokens={int(tokens) + 1}")), *DEMO)
    assert code == 1 and len(reasons(out)) == 1 and "tokens do not fill" in out, out
    sha256 = re.search(r"sha256=(\w+)", val_line).group(1)
    code, out = run_check(tmp_path, text, *DEMO, f"--val_sha256={sha256}")
    assert code == 0 and "(unverified)" not in out, out
    code, out = run_check(tmp_path, text, *DEMO, f"--val_sha256={'0' * 64}")
    assert code == 1 and reasons(out) == [f"the val shard's sha256 {sha256} is not {'0' * 64}"], out


# -----------------------------------------------------------------------------
# 3. Resume hidden


def test_a_hidden_resume_fails(tmp_path, honest):
    resumed = honest["resumed"]
    resumed_line = line_of(resumed, r"resumed:.*")
    code, out = run_check(tmp_path, resumed, *DEMO)
    assert code == 1 and len(reasons(out)) == 1 and "the run resumed at step 2" in out, out

    no_line = replace_line(resumed, resumed_line, "")
    code, out = run_check(tmp_path, no_line, *DEMO)
    assert code == 1 and len(reasons(out)) == 1 and "config resume=" in out, out

    config = line_of(resumed, r"config:.*")
    path = re.search(r'"resume": "([^"]+)"', config).group(1)
    neither = replace_line(no_line, config, config.replace(f'"resume": "{path}"', '"resume": ""'))
    code, out = run_check(tmp_path, neither, *DEMO)
    assert code == 1 and "the step lines are not 1..4 in order (2 lines, the first wrong or missing is step 1)" in out


# -----------------------------------------------------------------------------
# 4. Numbers that contradict the config or the other lines


def forge(text: str, case: str) -> str:
    final = line_of(text, r"step:4/4 val_loss:.*")
    last_step = line_of(text, r"step:4/4 train_loss:.*")
    config = line_of(text, r"config:.*")
    loss = float(final.split()[1].split(":")[1])
    if case == "-inf":
        return replace_line(text, final, re.sub(r"val_loss:\S+ ppl:\S+", "val_loss:-inf ppl:0.00", final))
    if case == "ppl":
        return replace_line(text, final, final.replace(f"val_loss:{loss:.4f}", f"val_loss:{loss - 0.5:.4f}"))
    if case == "appended":
        better = re.sub(r"val_loss:\S+ ppl:\S+", f"val_loss:{loss - 1:.4f} ppl:{math.exp(loss - 1):.2f}", final)
        return text + better + "\n"
    if case == "train_time":
        return replace_line(text, final, re.sub(r"train_time:\d+ms", "train_time:1ms", final))
    if case == "params":
        return replace_line(text, line_of(text, r"params:\d+"), "params:1000")
    if case == "steps":
        return replace_line(text, config, config.replace('"steps": 4', '"steps": 5'))
    if case == "estimator":
        return replace_line(text, config, config.replace('"estimator": "proposal"', '"estimator": "stratified_k"'))
    if case == "interval":
        return replace_line(text, config, config.replace('"t_lo": 0.3', '"t_lo": 0.25'))
    if case == "no steps":
        return re.sub(r"^step:\d+/4 train_loss:.*\n", "", text, flags=re.M)
    if case == "train_tokens":
        return replace_line(text, line_of(text, r"train_tokens:\d+"), "train_tokens:1")
    if case == "step_avg":
        return replace_line(text, last_step, re.sub(r"step_avg:\S+", "step_avg:1.00ms", last_step))
    raise ValueError(case)


@pytest.mark.parametrize("case, expected", [
    ("-inf", ["val_loss -inf at step 4 is not a finite, non-negative NELBO"]),
    ("ppl", ["disagree at step 4"]),
    ("appended", ["more than one val line at step 4", "a val line follows the train_tokens line"]),
    ("train_time", ["train_time falls from", "the final train_time 1ms is less than the"]),
    ("params", ["params 1,000 is not the 13,134,082 of the config's model"]),
    ("steps", ["the step lines are not 1..5", "the step lines count to 4 but the config has steps 5",
               "val lines at steps [0, 2, 4], where the config (val_every 2) puts them at [0, 2, 4, 5]"]),
    ("estimator", ["estimator stratified_k: its expected loss is not the records' objective"]),
    ("interval", ["t_lo 0.25 t_hi 0.8: the records' objective clips t to 0.3-0.8"]),
    ("no steps", ["the log has no step lines"]),
    ("train_tokens", ["train_tokens 1 < the 1,024 that steps x batch_size x seq_len consume"]),
    ("step_avg", ["step 4: step_avg 1.0ms x 4 steps is not its train_time"]),
])
def test_a_forged_number_fails_for_its_reason(tmp_path, honest, case, expected):
    code, out = run_check(tmp_path, forge(honest["text"], case), *DEMO)
    found = reasons(out)
    assert code == 1 and len(found) == len(expected), out
    assert all(any(e in reason for reason in found) for e in expected), out


def test_expected_params_is_the_models_count():
    sys.path.insert(0, str(CHECK.parent))
    from check import expected_params

    rng = random.Random()
    for _ in range(5):
        config = dict(vocab_size=rng.randint(50, 400), n_layer=2 * rng.randint(1, 3), n_head=rng.randint(1, 4),
                      head_dim=8 * rng.randint(1, 4), model_dim=8 * rng.randint(1, 8), mlp_hidden=rng.randint(8, 64))
        assert expected_params(config) == BD3LM(ModelConfig(**config)).num_params(), config
    record = ModelConfig()
    assert expected_params(vars(record)) == 161_871_377 == BD3LM(record).num_params()


def test_the_record_preset_meets_the_rules():
    sys.path.insert(0, str(CHECK.parent))
    import check

    record = train.parse_args([])
    assert (record.block_size, record.val_tokens) == (check.BLOCK_SIZE, check.VAL_TOKENS)
    assert check.expected_params(vars(record)) <= check.MAX_PARAMS


# -----------------------------------------------------------------------------
# Logs the checker cannot read


@pytest.mark.parametrize("make_bad, error", [
    (lambda log: "", "no 'config:' line"),
    (lambda log: log[:log.index("==== end file: model.py")], "model.py has no end marker"),
    (lambda log: log + "config:{}\n", "more than one 'config:' line"),
    (lambda log: re.sub(r"^(step:4/4 val_loss:)\S+", r"\1low", log, flags=re.M), "is not a number"),
])
def test_malformed_log_is_an_error(tmp_path, honest, make_bad, error):
    code, out = run_check(tmp_path, make_bad(honest["text"]))
    assert code == 2 and out.startswith("ERROR: ") and out.count("\n") == 1 and error in out, out


def test_missing_log_is_an_error(tmp_path):
    done = subprocess.run([sys.executable, str(CHECK), str(tmp_path / "no_such_log.txt")], capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stderr.startswith("ERROR: cannot read"), done.stderr


def test_checker_reads_logs_only(tmp_path, honest):
    """check.py must run where torch, numpy, model.py and train.py are absent."""
    log = tmp_path / "run.txt"
    log.write_text(honest["text"], encoding="utf-8")
    program = ("import runpy, sys\n"
               f"sys.argv = ['check.py', {str(log)!r}, *{DEMO!r}]\n"
               "try:\n"
               f"    runpy.run_path({str(CHECK)!r}, run_name='__main__')\n"
               "except SystemExit:\n"
               "    pass\n"
               "print(sorted(m for m in ('torch', 'model', 'train', 'numpy') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    verdict, imported = done.stdout.splitlines()
    assert verdict.startswith("PASS ") and imported == "[]", done.stdout
