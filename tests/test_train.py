"""train.py through its real command line, on CPU, with small models (a few minutes on 2 cores).

    python -m pytest -q tests/test_train.py

Every run is a subprocess of `python train.py` (or torchrun) writing logs and checkpoints to a tmp dir.
The demo corpus (real English text, built from the local Python installation) is prepared once if missing.
"""

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ONE_THREAD, REPO, SMALL, TRAINED, load_final, read_log, run_train, val_losses

import common
import train
from data.shards import read_shard, write_shard
from records.check import parse_log
from tools.demo_corpus import prepare_demo

pytestmark = pytest.mark.usefixtures("demo_corpus")


def test_demo_run_end_to_end(tmp_path):
    steps = 8
    run = run_train(tmp_path, "--preset=demo", "--run_id=demo", f"--steps={steps}", "--val_every=4",
                    "--val_tokens=4096", "--batch_size=4")
    text = read_log(tmp_path, "demo")
    parsed = parse_log(text)  # the records checker must be able to read what train.py writes
    assert set(parsed.files) == {"train.py", "model.py", "noise.py", "common.py", "data/__init__.py", "data/loader.py",
                                 "data/shards.py"}
    for name, body in parsed.files.items():  # every repository module the run imported, as it is on disk
        with open(os.path.join(REPO, name)) as f:
            assert body == f.read(), name
    config = json.loads(parsed.header["config"].group("json"))
    assert config["preset"] == "demo" and config["steps"] == steps
    lines = text.split("\n")
    for pattern in (r"python:\d+\.\d+\.\d+", r"torch:\S+ cuda:\S+", r"nvidia-smi:",
                    r"world_size:1 micro_batch:1 grad_accum:4 autocast:(bf16|fp32)",
                    r"unigram_baseline:\d+\.\d{4}", r"train_tokens:\d+", r"peak_memory:\d+MiB", r"checkpoint:\S+"):
        assert any(re.fullmatch(pattern, line) for line in lines), pattern
    step_lines = [line for line in lines if re.fullmatch(r"step:\d+/8 train_loss:\d+\.\d{4} train_time:\d+ms "
                                                         r"step_avg:\d+\.\d+ms", line)]
    assert len(step_lines) == steps
    assert [m.group("step") for m in parsed.val_lines] == ["0", "4", "8"]
    losses = val_losses(text)
    assert losses[0] == pytest.approx(math.log(50257), rel=0.1)  # zero-initialised head: uniform predictions
    assert losses[-1] < losses[0] - 1.0
    assert all(int(m.group("tokens")) == 4096 for m in parsed.val_lines)

    path = re.search(r"^checkpoint:(\S+)$", text, re.M).group(1)
    assert f"python sample.py --checkpoint={path}" in run.stdout
    state = torch.load(tmp_path / path, weights_only=True)
    assert state["format"] == common.CHECKPOINT_FORMAT == "bd3lm-speedrun-v3" and state["step"] == steps
    assert set(state) >= {"model", "model_config", "hparams", "optimizers", "loader", "rng"}
    assert state["hparams"] == config


