"""The prepared GPU check, `python3 tools/gpu_check.py`, rehearsed on the CPU as CI runs it: every part of it
has run before a GPU window is spent on it.

    OMP_NUM_THREADS=1 python -m pytest -q tests/tools/test_gpu_check.py
"""

import os
import re
import subprocess
import sys
import time

import pytest
from conftest import ONE_THREAD, REPO

import common
from tools import gpu_check


def test_the_rehearsal_runs_every_part_and_passes(demo_corpus):
    result = subprocess.run([sys.executable, "tools/gpu_check.py"], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**os.environ, **ONE_THREAD})
    lines = result.stdout.splitlines()
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert lines[0].startswith("# gpu_check REHEARSAL on the CPU")
    assert re.findall(r"^## (\w+): passed, \d+ s$", result.stdout, re.M) == list(gpu_check.PARTS)
    summary = lines[-1]
    assert summary.startswith("gpu_check: PASS 5/5 passed (rehearsal on CPU): ")
    assert summary.split(": ", 2)[2].split()[:-1] == [f"{name}:ok" for name in gpu_check.PARTS]


def fake_parts(monkeypatch, **special):
    """PARTS with each part replaced by one that reports it ran, except the ones given."""
    parts = {name: special.get(name, lambda target, state, name=name: [f"- {name} ran"]) for name in gpu_check.PARTS}
    monkeypatch.setattr(gpu_check, "PARTS", parts)


def test_a_failing_part_is_reported_and_the_next_parts_still_run(monkeypatch, capsys):
    def broken(target, state):
        raise ValueError("a bug of the check itself")

    fake_parts(monkeypatch, flex_equals_sdpa=broken)
    assert gpu_check.check("cpu", "") == 1
    out = capsys.readouterr().out
    assert "## flex_equals_sdpa: FAILED (ValueError: a bug of the check itself)" in out
    assert out.count(" ran\n") == 4 and "ValueError: a bug of the check itself\n```" in out
    assert out.splitlines()[-1].startswith("gpu_check: FAIL 4/5 passed (rehearsal on CPU): environment:ok "
                                           "flex_equals_sdpa:failed record_step:ok validation:ok sampling:ok ")


def test_the_deadline_stops_a_part_and_skips_the_rest_and_the_report_file_has_each_part_as_it_ends(
        monkeypatch, tmp_path, capsys):
    report = tmp_path / "report.md"
    seen_by_the_second_part = []

    def endless(target, state):
        seen_by_the_second_part.append(report.read_text())
        while True:
            time.sleep(0.01)

    fake_parts(monkeypatch, flex_equals_sdpa=endless)
    monkeypatch.setattr(gpu_check, "DEADLINE_SECONDS", 3)
    started = time.perf_counter()
    assert gpu_check.check("cpu", str(report)) == 1
    assert time.perf_counter() - started < 30
    out = capsys.readouterr().out
    assert "## environment: passed" in seen_by_the_second_part[0]
    assert re.findall(r"^## (\w+): (.+), \d+ s$", out, re.M) == [
        ("environment", "passed"), *((name, "skipped (time)") for name in list(gpu_check.PARTS)[1:])]
    assert out.splitlines()[-1].startswith(
        "gpu_check: INCOMPLETE 1/5 passed, 4 skipped (rehearsal on CPU): environment:ok flex_equals_sdpa:skipped(time)"
        " record_step:skipped(time) validation:skipped(time) sampling:skipped(time) ")
    assert report.read_text() == out


def test_without_data_the_parts_that_need_none_still_run(monkeypatch, capsys):
    def no_vocabulary(hp):
        raise RuntimeError("cannot load the GPT-2 tokenizer: offline\nsecond line")

    monkeypatch.setattr(gpu_check, "data_files", no_vocabulary)
    fake_parts(monkeypatch, record_step=lambda target, state: gpu_check.needs_data(target),
               validation=lambda target, state: gpu_check.needs_data(target))
    assert gpu_check.check("cpu", "") == 1
    out = capsys.readouterr().out
    missing = "no training data: RuntimeError: cannot load the GPT-2 tokenizer: offline"
    assert out.count(missing) == 1 and "second line" not in out
    assert out.count("- it needs training data: see `missing` at the top") == 2
    assert out.count(" ran\n") == 3
    assert out.splitlines()[-1].startswith(
        "gpu_check: INCOMPLETE 3/5 passed, 2 skipped (rehearsal on CPU): environment:ok flex_equals_sdpa:ok "
        "record_step:skipped(no data) validation:skipped(no data) sampling:ok ")


def test_allocator_settings_without_torchs_getter_come_back_from_the_environment(monkeypatch):
    """torch 2.11 has the setter but no getter: what set_allocator_settings applied, or the user set, reads back."""
    applied = []
    monkeypatch.delattr(common.torch._C, "_accelerator_getAllocatorSettings", raising=False)
    monkeypatch.setattr(common.torch._C, "_accelerator_setAllocatorSettings", applied.append)
    for name in common.ALLOC_CONF_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert common.allocator_settings() == ""
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    assert common.allocator_settings() == "max_split_size_mb:64"
    common.set_allocator_settings("expandable_segments:True")
    assert applied == ["expandable_segments:True"] and common.allocator_settings() == "expandable_segments:True"


def test_the_command_line_runs_the_check_and_exits_with_its_status(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(gpu_check, "check", lambda device, report: calls.append((device, report)) or 1)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--device=cpu", f"--report={tmp_path}/report.md"])
    assert exit_info.value.code == 1 and calls == [("cpu", f"{tmp_path}/report.md")]


@pytest.mark.parametrize("flags, message", [
    (["--report=/no/such/folder/report.md"], "--report=/no/such/folder/report.md: its folder does not exist"),
    (["--gpu=1"], "unknown flag --gpu"),
    (["report.md"], "expected --name=value"),
])
def test_bad_flags_are_one_line_and_status_2(monkeypatch, capsys, flags, message):
    monkeypatch.setattr(gpu_check, "check", lambda device, report: pytest.fail("a bad flag ran the check"))
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
