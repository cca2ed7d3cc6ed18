"""The prepared GPU check, `python bench.py --gpu_check=True`, rehearsed on the CPU as CI runs it: every part of it
has run before a GPU window is spent on it.

    OMP_NUM_THREADS=1 python -m pytest -q tests/tools/test_gpu_check.py
"""

import os
import re
import subprocess
import sys
import time

from conftest import ONE_THREAD, REPO

from tools import gpu_check


def test_the_rehearsal_runs_every_part_and_passes(demo_corpus):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "tools/bench.py", "--gpu_check=True"], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**os.environ, **ONE_THREAD})
    seconds = time.perf_counter() - started
    lines = result.stdout.splitlines()
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert lines[0].startswith("# gpu_check REHEARSAL on the CPU")
    assert re.findall(r"^## (\w+): passed, \d+ s$", result.stdout, re.M) == list(gpu_check.PARTS)
    summary = lines[-1]
    assert summary.startswith("gpu_check: PASS 5/5 passed (rehearsal on CPU): ")
    assert summary.split(": ", 2)[2].split()[:-1] == [f"{name}:ok" for name in gpu_check.PARTS]
    assert seconds < 180, f"the rehearsal took {seconds:.0f} s, more than the 3 minutes it may"


def test_a_failing_part_is_reported_and_the_next_parts_still_run(monkeypatch, capsys):
    def broken(target, state):
        raise ValueError("a bug of the check itself")

    parts = {name: (broken if name == "flex_equals_sdpa" else lambda target, state: [f"- {name} ran"])
             for name in gpu_check.PARTS}
    monkeypatch.setattr(gpu_check, "PARTS", parts)
    monkeypatch.setattr(gpu_check, "target_for", lambda device: object())
    assert gpu_check.run_check(gpu_check.torch.device("cpu")) == 1
    out = capsys.readouterr().out
    assert "## flex_equals_sdpa: FAILED (ValueError: a bug of the check itself)" in out
    assert out.count(" ran\n") == 4 and "ValueError: a bug of the check itself\n```" in out
    assert out.splitlines()[-1].startswith("gpu_check: FAIL 4/5 passed (rehearsal on CPU): environment:ok "
                                           "flex_equals_sdpa:failed record_step:ok validation:ok sampling:ok ")
