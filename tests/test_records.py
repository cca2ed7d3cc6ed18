"""Tests for records/check.py: a log in train.py's format passes, doctored copies of it each fail for
their own reason, and a real demo log written by train.py passes with the demo's target.

    python -m pytest -q tests/test_records.py
"""

import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "records" / "check.py"
EMBEDDED = ("train.py", "model.py")
STAND_IN = '"""Stand-in for {name}, used until the real file exists."""\n\nprint("{name}")\n'
FINAL_VAL = "step:1000/1000 val_loss:3.4212 ppl:30.61 train_time:741234ms tokens:10485760"


def embedded_sources() -> dict[str, str]:
    """The real train.py and model.py when they exist, else small stand-ins."""
    return {name: (REPO / name).read_text(encoding="utf-8") if (REPO / name).exists()
            else STAND_IN.format(name=name) for name in EMBEDDED}


def make_log(sources: dict[str, str]) -> str:
    """A record-sized run in the exact format of SPEC.md, with noisy losses that fall over training."""
    rng = random.Random()
    lines = []
    for name, text in sources.items():
        lines += [f"==== file: {name} ====", text.rstrip("\n"), f"==== end file: {name} ===="]
    config = ('{"block_size": 16, "num_iterations": 1000, "seq_len": 65536, "t_hi": 0.8, "t_lo": 0.3, '
              '"val_tokens": 10485760}')
    lines += ["python:3.11.7", "torch:2.13.0+cu128 cuda:12.8", "nvidia-smi:", "| NVIDIA H100 80GB HBM3 |",
              f"config:{config}", "world_size:8 grad_accum:1",
              "train_data:pattern=data/finewebedu10B/finewebedu_train_*.bin shards=8 tokens=800000000",
              "val_data:path=data/finewebedu10B/finewebedu_val_000000.bin tokens=10485760",
              "params:161234432", "step:0/1000 val_loss:10.9342 ppl:56125.11 train_time:0ms tokens:10485760"]
    for step in range(1, 1001):
        loss = 3.3 + 7.5 * math.exp(-step / 120) + rng.uniform(-0.1, 0.1)
        lines.append(f"step:{step}/1000 train_loss:{loss:.4f} train_time:{741 * step}ms step_avg:741.00ms")
        if step % 250 == 0 and step < 1000:
            val = 3.43 + 7.5 * math.exp(-step / 120)
            lines.append(f"step:{step}/1000 val_loss:{val:.4f} ppl:{math.exp(val):.2f} "
                         f"train_time:{741 * step}ms tokens:10485760")
    lines += [FINAL_VAL, "train_tokens:524288000", "peak_memory:41234MiB", "checkpoint:checkpoints/run.pt"]
    return "\n".join(lines) + "\n"


def doctor(text: str, old: str, new: str) -> str:
    """Replace the one occurrence of a whole log line, so each doctored log differs in one place."""
    assert text.count(f"\n{old}\n") == 1, old
    return text.replace(f"\n{old}\n", f"\n{new}\n")


