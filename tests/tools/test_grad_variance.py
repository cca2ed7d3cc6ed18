"""tools/grad_variance.py: its gradient noise against the gradients of each draw taken one by one, a row per
estimator, and the comparison estimators exact_k and stratified_k (k uniform on the interval's counts, weight n / k).
A tiny random model on CPU, seconds.

    OMP_NUM_THREADS=1 python -m pytest -q tests/tools/test_grad_variance.py
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import small_model

from noise import ESTIMATORS, Noise, step_noise
from tools import grad_variance
from tools.grad_variance import COMPARED, estimator_noise, gradient_noise, sequence_noise


def test_gradient_noise_against_the_per_draw_gradients():
    model, gen = small_model(block_size=4, seed=int(torch.randint(100, ()))), torch.Generator().manual_seed(1)
    chunks = list(torch.randint(0, 96, (3, 32), generator=gen))
    noise = gradient_noise(model, chunks, 0.2, 0.9, "stratified", 5, seed=4)
    assert all(p.grad is None for p in model.parameters())  # dropped, as training expects between steps
    grads, losses = [], []
    for draw in range(5):
        model.zero_grad()
        total = 0.0
        for index, tokens in enumerate(chunks):
            n = step_noise(32, 4, 0.2, 0.9, 4, draw, index, 3, estimator="stratified")
            loss = model(tokens[None], Noise(*(x[None] for x in n))) / 3
            loss.backward()
            total += float(loss.detach())
        grads.append(torch.cat([p.grad.flatten().double() for p in model.parameters()]))
        losses.append(total)
    grads = torch.stack(grads)
    variance = float((grads - grads.mean(0)).square().sum(1).sum() / 4)
    assert noise.variance == pytest.approx(variance, rel=1e-6)
    assert noise.signal == pytest.approx(float(grads.mean(0).square().sum()) - variance / 5, rel=1e-6)
    assert noise.loss_variance == pytest.approx(float(np.var(losses, ddof=1)), rel=1e-6)


def test_a_row_per_estimator():
    """Every estimator on the same chunks; at uniform predictions exact_k's loss (k tokens at weight n / k) does not
    vary while iid's does."""
    model, gen = small_model(block_size=16), torch.Generator().manual_seed(2)
    chunks = list(torch.randint(0, 96, (2, 32), generator=gen))
    noise = estimator_noise(model, chunks, 0.3, 0.8, 3)
    assert list(noise) == list(COMPARED) == [*ESTIMATORS, "exact_k", "stratified_k"]
    assert all(n.variance > 0 and n.loss > 0 for n in noise.values())
    with torch.no_grad():
        model.head.weight.zero_()
    flat = estimator_noise(model, chunks, 0.3, 0.8, 3)
    assert flat["exact_k"].loss_variance < 1e-9 < flat["iid"].loss_variance


@pytest.mark.parametrize("name", ["exact_k", "stratified_k"])
def test_exact_k_masks_exactly_k_tokens_at_weight_n_over_k(name):
    noise = sequence_noise(16 * 1000 + 5, 16, 0.3, 0.8, 0, 0, 0, 1, name)
    masked, weight = noise.masked[:16000].view(-1, 16), noise.weight[:16000].view(-1, 16)
    k = masked.sum(1)
    assert k.min() == 5 and k.max() == 12 and len(set(k.tolist())) == 8  # ceil(0.3 x 16) to floor(0.8 x 16)
    assert torch.equal(weight, torch.where(masked, 16 / k[:, None].float(), 0.0))
    assert noise.masked[16000:].sum() in (2, 3, 4)  # the last block has 5 tokens: k / 5 in [0.3, 0.8]
    short = sequence_noise(16 + 1, 16, 0.3, 0.8, 0, 0, 0, 1, name)  # no count of 1 token fits
    assert short.masked[16:].all() and short.weight[16:].isnan().all()


@pytest.mark.parametrize("name", ESTIMATORS)
def test_train_estimators_draw_train_py_noise(name):
    expected, drawn = (f(100, 16, 0.3, 0.8, 3, 2, 1, 4, estimator=name) for f in (step_noise, sequence_noise))
    assert all(torch.equal(x, y) for x, y in zip(expected, drawn))


def test_bad_flags_are_one_line(capsys):
    for flags, message in ((["--draws=1"], "--draws must be at least 2"),
                           (["--initial=False"], "nothing to measure"),
                           (["--checkpoint=/nonexistent.pt"], "is not a file")):
        with pytest.raises(SystemExit) as exit_info:
            grad_variance.main(flags)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_runs_as_a_script_from_anywhere(tmp_path):
    """`python tools/grad_variance.py` finds the repository's modules from any working directory."""
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools",
                        "grad_variance.py")
    result = subprocess.run([sys.executable, tool, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--draws=16" in result.stdout and "--checkpoint=" in result.stdout
