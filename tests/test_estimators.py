"""The estimators of the training and validation noise (model.ESTIMATORS, eval_noise): the Monte-Carlo mean of each
equals the expectation it claims, computed exactly on a tiny case; the stratified draws do not depend on how a step
is cut over ranks and micro-steps; the gradient noise that bench.py --grad_variance reports (its table is tested in
test_bench.py). A few seconds on CPU.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_estimators.py
"""

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train
from model import BD3LM, ESTIMATORS, ModelConfig, Noise, eval_noise, stratified_levels, train_noise

N = 4  # tokens per block: 2**N masks, enumerated
SUBSETS = [frozenset(i for i in range(N) if bits >> i & 1) for bits in range(2**N)]


def fresh_table() -> np.ndarray:
    """A random CE[i, mask] for every token i and mask (a bit set): the stand-in for the model's cross-entropy,
    which depends on which other tokens of the block are masked."""
    return np.random.default_rng().uniform(0.5, 8.0, size=(N, 2**N))


def summed_ce(table: np.ndarray) -> np.ndarray:
    """L(S) per mask: the summed CE of the masked tokens."""
    return np.array([sum(table[i, bits] for i in SUBSETS[bits]) for bits in range(2**N)])


def mean_of_size(table: np.ndarray, k: int) -> float:
    """L_k: the mean of L(S) over the masks of exactly k tokens."""
    losses = summed_ce(table)
    return float(np.mean([losses[bits] for bits in range(2**N) if len(SUBSETS[bits]) == k]))


def count_range(lo: float, hi: float, least: int) -> range:
    return range(max(least, math.ceil(lo * N - 1e-6)), math.floor(hi * N + 1e-6) + 1)


def t_expectation(table: np.ndarray, lo: float, hi: float, resample: bool) -> float:
    """E over t ~ U(lo, hi) of (1/t) E[L(S)] with each token masked with probability t; under resample, the mask
    conditioned on lo <= |S| / N <= hi. Gauss-Legendre quadrature (the integrand is a polynomial, or a smooth
    ratio of polynomials)."""
    nodes, weights = np.polynomial.legendre.leggauss(60)
    t = lo + (hi - lo) * (nodes + 1) / 2
    losses, allowed = summed_ce(table), count_range(lo, hi, least=0)
    prob = np.stack([t ** len(S) * (1 - t) ** (N - len(S)) for S in SUBSETS])  # [masks, nodes]
    if resample:
        keep = np.array([len(S) in allowed for S in SUBSETS])[:, None]
        prob = prob * keep / (prob * keep).sum(0)
    return float((weights / 2) @ ((losses @ prob) / t))


def k_expectation(table: np.ndarray, lo: float, hi: float) -> float:
    allowed = count_range(lo, hi, least=1)
    return float(np.mean([N / k * mean_of_size(table, k) for k in allowed]))


def block_values(table: np.ndarray, noise: Noise) -> np.ndarray:
    """The estimate of every block of a noise of many N-token blocks: the sum of weight x CE over masked tokens."""
    masked = noise.masked.view(-1, N).numpy()
    bits = (masked * (1 << np.arange(N))).sum(1)
    ce = table[np.arange(N)[None, :], bits[:, None]]
    return (noise.weight.view(-1, N).numpy() * ce * masked).sum(1)


def monte_carlo(table: np.ndarray, estimator: str, lo: float, hi: float) -> tuple[float, float]:
    """Mean and standard error over 200 steps of 256 blocks each (one chunk a step: the stratified levels cover it)."""
    generator, steps, blocks = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31))), 200, 256
    means = []
    for step in range(steps):
        levels = stratified_levels(7, step, 0, 1, blocks) if ESTIMATORS[estimator].stratified else None
        noise = train_noise(blocks * N, N, lo, hi, generator, "linear", estimator, levels)
        means.append(block_values(table, noise).mean())
    return float(np.mean(means)), float(np.std(means, ddof=1) / steps**0.5)