def run_check(tmp_path: Path, text: str, *flags: str) -> tuple[int, str]:
    log = tmp_path / "run.txt"
    log.write_text(text, encoding="utf-8", newline="")
    done = subprocess.run([sys.executable, str(CHECK), str(log), *flags], capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return embedded_sources()


@pytest.fixture(scope="module")
def good_log(sources) -> str:
    return make_log(sources)


def test_good_log_passes_with_one_verdict_line(tmp_path, good_log):
    code, out = run_check(tmp_path, good_log)
    assert code == 0, out
    assert out.count("\n") == 1 and out.startswith("PASS ")
    assert "val_loss:3.4212" in out and "train_time:12.35min" in out


def test_limits_are_inclusive(tmp_path, good_log):
    text = doctor(good_log, FINAL_VAL, FINAL_VAL.replace("val_loss:3.4212", "val_loss:3.4300"))
    text = doctor(text, "params:161234432", "params:162000000")
    text = doctor(text, "train_tokens:524288000", "train_tokens:800000000")
    code, out = run_check(tmp_path, text)
    assert code == 0, out


@pytest.mark.parametrize("old, new, reason", [
    (FINAL_VAL, FINAL_VAL.replace("val_loss:3.4212", "val_loss:3.4301"), "val_loss 3.4301 is not <= target"),
    (FINAL_VAL, FINAL_VAL.replace("val_loss:3.4212", "val_loss:nan"), "val_loss nan is not <= target"),
    (FINAL_VAL, FINAL_VAL.replace("tokens:10485760", "tokens:1048576"), "not 10,485,760"),
    ("params:161234432", "params:162000001", "params 162,000,001 > 162,000,000"),
    ('config:{"block_size": 16, "num_iterations": 1000, "seq_len": 65536, "t_hi": 0.8, "t_lo": 0.3, '
     '"val_tokens": 10485760}',
     'config:{"block_size": 8, "num_iterations": 1000, "seq_len": 65536, "t_hi": 0.8, "t_lo": 0.3, '
     '"val_tokens": 10485760}', "block_size 8 != 16"),
    ('config:{"block_size": 16, "num_iterations": 1000, "seq_len": 65536, "t_hi": 0.8, "t_lo": 0.3, '
     '"val_tokens": 10485760}',
     'config:{"block_size": 16, "num_iterations": 1000, "schedule": "cosine", "seq_len": 65536, "t_hi": 0.8, '
     '"t_lo": 0.3, "val_tokens": 10485760}', "schedule cosine: a record trains and validates with the linear"),
    ("train_data:pattern=data/finewebedu10B/finewebedu_train_*.bin shards=8 tokens=800000000",
     "train_data:pattern=data/owt/owt_train_*.bin shards=8 tokens=800000000", "train data data/owt/"),
    ("val_data:path=data/finewebedu10B/finewebedu_val_000000.bin tokens=10485760",
     "val_data:path=data/finewebedu10B/finewebedu_train_000001.bin tokens=10485760", "val data data/"),
    ("train_tokens:524288000", "train_tokens:800000001", "data repeated"),
    ("params:161234432", "params:161234432\nresumed:checkpoints/run/latest.pt step:500",
     "resumed at step 500"),
    (FINAL_VAL, FINAL_VAL.replace("step:1000/1000", "step:999/1000"), "step 999/1000, not the final step"),
])
def test_doctored_log_fails_for_its_reason(tmp_path, good_log, old, new, reason):
    code, out = run_check(tmp_path, doctor(good_log, old, new))
    assert code == 1, out
    assert out.startswith("FAIL: ") and out.count("\n") == 1
    assert reason in out
    assert out.count(";") == 0, f"only one rule should be broken: {out}"


def test_every_violation_is_listed(tmp_path, good_log):
    text = doctor(good_log, "params:161234432", "params:200000000")
    text = doctor(text, FINAL_VAL, FINAL_VAL.replace("val_loss:3.4212", "val_loss:3.9000"))
    code, out = run_check(tmp_path, text)
    assert code == 1 and "params 200,000,000" in out and "val_loss 3.9000 is not <= target" in out
    assert "train_time:12.35min" in out


def test_unfinished_runs_fail(tmp_path, good_log):
    cut_after_val = good_log[:good_log.index("\n", good_log.index("step:750/1000 val_loss")) + 1]
    code, out = run_check(tmp_path, cut_after_val)
    assert code == 1, out
    assert "step 750/1000, not the final step" in out and "no train_tokens line" in out

    no_val = re.sub(r"^step:\d+/\d+ val_loss:.*\n", "", good_log, flags=re.MULTILINE)
    code, out = run_check(tmp_path, no_val)
    assert code == 1 and "no val_loss line" in out and "train_time:unknown" in out, out


@pytest.mark.parametrize("make_bad, error", [
    (lambda log: "", "no 'config:' line"),
    (lambda log: log[:log.index("==== end file: model.py")], "model.py has no end marker"),
    (lambda log: doctor(log, "params:161234432", "").replace("\n\n", "\n"), "no 'params:' line"),
    (lambda log: log + log[log.index("python:3.11.7"):], "more than one"),
    (lambda log: doctor(log, FINAL_VAL, FINAL_VAL.replace("3.4212", "low")), "not a number"),
])
def test_malformed_log_is_an_error(tmp_path, good_log, make_bad, error):
    code, out = run_check(tmp_path, make_bad(good_log))
    assert code == 2, out
    assert out.startswith("ERROR: ") and out.count("\n") == 1 and error in out


def test_missing_log_is_an_error(tmp_path):
    missing = tmp_path / "no_such_log.txt"
    done = subprocess.run([sys.executable, str(CHECK), str(missing)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("ERROR: cannot read"), done.stderr


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
def code_repo(tmp_path_factory, sources) -> tuple[Path, str]:
    repo = tmp_path_factory.mktemp("code_repo")
    return repo, commit_files(repo, sources)


def test_code_matches_its_revision(tmp_path, good_log, code_repo):
    repo, rev = code_repo
    code, out = run_check(tmp_path, good_log, f"--rev={rev}", f"--repo={repo}")
    assert code == 0 and f"code:matches@{rev}" in out, out


def test_code_that_differs_from_its_revision_fails(tmp_path, sources, code_repo):
    repo, rev = code_repo
    changed = dict(sources)
    last_line = changed["model.py"].rstrip("\n").rsplit("\n", 1)[-1]
    changed["model.py"] = changed["model.py"].replace(last_line, last_line + " ", 1)  # one trailing space
    code, out = run_check(tmp_path, make_log(changed), f"--rev={rev}", f"--repo={repo}")
    assert code == 1 and "model.py differs from" in out and "train.py" not in out, out

    code, out = run_check(tmp_path, make_log({**sources, "data/loader.py": "pass\n"}), f"--rev={rev}",
                          f"--repo={repo}")
    assert code == 1 and f"data/loader.py is not in {rev}" in out, out

    code, out = run_check(tmp_path, make_log({}), f"--rev={rev}", f"--repo={repo}")
    assert code == 1 and "embeds no source files" in out, out


def test_unknown_revision_is_an_error(tmp_path, good_log, code_repo):
    repo, _ = code_repo
    code, out = run_check(tmp_path, good_log, "--rev=no-such-branch", f"--repo={repo}")
    assert code == 2 and "not a commit" in out, out


def test_checker_reads_logs_only(tmp_path, good_log):
    """check.py must run where torch, model.py and train.py are absent."""
    log = tmp_path / "run.txt"
    log.write_text(good_log, encoding="utf-8")
    program = ("import runpy, sys\n"
               f"sys.argv = ['check.py', {str(log)!r}]\n"
               "try:\n"
               f"    runpy.run_path({str(CHECK)!r}, run_name='__main__')\n"
               "except SystemExit:\n"
               "    pass\n"
               "print(sorted(m for m in ('torch', 'model', 'train', 'numpy') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    verdict, imported = done.stdout.splitlines()
    assert verdict.startswith("PASS ") and imported == "[]", done.stdout


DEMO_STEPS = 2


@pytest.mark.skipif(not (REPO / "train.py").exists(), reason="train.py does not exist yet")
def test_real_demo_log(tmp_path):
    """A short demo run of the real train.py: its log passes with demo settings, fails the record rules."""
    logs = tmp_path / "logs"
    run = subprocess.run([sys.executable, "train.py", "--preset=demo", f"--steps={DEMO_STEPS}", "--warmup_steps=0",
                          "--val_every=0", "--val_tokens=1024", f"--log_dir={logs}",
                          f"--checkpoint_dir={tmp_path / 'checkpoints'}", "--run_id=demo"],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    text = (logs / "demo.txt").read_text(encoding="utf-8")
    repo = tmp_path / "code"
    embedded = re.findall(r"^==== file: (\S+) ====$", text, re.M)
    assert {"train.py", "model.py", "common.py", "data/loader.py"} <= set(embedded)
    rev = commit_files(repo, {name: (REPO / name).read_text(encoding="utf-8") for name in embedded})
    # Two steps teach little; a working model still does no worse than guessing among the 50257 tokens.
    code, out = run_check(tmp_path, text, f"--target={math.log(50257)}", "--val_tokens=1024",
                          "--train_files=.*", "--val_file=.*", f"--rev={rev}", f"--repo={repo}")
    assert code == 0, out
    assert f"step:{DEMO_STEPS}/{DEMO_STEPS}" in out and f"code:matches@{rev}" in out

    code, out = run_check(tmp_path, text)
    assert code == 1, out
    for reason in ("is not <= target 3.43", "not 10,485,760", "not FineWeb-Edu train", "not the FineWeb-Edu val"):
        assert reason in out

    # a change to any module the run imported, not only train.py and model.py, is a mismatch
    changed = commit_files(repo, {"data/loader.py": (REPO / "data/loader.py").read_text(encoding="utf-8") + "#\n"})
    code, out = run_check(tmp_path, text, f"--target={math.log(50257)}", "--val_tokens=1024", "--train_files=.*",
                          "--val_file=.*", f"--rev={changed}", f"--repo={repo}")
    assert code == 1 and "data/loader.py differs" in out and "train.py differs" not in out, out