def test_presets_and_world_sizes_train_the_same_model(tmp_path):
    """record_24gb on one process (8 forwards of 1 sequence a step), record on one process (2 forwards of 4) and
    record on 2 ranks (1 forward of 4 each): the same sequences in the same order with the same noise, so the
    same model, on a small model and record-layout shards of real text."""
    data = write_local_shards(tmp_path / "fineweb", 40_000, 4_096)
    small = ["--n_layer=2", "--model_dim=128", "--n_head=2", "--head_dim=64", "--mlp_hidden=256", "--seq_len=128",
             "--batch_size=8", "--steps=3", "--val_every=0", "--val_tokens=1024", "--autocast=fp32", f"--data={data}"]
    script = f"{REPO}/train.py"
    python, torchrun = (sys.executable, script), (sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node=2", script)
    runs = {"small_gpu": ("--preset=record_24gb", python, "world_size:1 micro_batch:1 grad_accum:8"),
            "one_big_gpu": ("--preset=record", python, "world_size:1 micro_batch:4 grad_accum:2"),
            "two_big_gpus": ("--preset=record", torchrun, "world_size:2 micro_batch:4 grad_accum:1")}
    for run_id, (preset, launcher, layout) in runs.items():
        run_train(tmp_path, preset, *small, f"--run_id={run_id}", launcher=launcher)
        assert layout in read_log(tmp_path, run_id)
    logs = {run_id: read_log(tmp_path, run_id) for run_id in runs}
    train_losses = {run_id: re.findall(r"^step:\d+/3 train_loss:(\S+) ", text, re.M) for run_id, text in logs.items()}
    tokens = {run_id: re.search(r"^train_tokens:\d+$", text, re.M).group() for run_id, text in logs.items()}
    finals = {run_id: load_final(tmp_path, run_id) for run_id in runs}
    for run_id in ("one_big_gpu", "two_big_gpus"):
        assert tokens[run_id] == tokens["small_gpu"]
        assert [float(x) for x in train_losses[run_id]] == pytest.approx([float(x) for x in train_losses["small_gpu"]],
                                                                          abs=1e-4)
        assert val_losses(logs[run_id])[-1] == pytest.approx(val_losses(logs["small_gpu"])[-1], abs=1e-5)
    # the same forwards on 1 process and on 2 ranks: bit for bit (the all-reduce adds what one process accumulates)
    for name, tensor in finals["one_big_gpu"]["model"].items():
        assert torch.equal(finals["two_big_gpus"]["model"][name], tensor), name
    # Across presets the matmuls have other shapes, so the sums are rounded in another order, and the weights are
    # compared through their losses above, not entry by entry: Muon orthogonalizes a gradient whatever its size, so
    # the rounding-level first gradients of the zero-initialized projections become full-size updates that differ
    # (measured on an AVX-512 CPU: up to 3% of those matrices' norm after 3 steps, 1e-4 or less elsewhere)
    for name, tensor in finals["small_gpu"]["model"].items():
        other = finals["one_big_gpu"]["model"][name]
        if not name.endswith(("proj.weight", "down.weight")):
            assert float((other - tensor).norm()) <= 1e-2 * float(tensor.norm()) + 1e-6, name


def test_resume_after_kill_is_exact(tmp_path, trained_run):
    """A run killed after its first checkpoint, resumed from it, ends as the shared trained run, which ran whole
    with the same flags."""
    command = [sys.executable, f"{REPO}/train.py", *TRAINED, "--run_id=killed", "--val_every=1"]
    with subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, **ONE_THREAD}) as killed:
        for line in killed.stdout:
            if line.startswith("saved:"):
                killed.send_signal(signal.SIGKILL)
                break
        killed.wait()
    assert killed.returncode == -signal.SIGKILL
    checkpoint = f"{tmp_path}/checkpoints/killed/latest.pt"
    assert torch.load(checkpoint, weights_only=True)["step"] in (1, 2, 3)  # 2 or 3 if the kill came late

    run_train(tmp_path, *TRAINED, "--run_id=resumed", f"--resume={checkpoint}")
    whole, resumed = trained_run.text, read_log(tmp_path, "resumed")
    assert "resumed:" in resumed
    assert val_losses(resumed)[-1] == val_losses(whole)[-1]
    assert re.search(r"^train_tokens:\d+$", resumed, re.M).group() == re.search(r"^train_tokens:\d+$", whole,
                                                                                re.M).group()
    weights_whole = torch.load(trained_run.final, weights_only=True)["model"]
    weights_resumed = load_final(tmp_path, "resumed")["model"]
    for name, tensor in weights_whole.items():
        assert torch.equal(weights_resumed[name], tensor), name


def write_local_shards(folder, train_tokens, val_tokens):
    """Small FineWeb-named shards cut from the demo corpus, real text in the record preset's file layout: their
    --data prefix."""
    train_path, val_path = prepare_demo()
    os.makedirs(folder, exist_ok=True)
    write_shard(f"{folder}/finewebedu_train_000001.bin", read_shard(train_path)[:train_tokens])
    write_shard(f"{folder}/finewebedu_val_000000.bin", read_shard(val_path)[:val_tokens])
    return f"{folder}/finewebedu"


def test_record_preset_one_step_on_cpu(tmp_path):
    data = write_local_shards(tmp_path / "fineweb", 20_000, 4_096)
    run_train(tmp_path, "--run_id=record", f"--data={data}", "--steps=1",
              "--seq_len=32", "--batch_size=8", "--val_tokens=64")  # the record's model, on few tokens
    text = read_log(tmp_path, "record")
    parsed = parse_log(text)
    config = json.loads(parsed.header["config"].group("json"))
    assert config["preset"] == "record" and config["block_size"] == 16 and config["n_layer"] == 12
    assert 150e6 < int(parsed.header["params"].group("count")) <= 162e6
    assert "world_size:1 micro_batch:4 grad_accum:2" in text
    assert re.search(r"^step:1/1 train_loss:\d+\.\d{4} ", text, re.M)
    assert [m.group("step") for m in parsed.val_lines] == ["0", "1"]
    assert all(math.isfinite(loss) for loss in val_losses(text))


