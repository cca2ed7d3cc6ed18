"""bench.py and costmodel.py on CPU in seconds: the cost model's FLOP, byte and op counts against the model, the
optimizers and costmodel.model_flops_per_token, bench's estimate tables and its flags. Nothing here asserts on a time.

    OMP_NUM_THREADS=1 python -m pytest -q tests/tools/test_bench.py
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from torch.utils._python_dispatch import TorchDispatchMode

from model import BD3LM, ModelConfig
from noise import ESTIMATORS, TRAIN_ESTIMATOR, step_noise
from sample import SAMPLERS, Stats
from tools import bench
from tools import costmodel as cm
from train import Hyperparameters, Muon, make_optimizers

RECORD = ModelConfig()
TINY = ModelConfig(vocab_size=256, n_layer=2, n_head=2, head_dim=16, model_dim=32, mlp_hidden=64)
H100 = cm.gpu_spec("NVIDIA H100 80GB HBM3")


def part(parts: dict, prefix: str):
    return next(value for name, value in parts.items() if name.startswith(prefix))


def run_bench(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/bench.py", *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_flops_agree_with_model_flops_per_token():
    seq_len = 8192
    one_document = cm.document_stream(seq_len, 10**9, torch.Generator().manual_seed(0))
    tiles = cm.tile_fraction(one_document, RECORD.block_size)
    assert 0.25 < tiles < 0.26  # a quarter of [x_t ; x_0], plus the diagonal tiles
    parts = cm.step_parts(RECORD, seq_len, 1, 1, tiles)
    per_layer = 4 * RECORD.model_dim * RECORD.n_head * RECORD.head_dim + 2 * RECORD.model_dim * RECORD.mlp_hidden
    trunk = part(parts, "trunk matmuls").flops
    assert trunk == 6 * RECORD.n_layer * per_layer * 2 * seq_len
    # the compiled loss runs the head on every noisy row; the model's count only on the masked fraction of them
    masked = cm.training_masked_fraction(Hyperparameters())
    attention_forward = part(parts, "attention").flops / (1 + cm.FLASH_BACKWARD)
    model_count = trunk + 3 * attention_forward + masked * part(parts, "head").flops
    assert model_count == pytest.approx(cm.model_flops_per_token(RECORD, seq_len, masked) * seq_len, rel=0.02)
    assert part(parts, "head").flops == 6 * RECORD.model_dim * RECORD.padded_vocab * seq_len


def test_masked_fraction_comes_from_the_estimator_and_the_masking_range():
    # proposal (train.py's): k drawn with probability k c_k / 16, E[k] / 16 = mean t + (1 - mean t) / 16; iid: mean t
    assert TRAIN_ESTIMATOR == "proposal"
    assert cm.training_masked_fraction(Hyperparameters()) == pytest.approx(0.55 + 0.45 / 16)
    assert cm.training_masked_fraction(Hyperparameters(), "iid") == pytest.approx(0.55)
    assert cm.training_masked_fraction(Hyperparameters(t_lo=0.1, t_hi=0.5), "stratified") == pytest.approx(0.3)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_masked_fraction_is_the_mean_of_drawn_training_noise(estimator):
    hp, seed = Hyperparameters(t_lo=0.2, t_hi=0.7), int(torch.randint(2**20, ()))
    masked = torch.stack([step_noise(4096, 16, 0.2, 0.7, seed, step, 0, 1, estimator=estimator).masked
                          for step in range(64)])
    # 0.006: about 4 standard errors of the mean over 64 x 256 blocks
    assert masked.float().mean().item() == pytest.approx(cm.training_masked_fraction(hp, estimator), abs=0.006)


def test_memory_formula_matches_a_real_model_and_its_optimizers():
    torch.manual_seed(0)
    model = BD3LM(TINY)
    optimizers = make_optimizers(model, Hyperparameters(), fast_bf16=False)
    tokens = torch.randint(0, TINY.vocab_size, (64,))
    model(tokens, step_noise(64, TINY.block_size, 0.3, 0.8, 0, 0, 0, 1)).backward()
    for optimizer in optimizers:
        optimizer.step()
    memory = cm.peak_memory(TINY, 64)
    assert part(memory, "weights") == sum(p.numel() * p.element_size() for p in model.parameters())
    assert part(memory, "gradients") == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    states = [t for optimizer in optimizers for state in optimizer.state.values() for t in state.values()]
    assert part(memory, "optimizer states") == sum(t.numel() * t.element_size() for t in states)


def test_memory_grows_with_the_tokens_per_forward_only_in_the_activations_and_loss():
    one, four = cm.peak_memory(RECORD, 8192), cm.peak_memory(RECORD, 4 * 8192)
    for name in one:
        grows = name.startswith(("trunk activations", "head and loss"))
        assert four[name] == (4 * one[name] if grows else one[name])


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
    assert counter.ops == 2 * (cm.MUON_OPS_PER_MATRIX + cm.MUON_OPS_PER_TURN) + 3


def test_ranks_share_muon_and_pay_only_for_communication():
    tiles = 0.07
    one, eight = (cm.step_parts(RECORD, 8192, 4, world_size, tiles) for world_size in (1, 8))
    for name in ("trunk", "attention", "head", "optimizer: Adam"):
        assert part(one, name) == part(eight, name)  # per GPU, the same sequences cost the same
    assert part(eight, "optimizer: Muon").seconds(H100) < part(one, "optimizer: Muon").seconds(H100) / 2
    assert part(one, "communication").bus_bytes == 0
    params = cm.numel(p for group in cm.parameter_groups(RECORD).values() for p in group)
    # one ring all-reduce of every fp32 gradient, plus the last Muon turn's all-gather of bf16 updates
    assert part(eight, "communication").bus_bytes > 2 * 7 / 8 * 4 * params


def test_gpu_spec_by_name():
    assert H100.name == "H100 SXM"
    assert cm.gpu_spec("NVIDIA GeForce RTX 3090").name == "RTX 3090"
    assert cm.gpu_spec("NVIDIA A100-SXM4-80GB") is None


def test_estimate_only_prints_the_tables_and_times_nothing(monkeypatch, capsys):
    def no_timing(*args, **kwargs):
        raise AssertionError("--estimate_only timed something")

    for name in ("median_time", "train_step", "matmul_table", "profile_table", "generate"):
        monkeypatch.setattr(bench, name, no_timing)
    bench.main(["--estimate_only=True"])
    out = capsys.readouterr().out
    assert "est.: computed from FLOPs and bytes, not measured" in out and cm.RECIPE in out
    for heading in ("### 8x H100 SXM, --preset=record: per GPU and step 1 forward of 4 x 8192 tokens\n",
                    "### 1x RTX 3090, --preset=record_24gb: per GPU and step 32 forwards of 1 x 8192 tokens\n",
                    "### Peak memory per GPU by preset"):
        assert heading in out
    for row in ("| trunk matmuls |", "| attention (flex, ", "| head, softcap, cross-entropy (every noisy row) |",
                "| optimizer: Muon |", "| communication: ", "| weights (fp32) |", "| **total** |"):
        assert row in out
    assert not re.search(r"before,|after,|before ->|issue|\.md\b", out)  # the current recipe, in this repository
    minutes = re.findall(r"\| \*\*record, minutes\*\* \(3500 steps\) \|  \| \*\*([\d.]+)\*\* \|", out)
    assert len(minutes) == 2 and float(minutes[0]) < float(minutes[1])  # 8x H100 before 1x RTX 3090
    totals = re.search(r"\| \*\*total\*\* \| \*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\* \|", out)
    assert float(totals[1]) < 80 and float(totals[2]) < 24  # record's 4 x 8K fit an H100, record_24gb's 8K a 3090
    assert float(totals[1]) > 24  # which is why the 24 GB preset exists


def test_sampling_table_has_a_row_per_registry_sampler_with_and_without_cache(monkeypatch, capsys):
    calls = []

    def fake_generate(model, prompt, settings, generator):
        calls.append((settings.sampler, settings.max_new_tokens, settings.kv_cache))
        return None, Stats(new_tokens=settings.max_new_tokens, forwards=settings.max_new_tokens)

    monkeypatch.setattr(bench, "generate", fake_generate)
    monkeypatch.setattr(bench, "median_time", lambda fn, *args, **kwargs: fn() or 1.0)
    bench.sampling_table("", quick=True, device=torch.device("cpu"), repeats=1)
    assert calls == [(name, n, cache) for name in SAMPLERS for n, cache in ((256, True), (256, False), (1024, True))]
    rows = [line.split(" | ")[:3] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert rows == [[f"| {name}", str(n), "yes" if cache else "no"] for name, n, cache in calls]


@pytest.mark.parametrize("flag", ["--nope=1", "--estimate_only=maybe", "--device=tpu", "--repeats=0", "quick"])
def test_bad_flag_is_one_line_and_exit_2(flag, capsys):
    """In-process through bench.main, the command line's own entry point."""
    with pytest.raises(SystemExit) as exit_info:
        bench.main([flag])
    out = capsys.readouterr()
    assert exit_info.value.code == 2
    assert out.err.startswith("error: ") and out.err.count("\n") == 1
    assert out.out == ""


def test_cli_help_lists_every_flag_and_a_bad_flag_exits_2():
    result = run_bench("--help")
    assert result.returncode == 0
    for name in ("device", "quick", "repeats", "checkpoint", "estimate_only"):
        assert f"--{name}=" in result.stdout
    result = run_bench("--nope=1")
    assert result.returncode == 2 and result.stderr == "error: unknown flag --nope (see --help)\n" and not result.stdout
