"""bench.py's GPU estimates and its flags, on CPU in seconds: the FLOP, byte and op counts against the model, the
optimizers and model.model_flops_per_token. Nothing here times anything.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_bench.py
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bench
from model import BD3LM, ModelConfig, model_flops_per_token, train_noise
from train import Hyperparameters, Muon, make_optimizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = ModelConfig()
TINY = ModelConfig(vocab_size=256, eot_id=255, n_layer=2, n_head=2, head_dim=16, model_dim=32, mlp_hidden=64)


def part(parts: dict, prefix: str):
    return next(value for name, value in parts.items() if name.startswith(prefix))


def test_flops_agree_with_model_flops_per_token():
    seq_len = 8192
    hidden = bench.parameter_groups(RECORD)["hidden_matrices"]
    trunk = bench.trunk_matmul_flops(hidden, 2 * seq_len)
    per_layer = 4 * RECORD.model_dim * RECORD.n_head * RECORD.head_dim + 2 * RECORD.model_dim * RECORD.mlp_hidden
    assert trunk == 6 * RECORD.n_layer * per_layer * 2 * seq_len
    one_document = bench.document_stream(seq_len, 10**9, torch.Generator().manual_seed(0))
    tiles = bench.tile_fraction(one_document, RECORD.block_size)
    assert 0.25 < tiles < 0.26  # a quarter of [x_t ; x_0], plus the diagonal tiles
    model_count = 3 * bench.attention_forward_flops(RECORD, seq_len, tiles) + bench.head_flops(RECORD, 0.55 * seq_len)
    assert trunk + model_count == pytest.approx(model_flops_per_token(RECORD, seq_len) * seq_len, rel=0.02)


def test_memory_formula_matches_a_real_model_and_its_optimizers():
    torch.manual_seed(0)
    model = BD3LM(TINY)
    optimizers = make_optimizers(model, Hyperparameters(), fast_bf16=False)
    tokens = torch.randint(0, TINY.vocab_size, (64,))
    model(tokens, train_noise(64, TINY.block_size, 0.3, 0.8, torch.Generator().manual_seed(0))).backward()
    for optimizer in optimizers:
        optimizer.step()
    memory = bench.peak_memory(TINY, 64, bench.AFTER, 0.55)
    assert part(memory, "weights") == sum(p.numel() * p.element_size() for p in model.parameters())
    assert part(memory, "gradients") == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    states = [t for optimizer in optimizers for state in optimizer.state.values() for t in state.values()]
    assert part(memory, "optimizer states") == sum(t.numel() * t.element_size() for t in states)


def test_muon_eager_op_counts_match_the_code():
    class CountOps(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += not str(func).startswith("profiler.")
            return func(*args, **(kwargs or {}))

    wide, tall = torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(16, 8))
    for p in (wide, tall):
        p.grad = torch.randn_like(p)
    muon = Muon([wide, tall], lr=0.01, momentum=0.9, weight_decay=0.0, ns_dtype=torch.bfloat16)
    muon.step()  # the first step also creates the momentum buffers
    with CountOps() as counter:
        muon.step()
    assert counter.ops == 2 * (bench.MUON_OPS_PER_MATRIX + bench.MUON_OPS_PER_TURN) + 3


def test_after_is_no_slower_where_it_cannot_be():
    tiles, masked = 0.07, 0.55
    for gpu in bench.GPUS:
        before, after = (bench.step_parts(recipe, RECORD, 8192, 32 // gpu.count, gpu.count, tiles, masked)
                         for recipe in (bench.BEFORE, bench.AFTER))
        for name in ("trunk", "attention", "optimizer: Adam"):
            assert part(before, name).seconds(gpu) == part(after, name).seconds(gpu)
        assert part(after, "optimizer: Muon").seconds(gpu) <= part(before, "optimizer: Muon").seconds(gpu)
        assert part(after, "head").syncs == 0 < part(before, "head").syncs
    h100 = bench.gpu_spec("NVIDIA H100 80GB HBM3")
    before, after = (bench.step_parts(recipe, RECORD, 8192, 4, 8, tiles, masked)
                     for recipe in (bench.BEFORE, bench.AFTER))
    assert part(after, "head").seconds(h100) < part(before, "head").seconds(h100)
    assert part(after, "optimizer: Muon").seconds(h100) < part(before, "optimizer: Muon").seconds(h100) / 2


def test_gpu_spec_by_name():
    assert bench.gpu_spec("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert bench.gpu_spec("NVIDIA GeForce RTX 3090").name == "RTX 3090"
    assert bench.gpu_spec("NVIDIA A100-SXM4-80GB") is None


def test_estimate_only_prints_the_tables_and_times_nothing(monkeypatch, capsys):
    def no_timing(*args, **kwargs):
        raise AssertionError("--estimate_only timed something")

    for name in ("median_time", "matmul_peak", "TrainStep", "profile_step", "generate"):
        monkeypatch.setattr(bench, name, no_timing)
    bench.main(["--estimate_only=True"])
    out = capsys.readouterr().out
    assert "est.: computed from FLOPs and bytes, not measured" in out
    for heading in ("### 8x H100 SXM, --preset=record: per GPU and step 1 forward of 4 x 8192 tokens (before: 4 of 1)",
                    "### 1x RTX 3090, --preset=record_24gb: per GPU and step 32 forwards of 1 x 8192 tokens",
                    "### Peak memory per GPU by preset"):
        assert heading in out
    for row in ("| trunk matmuls |", "| attention (flex, ", "| head, softcap, cross-entropy |", "| optimizer: Muon |",
                "| communication: ", "| weights (fp32) |", "| **total** |"):
        assert row in out
    minutes = re.findall(r"\| \*\*record, minutes\*\* .*\| \*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\* \|", out)
    assert len(minutes) == 2 and all(float(after) < float(before) for before, after in minutes)
    totals = re.search(r"\| \*\*total\*\* \| \*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\* \|", out)
    assert float(totals[1]) < 80 and float(totals[2]) < 24  # record's 4 x 8K fit an H100, record_24gb's 8K a 3090
    assert float(totals[1]) > 24  # which is why the 24 GB preset exists


@pytest.mark.parametrize("flag", ["--nope=1", "--estimate_only=maybe", "--device=tpu", "quick"])
def test_bad_flag_is_one_line_and_exit_2(flag):
    result = subprocess.run([sys.executable, "bench.py", flag], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_help_lists_every_flag():
    result = subprocess.run([sys.executable, "bench.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0
    for name in ("device", "quick", "repeats", "checkpoint", "estimate_only"):
        assert f"--{name}=" in result.stdout