def bad_shard(tmp_path):
    """A --data prefix whose train shard is no shard."""
    (tmp_path / "bad_train_000000.bin").write_bytes(np.arange(1024, dtype="<i4").tobytes())
    return str(tmp_path / "bad")


BAD_FLAGS = [  # (flags, exit status, a piece of the one error line)
    (["--stepz=3"], 2, "unknown flag --stepz"),
    (["--steps=many"], 2, "--steps takes a value of type int"),
    (["steps=3"], 2, "expected --name=value"),
    (["--preset=huge"], 2, "--preset must be record, record_24gb or demo, got 'huge'"),
    (["--steps=0"], 2, "--steps must be at least 1"),
    (["--block_size=0"], 2, "block_size must be at least 1"),
    (["--n_layer=3"], 2, "n_layer must be even"),
    (["--t_lo=0.9", "--t_hi=0.5"], 2, "need 0 <= t_lo < t_hi <= 1"),
    (["--val_tokens=1000"], 2, "not a multiple of --seq_len"),
    (["--micro_batch=0"], 2, "--micro_batch must be at least 1"),
    (["--micro_batch=4"], 2, "--batch_size=2 sequences do not divide into forwards of --micro_batch=4 on 1 rank\n"),
    (["--autocast=fp16"], 2, "--autocast must be auto, bf16 or fp32"),
    (["--muon_lr=-1"], 2, "--muon_lr must not be negative"),
    (["--resume=/nonexistent/latest.pt"], 2, "is not a file"),
    (["--data=/nonexistent/fineweb"], 1, "python data/cached_finewebedu10B.py 10"),
    (["--estimator=iid"], 2, "unknown flag --estimator"),  # the training noise is noise.TRAIN_ESTIMATOR, not a flag
    (["--schedule=cosine"], 2, "unknown flag --schedule"),
]


@pytest.mark.parametrize("flags,status,message", BAD_FLAGS, ids=[" ".join(case[0]) for case in BAD_FLAGS])
def test_bad_flags_exit_with_one_line(tmp_path, capsys, flags, status, message):
    """In-process through train.main (the CLI's own entry point): the same exits, without a torch import each."""
    status_here, stderr = run_here(tmp_path, capsys, *SMALL, *flags)
    assert status_here == status
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr


def test_cli_exit_status_and_message(tmp_path):
    result = run_train(tmp_path, *SMALL, "--stepz=3", check=False)
    assert result.returncode == 2 and result.stderr == "error: unknown flag --stepz (see --help)\n"


