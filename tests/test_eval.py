"""eval.py through its command line, on the checkpoint of the shared trained run (tests/conftest.py).

    python -m pytest -q tests/test_eval.py
"""

import os
import re
import statistics
import subprocess
import sys

import pytest
from conftest import ONE_THREAD, REPO

import eval as evaluation
from data.loader import DEMO_DIR

RESULT = re.compile(r"val_nelbo:(\S+) stderr:(\S+) ppl_bound:\S+ seeds:(\d+) tokens:(\d+) seq_len:(\d+) "
                    r"autocast:(bf16|fp32) estimator:(\w+) schedule:(\w+) files:(\S+)")


@pytest.fixture(scope="module")
def run(trained_run):
    """The shared two-layer demo-corpus run: (its final checkpoint, the val_loss of its last val line)."""
    final = re.findall(r"^step:4/4 val_loss:(\S+) ", trained_run.text, re.M)[-1]
    return trained_run.final, final


def evaluate(*flags, launcher=(sys.executable, "eval.py")):
    return subprocess.run([*launcher, *flags], cwd=REPO, env={**os.environ, **ONE_THREAD}, capture_output=True,
                          text=True, timeout=600)


def result_of(completed):
    assert completed.returncode == 0, completed.stderr
    return RESULT.fullmatch(completed.stdout.strip().splitlines()[-1])


def test_reproduces_the_runs_last_val_line(run):
    checkpoint, logged = run
    result = result_of(evaluate(f"--checkpoint={checkpoint}", "--autocast=fp32"))
    assert result.group(1) == logged
    assert result.group(3, 4, 5, 6, 7, 8) == ("1", "1024", "128", "fp32", "exact_k", "none")
    assert result.group(9).endswith("demo_val_000000.bin")


def test_several_seeds_give_mean_and_standard_error(run):
    checkpoint, logged = run
    completed = evaluate(f"--checkpoint={checkpoint}", "--autocast=fp32", "--seeds=3")
    result = result_of(completed)
    per_seed = [float(v) for v in re.findall(r"^seed:\d+ val_nelbo:(\S+)$", completed.stdout, re.M)]
    assert len(per_seed) == 3 and f"{per_seed[0]:.4f}" == logged and len(set(per_seed)) == 3
    assert float(result.group(1)) == pytest.approx(statistics.fmean(per_seed), abs=1e-4)
    assert float(result.group(2)) == pytest.approx(statistics.stdev(per_seed) / 3**0.5, abs=1e-4)


def test_two_ranks_give_the_one_process_result_on_other_files(run):
    checkpoint, _ = run
    flags = [f"--checkpoint={checkpoint}", "--autocast=fp32", f"--files={DEMO_DIR}/demo_train_*.bin",
             "--val_tokens=3072", "--seq_len=256"]
    one = result_of(evaluate(*flags))
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "eval.py")
    two = result_of(evaluate(*flags, launcher=torchrun))
    assert one.group(1) == two.group(1) and one.group(4) == two.group(4) == "3072"
    assert one.group(9).endswith("demo_train_000000.bin")


def evaluate_in_process(capsys, *flags):
    """eval.main in this process: the last line it printed, matched."""
    evaluation.main(list(flags))
    return RESULT.fullmatch(capsys.readouterr().out.strip().splitlines()[-1])


def test_iid_noise_under_each_schedule_estimates_the_same_nelbo(run, capsys, one_thread):
    """--estimator=iid draws t per block under --schedule: other noise, so other numbers, whose means over seeds
    agree with exact_k's within their standard errors (iid's is the larger: weights up to 1 / t)."""
    checkpoint, _ = run
    flags = [f"--checkpoint={checkpoint}", "--autocast=fp32", "--seeds=4"]
    exact = evaluate_in_process(capsys, *flags)
    results = {schedule: evaluate_in_process(capsys, *flags, "--estimator=iid", f"--schedule={schedule}")
               for schedule in ("linear", "cosine")}
    for schedule, result in results.items():
        assert result.group(7, 8) == ("iid", schedule)
        difference = abs(float(result.group(1)) - float(exact.group(1)))
        assert difference < 4 * (float(result.group(2)) ** 2 + float(exact.group(2)) ** 2) ** 0.5
    assert results["linear"].group(1) != results["cosine"].group(1) != exact.group(1)


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint=/no/such.pt"], "does not exist"),
    (["--checkpoint={ckpt}", "--files=/no/such/*.bin"], "no shards match /no/such/*.bin"),
    (["--checkpoint={ckpt}", "--val_tokens=1000"], "must be a multiple of seq_len 128"),
    (["--checkpoint={ckpt}", "--seeds=0"], "--seeds must be at least 1"),
    (["--checkpoint={ckpt}", "--seeds=many"], "--seeds takes a value of type int"),
    (["--checkpoint={ckpt}", "--folds=2"], "unknown flag --folds"),
    (["--checkpoint={ckpt}", "--estimator=iid", "--schedule=cubic"], "--schedule must be linear, cosine or sqrt"),
    (["--checkpoint={ckpt}", "--schedule=cosine"], "--schedule applies to --estimator=iid only"),
    (["--checkpoint={ckpt}", "--estimator=stratified"], "--estimator must be iid or exact_k"),
])
def test_bad_input_gives_one_line_and_status_2(run, capsys, flags, message):
    """In-process through eval.main (the command line's own entry point); test_cli_bad_input_exits_with_status_2
    runs the real command line."""
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main([flag.format(ckpt=run[0]) for flag in flags])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert stderr.startswith("error: ") and message in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_cli_bad_input_exits_with_status_2(run):
    completed = evaluate(f"--checkpoint={run[0]}", "--seeds=0")
    assert completed.returncode == 2 and completed.stderr == "error: --seeds must be at least 1, got 0\n"