@pytest.mark.parametrize("lo, hi", [(0.2, 0.8), (0.5, 1.0)])
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_monte_carlo_mean_is_the_claimed_expectation(estimator, lo, hi):
    table = fresh_table()
    rule = ESTIMATORS[estimator]
    exact = k_expectation(table, lo, hi) if rule.counts_masks else t_expectation(table, lo, hi, rule.resample)
    mean, stderr = monte_carlo(table, estimator, lo, hi)
    assert abs(mean - exact) < 4.5 * stderr, (mean, exact, stderr)


def test_the_expectations_differ_where_the_claims_do():
    """The test above can fail: on a clipped interval the claimed expectations are different numbers."""
    table = fresh_table()
    iid, resampled, counted = (t_expectation(table, 0.2, 0.8, False), t_expectation(table, 0.2, 0.8, True),
                               k_expectation(table, 0.2, 0.8))
    assert min(abs(iid - resampled), abs(iid - counted), abs(resampled - counted)) > 1e-3


def test_on_the_whole_interval_each_is_the_nelbo():
    """sum_k L_k / k: the continuous-time NELBO, by (1/t) C(N, k) t^k (1 - t)^(N - k) integrating to 1/k."""
    table = fresh_table()
    nelbo = sum(mean_of_size(table, k) / k for k in range(1, N + 1))
    assert t_expectation(table, 0.0, 1.0, False) == pytest.approx(nelbo, rel=1e-9)
    assert t_expectation(table, 0.0, 1.0, True) == pytest.approx(nelbo, rel=1e-9)  # nothing falls outside [0, 1]
    assert k_expectation(table, 0.0, 1.0) == pytest.approx(nelbo, rel=1e-12)


def test_val_estimators_are_unbiased_for_the_nelbo():
    """eval_noise on [0, 1]: exact_k (weights at most N) to a few standard errors; its error is far smaller than
    iid's at the same tokens."""
    table = fresh_table()
    nelbo = k_expectation(table, 0.0, 1.0)
    seed = int(np.random.default_rng().integers(2**20))
    values = {name: block_values(table, eval_noise(4096 * N, N, seed, 0, estimator=name))
              for name in ("iid", "exact_k")}
    exact_k = values["exact_k"]
    assert abs(exact_k.mean() - nelbo) < 4.5 * exact_k.std() / len(exact_k) ** 0.5
    assert exact_k.max() <= N * table.max() and values["iid"].std() > 1.5 * exact_k.std()


def test_exact_k_masks_exactly_k_tokens_at_weight_n_over_k():
    noise = train_noise(16 * 1000 + 5, 16, 0.3, 0.8, torch.Generator().manual_seed(0), estimator="exact_k")
    masked, weight = noise.masked[:16000].view(-1, 16), noise.weight[:16000].view(-1, 16)
    k = masked.sum(1)
    assert k.min() == 5 and k.max() == 12 and len(set(k.tolist())) == 8  # ceil(0.3 x 16) to floor(0.8 x 16)
    assert torch.equal(weight, torch.where(masked, 16 / k[:, None].float(), 0.0))
    assert noise.masked[16000:].sum() in (2, 3, 4)  # the last block has 5 tokens: k / 5 in [0.3, 0.8]


def test_resample_keeps_the_masked_fraction_in_the_interval():
    noise = train_noise(16 * 2000, 16, 0.3, 0.8, torch.Generator().manual_seed(1), estimator="resample")
    k = noise.masked.view(-1, 16).sum(1)
    assert k.min() >= 5 and k.max() <= 12
    iid = train_noise(16 * 2000, 16, 0.3, 0.8, torch.Generator().manual_seed(1))
    assert (iid.masked.view(-1, 16).sum(1) < 5).any()  # without resampling some fall outside


def test_interval_without_a_count_is_one_clear_error():
    with pytest.raises(ValueError, match="no masked count k of a 16-token block"):
        train_noise(32, 16, 0.32, 0.36, torch.Generator(), estimator="exact_k")
    with pytest.raises(ValueError, match="needs each block's level"):
        train_noise(32, 16, 0.3, 0.8, torch.Generator(), estimator="stratified")
    with pytest.raises(ValueError, match="from positions alone"):
        eval_noise(32, 16, 0, 0, estimator="stratified")


