"""records/plot.py on real logs written by train.py: the parsed curve, the PNG, and the one-line errors.

    python -m pytest -q tests/test_plot.py
"""

import os
import subprocess
import sys

import pytest
from conftest import REPO, TRAINED, read_log, run_train, val_losses

sys.path.insert(0, os.path.join(REPO, "records"))
import plot  # noqa: E402

image = pytest.importorskip("matplotlib.image")
PLOT = os.path.join(REPO, "records", "plot.py")
STEPS, VAL_EVERY, BATCH, SEQ = 4, 2, 2, 128  # the TRAINED flags' steps, val_every, batch_size and seq_len


@pytest.fixture(scope="module")
def logs(tmp_path_factory, trained_run):
    """Two short real runs of different seeds, the shared trained run and its seed-1 twin: (log paths, texts)."""
    tmp_path = tmp_path_factory.mktemp("runs")
    run_train(tmp_path, *TRAINED, "--seed=1", "--run_id=seed1")
    return [trained_run.log, tmp_path / "logs" / "seed1.txt"], [trained_run.text, read_log(tmp_path, "seed1")]


def run_plot(*args):
    return subprocess.run([sys.executable, PLOT, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_the_curve_is_the_logged_validations(logs):
    for path, text in zip(*logs):
        minutes, tokens, losses = plot.read_curve(path)
        assert losses == val_losses(text) and len(losses) == STEPS // VAL_EVERY + 1
        assert tokens == [step * BATCH * SEQ for step in range(0, STEPS + 1, VAL_EVERY)]
        assert minutes[0] == 0 and minutes == sorted(minutes) and minutes[-1] > 0
    assert plot.read_curve(logs[0][0])[2] != plot.read_curve(logs[0][1])[2]  # the seeds' runs differ


def test_writes_a_png_of_every_run(tmp_path, logs):
    out = tmp_path / "curve.png"
    result = run_plot(*logs[0], f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}: 2 runs"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = image.imread(out).shape
    assert (width, height) == (1000, 400)


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("just some notes\n", "is not a train.py log"),
    ("config:{\"batch_size\": 2, \"seq_len\": 128}\ntrain_data:pattern=x shards=1 tokens=9\n"
     "val_data:path=v tokens=9\nparams:5\nstep:1/4 train_loss:3.0 train_time:5ms step_avg:5.00ms\n",
     "has no val_loss line"),
])
def test_a_log_that_cannot_be_read_gets_one_line_naming_it(tmp_path, logs, content, message):
    bad = tmp_path / "bad.txt"
    if content is not None:
        bad.write_text(content)
    result = run_plot(logs[0][0], bad, f"--out={tmp_path / 'curve.png'}")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and str(bad) in result.stderr and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "curve.png").exists()


def test_missing_matplotlib_names_the_install(tmp_path, logs):
    program = (f"import runpy, sys\nsys.modules['matplotlib'] = None\nsys.argv = ['plot.py', {str(logs[0][0])!r}, "
               f"'--out={tmp_path / 'curve.png'}']\nrunpy.run_path({PLOT!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", program], cwd=os.path.join(REPO, "records"), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "error: records/plot.py needs matplotlib: pip install -r requirements-dev.txt\n"