def test_ranks_and_help_in_process(tmp_path, capsys, monkeypatch):
    """Through train.main, the command line's own entry point: a batch that 2 ranks cannot share, and --help."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    status, stderr = run_here(tmp_path, capsys, *SMALL, "--batch_size=3")
    assert status == 2
    assert stderr == "error: --batch_size=3 sequences do not divide into forwards of --micro_batch=1 on 2 ranks\n"
    monkeypatch.delenv("WORLD_SIZE")
    train.main(["--help"])
    stdout = capsys.readouterr().out
    assert all(f"--{name}=" in stdout for name in ("preset", "seq_len", "micro_batch", "muon_lr", "resume"))
    assert "preset record_24gb: --micro_batch=1" in stdout


def run_here(tmp_path, capsys, *flags) -> tuple[int, str]:
    """train.main in this process, in tmp_path, as the command line runs it, expected to exit: (its status, its
    stderr)."""
    with pytest.raises(SystemExit) as exit_info, contextlib.chdir(tmp_path):
        train.main(list(flags))
    return exit_info.value.code, capsys.readouterr().err


def test_bad_data_exits_with_one_line(tmp_path, capsys, one_thread):
    bad = bad_shard(tmp_path)
    status, stderr = run_here(tmp_path, capsys, *SMALL, f"--data={bad}")
    assert status == 1 and stderr.count("\n") == 1 and "bad magic 0" in stderr

    data = write_local_shards(tmp_path / "tiny", 1_000, 1_024)
    status, stderr = run_here(tmp_path, capsys, *SMALL, f"--data={data}", "--steps=50")
    assert status == 1 and stderr.count("\n") == 1
    assert re.search(r"^error: step \d+ of 50: training data exhausted", stderr)


def test_out_of_gpu_memory_names_micro_batch(tmp_path, capsys, monkeypatch):
    """A forward too large for the GPU ends with one line that says how to make it smaller (faked on CPU: the
    third step raises the error torch raises on CUDA)."""
    real_step = train.Run.train_step

    def train_step(run, step):
        if step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real_step(run, step)

    monkeypatch.setattr(train.Run, "train_step", train_step)
    status, stderr = run_here(tmp_path, capsys, *SMALL, "--micro_batch=2", "--steps=4", "--val_every=1",
                              "--run_id=oom")
    assert status == 1 and stderr.count("\n") == 1
    assert stderr == ("error: out of GPU memory with --micro_batch=2 sequences of 128 tokens per forward: lower "
                      "--micro_batch (--preset=record_24gb runs 1) (last checkpoint: checkpoints/oom/latest.pt)\n")
    assert torch.load(f"{tmp_path}/checkpoints/oom/latest.pt", weights_only=True)["step"] == 2


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, capsys, one_thread, trained_run):
    state = torch.load(trained_run.final, weights_only=True)  # at step 4
    state["model"]["head.weight"][0, 0] = float("nan")  # one poisoned weight makes every masked logit row NaN
    poisoned = f"{tmp_path}/poisoned.pt"
    torch.save(state, poisoned)
    with open(poisoned, "rb") as f:
        saved_bytes = f.read()
    status, stderr = run_here(tmp_path, capsys, *SMALL, "--run_id=nan", "--steps=6", "--val_every=1",
                              f"--resume={poisoned}")
    assert status == 1
    assert stderr == (f"error: train loss is nan at step 5; stopped before saving this step's weights "
                      f"(last checkpoint: {poisoned})\n")
    with open(poisoned, "rb") as f:
        assert f.read() == saved_bytes
    assert not os.path.exists(f"{tmp_path}/checkpoints/nan")


def test_resume_of_a_checkpoint_without_a_newer_config_field_takes_its_default(tmp_path, capsys, one_thread,
                                                                              trained_run):
    """A checkpoint written before ModelConfig had a field (here block_size) resumes with the field's default."""
    state = torch.load(trained_run.final, weights_only=True)
    del state["model_config"]["block_size"]
    torch.save(state, f"{tmp_path}/old.pt")
    with contextlib.chdir(tmp_path):
        train.main([*SMALL, "--run_id=resumed", "--steps=5", f"--resume={tmp_path}/old.pt"])
    assert "resumed:" in read_log(tmp_path, "resumed")


def test_resume_with_other_model_config_is_refused(tmp_path, capsys, trained_run):
    status, stderr = run_here(tmp_path, capsys, *SMALL, "--mlp_hidden=512", f"--resume={trained_run.final}")
    assert status == 2 and stderr.count("\n") == 1
    assert "different model config: mlp_hidden 256 (now 512)" in stderr


def test_muon_equals_torch_muon_and_fp32_newton_schulz_stays_close():
    """train.Muon with bf16 Newton-Schulz is torch.optim.Muon, bit for bit, over steps with changing LR and
    momentum; with fp32 Newton-Schulz (CPUs without bf16 kernels) it differs by bf16 rounding only."""
    torch.manual_seed(0)
    shapes = [(64, 32), (32, 96), (48, 48)]
    start = [torch.randn(shape) for shape in shapes]
    runs = {}
    for name in ("torch", "bf16", "fp32"):
        params = [torch.nn.Parameter(x.clone()) for x in start]
        if name == "torch":
            optimizer = torch.optim.Muon(params, lr=0.05, momentum=0.9, weight_decay=0.01)
        else:
            optimizer = train.Muon(params, lr=0.05, momentum=0.9, weight_decay=0.01,
                                   ns_dtype=torch.bfloat16 if name == "bf16" else torch.float32)
        gen = torch.Generator().manual_seed(1)
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            for group in optimizer.param_groups:
                group["lr"], group["momentum"] = 0.05 / (step + 1), 0.85 + 0.03 * step
            optimizer.step()
        runs[name] = params
    for reference, ours, fp32, initial in zip(runs["torch"], runs["bf16"], runs["fp32"], start):
        assert torch.equal(ours, reference)
        assert not torch.equal(reference, initial)
        moved = float((reference - initial).detach().abs().max())
        torch.testing.assert_close(fp32, reference, rtol=0, atol=0.03 * moved)