def test_stratified_levels_cover_every_stratum_once_per_step():
    chunks, blocks = 6, 5
    levels = torch.cat([stratified_levels(3, 11, chunk, chunks, blocks) for chunk in range(chunks)])
    assert sorted((levels * chunks * blocks).floor().long().tolist()) == list(range(chunks * blocks))
    one_chunk = stratified_levels(3, 11, 0, chunks, blocks)
    assert one_chunk.max() - one_chunk.min() > 0.5  # a chunk's blocks spread over the range
    assert not torch.equal(stratified_levels(3, 12, 0, chunks, blocks), one_chunk)  # a new offset every step


def step_noise(estimator: str, world_size: int, micro_batch: int, batch_size: int = 8, length: int = 64):
    """Every chunk's noise of step 5 as train.Run.noise_of draws it on each rank and micro-step, in batch order."""
    hp = SimpleNamespace(seed=2, batch_size=batch_size, estimator=estimator)
    by_chunk = {}
    for rank, micro_step in itertools.product(range(world_size), range(batch_size // (world_size * micro_batch))):
        run = SimpleNamespace(model=SimpleNamespace(config=ModelConfig(block_size=16)), hp=hp, rank=rank,
                              world_size=world_size, noise_generator=torch.Generator(), noise_interval=(0.3, 0.8))
        noise = train.Run.noise_of(run, 5, micro_step, micro_batch, length)
        for row in range(micro_batch):
            by_chunk[(micro_step * world_size + rank) * micro_batch + row] = noise.masked[row], noise.weight[row]
    return [by_chunk[chunk] for chunk in range(batch_size)]


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_a_steps_noise_does_not_depend_on_ranks_or_micro_steps(estimator):
    one = step_noise(estimator, 1, 8)
    for world_size, micro_batch in ((2, 4), (2, 1), (4, 2), (8, 1)):
        for (masked, weight), (masked_one, weight_one) in zip(step_noise(estimator, world_size, micro_batch), one):
            assert torch.equal(masked, masked_one) and torch.equal(weight, weight_one)


def test_iid_is_the_draw_of_before_the_estimators():
    """--estimator=iid keeps the training noise of earlier runs: t from the first uniform of each block, masks from
    the second row of the same draw."""
    length, generator = 100, torch.Generator().manual_seed(9)
    noise = train_noise(length, 16, 0.3, 0.8, generator)
    draws = torch.rand(2, length, generator=torch.Generator().manual_seed(9))
    index = torch.arange(length)
    t = 0.3 + 0.5 * draws[0, index - index % 16]
    assert torch.equal(noise.masked, draws[1] < t)
    assert torch.equal(noise.weight, torch.where(noise.masked, 1 / t, 0.0))


def tiny_model() -> BD3LM:
    torch.manual_seed(0)
    model = BD3LM(ModelConfig(vocab_size=64, n_layer=2, n_head=2, head_dim=8, model_dim=16, mlp_hidden=32,
                              block_size=4, eot_id=63))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_gradient_noise_against_the_per_draw_gradients():
    """train.gradient_noise (what bench.py --grad_variance and the clip search report) against the gradients of
    each draw taken one by one."""
    model, gen = tiny_model(), torch.Generator().manual_seed(1)
    chunks = list(enumerate(torch.randint(0, 63, (3, 32), generator=gen)))
    noise = train.gradient_noise(model, chunks, 3, 0.2, 0.9, "stratified", 5, seed=4)
    assert all(p.grad is None for p in model.parameters())  # dropped, as training expects between steps
    grads, losses = [], []
    for draw in range(5):
        model.zero_grad()
        total = 0.0
        for index, tokens in chunks:
            g = torch.Generator().manual_seed((4 << 32) + draw * 3 + index)
            n = train_noise(32, 4, 0.2, 0.9, g, estimator="stratified", levels=stratified_levels(4, draw, index, 3, 8))
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
