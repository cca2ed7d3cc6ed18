"""--clip_search of train.py: the interval it picks and trains with, exact resume, and the same choice on 1 and 2
ranks (its criterion, train.gradient_noise, is tested in test_estimators.py). Small models on CPU, through
train.py's command line (about a minute on 2 cores).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_clip_search.py
"""

import re
import sys

import pytest
import torch
from conftest import SMALL, load_final, read_log, run_train, val_losses

import train
from data.loader import DataExhausted, TokenLoader
from data.shards import write_shard
from tools.demo_corpus import prepare_demo

# four candidates, none of them the default (0.3, 0.8): a run that ignored the choice would train differently
WIDTHS, STEP = "0.5,1", 0.25
CLIP = [*SMALL, "--clip_search=True", f"--clip_search_widths={WIDTHS}", f"--clip_search_step={STEP}",
        "--clip_search_tokens=512"]
RUN = ["--steps=4", "--val_every=2", "--save_every=2", "--save_final=True"]


def searches(log_text) -> list[tuple[int, tuple[float, float], dict]]:
    """(step, chosen interval, {candidate interval: variance}) of every clip_search line of a log."""
    found = []
    for match in re.finditer(r"^clip_search step:(\d+) chosen:(\S+?)-(\S+) var:\S+ time:\d+ms candidates: (.*)$",
                             log_text, re.M):
        variances = {(float(lo), float(hi)): float(variance)
                     for lo, hi, variance in re.findall(r"(\S+?)-(\S+?)=(\S+)", match.group(4))}
        found.append((int(match.group(1)), (float(match.group(2)), float(match.group(3))), variances))
    return found


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """One 4-step run with --clip_search: searches at steps 0 and 2, a checkpoint at step 2, the final weights."""
    prepare_demo()
    folder = tmp_path_factory.mktemp("clip")
    run_train(folder, *CLIP, *RUN, "--run_id=clip")
    return folder


def test_held_out_chunks_are_the_tail_the_loader_never_reads(tmp_path):
    path = f"{tmp_path}/train_000000.bin"
    write_shard(path, torch.arange(1000, dtype=torch.int32).numpy().astype("uint16"))
    loader = TokenLoader([path], 100, align_to_documents=False, held_out_tokens=300)
    read = [int(loader.next_batch()[0, 0]) for _ in range(7)]
    with pytest.raises(DataExhausted):
        loader.next_batch()
    assert read == list(range(0, 700, 100))
    assert [(index, int(tokens[0])) for index, tokens in train.held_out_chunks(loader, 0, 1)] == \
        [(0, 700), (1, 800), (2, 900)]
    assert [index for index, _ in train.held_out_chunks(loader, 1, 2)] == [1]


def test_candidates_are_those_of_bd3lms():
    assert train.clip_candidates(WIDTHS, STEP) == [(0.0, 0.5), (0.25, 0.75), (0.5, 1.0), (0.0, 1.0)]
    candidates = train.clip_candidates(train.Hyperparameters.clip_search_widths, train.Hyperparameters.clip_search_step)
    assert len(candidates) == 11 + 9 + 7 + 5 + 3 + 1 and (0.45, 0.95) in candidates and (0.0, 1.0) in candidates


def test_search_logs_a_choice_at_every_validation_and_training_uses_it(clip_run, tmp_path):
    text = read_log(clip_run, "clip")
    found = searches(text)
    assert [step for step, _, _ in found] == [0, 2]  # every validation but the last, after which nothing trains
    for _, chosen, variances in found:
        assert list(variances) == train.clip_candidates(WIDTHS, STEP)
        assert chosen == min(variances, key=variances.get)
    assert load_final(clip_run, "clip")["noise_interval"] == found[-1][1]

    # steps 1 and 2 train with the interval chosen at step 0: the same weights as a run fixed to it
    (t_lo, t_hi) = found[0][1]
    run_train(tmp_path, *SMALL, *RUN, f"--t_lo={t_lo}", f"--t_hi={t_hi}", "--run_id=fixed")
    searched = torch.load(f"{clip_run}/checkpoints/clip/latest.pt", weights_only=True)
    fixed = torch.load(f"{tmp_path}/checkpoints/fixed/latest.pt", weights_only=True)
    assert searched["step"] == fixed["step"] == 2
    for name, tensor in fixed["model"].items():
        assert torch.equal(searched["model"][name], tensor), name


def test_resume_restores_the_chosen_interval_exactly(clip_run):
    checkpoint = f"{clip_run}/checkpoints/clip/latest.pt"
    whole = read_log(clip_run, "clip")
    assert torch.load(checkpoint, weights_only=True)["noise_interval"] == searches(whole)[1][1]
    run_train(clip_run, *CLIP, *RUN, "--run_id=resumed", f"--resume={checkpoint}")
    resumed = read_log(clip_run, "resumed")
    assert searches(resumed) == []  # step 2's search is in the checkpoint; step 4 is the last
    assert val_losses(resumed)[-1] == val_losses(whole)[-1]
    weights_whole, weights_resumed = load_final(clip_run, "clip")["model"], load_final(clip_run, "resumed")["model"]
    for name, tensor in weights_whole.items():
        assert torch.equal(weights_resumed[name], tensor), name


def test_two_ranks_choose_as_one(clip_run, tmp_path):
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py")
    run_train(tmp_path, *CLIP, *RUN, "--run_id=two", launcher=torchrun)
    one, two = searches(read_log(clip_run, "clip")), searches(read_log(tmp_path, "two"))
    assert [(step, chosen) for step, chosen, _ in two] == [(step, chosen) for step, chosen, _ in one]
    for (_, _, variances_one), (_, _, variances_two) in zip(one, two):
        assert variances_two == pytest.approx(variances_one, rel=1e-5)
    weights_one, weights_two = load_final(clip_run, "clip")["model"], load_final(tmp_path, "two")["model"]
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=0, atol=1e-5, msg=name)
