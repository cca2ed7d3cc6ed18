"""tools/clip_search.py: the bd3lms candidate intervals, the tail of the train stream it measures on, its table and
choice (the least gradient noise, tools/grad_variance.gradient_noise's, tested in test_grad_variance.py), and its
bad flags as one line. A tiny random model on CPU, a few seconds.

    OMP_NUM_THREADS=1 python -m pytest -q tests/tools/test_clip_search.py
"""

import re
from dataclasses import asdict

import pytest
import torch
from conftest import random_stream, save_checkpoint, small_model

import common
from data.shards import write_shard
from noise import TRAIN_ESTIMATOR
from sample import load_model
from tools import clip_search
from tools.grad_variance import gradient_noise
from train import Hyperparameters


@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory):
    """A tiny random model's checkpoint (32-token sequences, block 4) and a 1,000-token train shard."""
    folder = tmp_path_factory.mktemp("clip")
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    write_shard(folder / "train_000000.bin", random_stream(1000, gen).numpy().astype("uint16"))
    path = save_checkpoint(small_model(block_size=4, seed=int(torch.randint(100, ()))), folder / "tiny.pt", seq_len=32)
    return path, str(folder / "train_*.bin")


def run(capsys, *flags) -> str:
    clip_search.main(list(flags))
    return capsys.readouterr().out


def test_candidates_are_those_of_bd3lms():
    assert clip_search.candidates("0.5,1", 0.25) == [(0.0, 0.5), (0.25, 0.75), (0.5, 1.0), (0.0, 1.0)]
    default = clip_search.candidates(clip_search.Settings.widths, clip_search.Settings.step)
    assert len(default) == 11 + 9 + 7 + 5 + 3 + 1 and (0.45, 0.95) in default and (0.0, 1.0) in default


def test_the_tokens_are_the_tail_of_the_train_stream(tmp_path):
    write_shard(tmp_path / "train_000000.bin", torch.arange(600).numpy().astype("uint16"))
    write_shard(tmp_path / "train_000001.bin", torch.arange(600, 1000).numpy().astype("uint16"))
    chunks = clip_search.tail_chunks(str(tmp_path / "train_*.bin"), 300, 100)
    assert [int(chunk[0]) for chunk in chunks] == [700, 800, 900] and torch.equal(chunks[-1], torch.arange(900, 1000))


def test_table_lists_every_candidate_and_chooses_the_least_noisy(checkpoint_and_data, capsys):
    path, data = checkpoint_and_data
    out = run(capsys, f"--checkpoint={path}", f"--train_files={data}", "--widths=0.5,1", "--step=0.25",
              "--tokens=128", "--draws=3", "--estimator=stratified", "--device=cpu")
    rows = {(float(lo), float(hi)): float(relative)
            for lo, hi, relative in re.findall(r"^\| (\S+)-(\S+) \| (\S+) \|", out, re.M)}
    assert list(rows) == clip_search.candidates("0.5,1", 0.25)
    chosen = min(rows, key=rows.get)
    assert f"chosen:{chosen[0]:g}-{chosen[1]:g}" in out
    cpu = torch.device("cpu")
    model, _ = load_model(path, cpu)
    with common.autocast_context(cpu, common.fast_bf16(cpu)):  # as the tool measures
        direct = gradient_noise(model, clip_search.tail_chunks(data, 128, 32), 0.25, 0.75, "stratified", 3,
                                clip_search.CLIP_SEARCH_NOISE_SEED)
    assert rows[(0.25, 0.75)] == pytest.approx(direct.relative, rel=1e-5)


def test_without_train_files_it_reads_the_checkpoint_runs_data(tmp_path, capsys):
    """A checkpoint names its run's corpus by --data's prefix; the tool measures on that prefix's train shards."""
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    write_shard(tmp_path / "corpus_train_000000.bin", random_stream(1000, gen).numpy().astype("uint16"))
    model = small_model(block_size=4, seed=int(torch.randint(100, ())))
    hparams = Hyperparameters(**asdict(model.config), seq_len=32, data=str(tmp_path / "corpus"))
    common.save_checkpoint(str(tmp_path / "run.pt"), model, asdict(hparams))
    flags = [f"--checkpoint={tmp_path / 'run.pt'}", "--widths=1", "--step=1", "--tokens=64", "--draws=2",
             "--device=cpu"]
    table = [line for line in run(capsys, *flags).splitlines() if line.startswith("| 0-1 |")]
    explicit = run(capsys, *flags, f"--train_files={tmp_path}/corpus_train_*.bin")
    assert len(table) == 1 and table[0] in explicit.splitlines() and f"estimator {TRAIN_ESTIMATOR}" in explicit


@pytest.mark.parametrize("flags, message", [
    (["--widths=0.5,1.5"], "--widths must lie in (0, 1]"),
    (["--widths=wide"], "--widths takes comma-separated numbers"),
    (["--step=0"], "--step must lie in (0, 1]"),
    (["--draws=1"], "--draws must be at least 2"),
    (["--tokens=100"], "--tokens=100 is not a positive multiple of the run's seq_len 32"),
    (["--estimator=stratified_k"], "--estimator must be"),
])
def test_bad_flags_are_one_line(checkpoint_and_data, capsys, flags, message):
    path, data = checkpoint_and_data
    with pytest.raises(SystemExit) as exit_info:
        clip_search.main([f"--checkpoint={path}", f"--train_files={data}", "--device=cpu", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_a_missing_checkpoint_is_one_line(capsys):
    with pytest.raises(SystemExit):
        clip_search.main(["--device=cpu"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--checkpoint=PATH is required" in err
