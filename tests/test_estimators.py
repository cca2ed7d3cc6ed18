"""The estimators of the training and validation noise (noise.ESTIMATORS; eval_noise and eval.iid_noise): every
training estimator's drawn noise weighs each L_k by the records' c_k (and stratified_k's does not); the Monte-Carlo
mean of each equals the expectation it claims, computed exactly on a tiny case; the stratified draws do not depend on
how a step is cut over ranks and micro-steps. A few seconds on CPU.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_estimators.py
"""

import functools
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train
from eval import iid_noise
from noise import (ESTIMATORS, TRAIN_ESTIMATOR, Noise, count_coefficients, count_noise, eval_noise,
                   sequence_generator, step_noise, stratified_levels, train_noise)
from tools.costmodel import training_masked_fraction

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


def t_expectation(table: np.ndarray, lo: float, hi: float) -> float:
    """E over t ~ U(lo, hi) of (1/t) E[L(S)] with each token masked with probability t: the records' clipped loss.
    Gauss-Legendre quadrature (the integrand is a polynomial)."""
    nodes, weights = np.polynomial.legendre.leggauss(60)
    t = lo + (hi - lo) * (nodes + 1) / 2
    prob = np.stack([t ** len(S) * (1 - t) ** (N - len(S)) for S in SUBSETS])  # [masks, nodes]
    return float((weights / 2) @ ((summed_ce(table) @ prob) / t))


def k_expectation(table: np.ndarray, lo: float, hi: float) -> float:
    """exact_k's: the mean over the counts k >= 1 with lo <= k / N <= hi of (N / k) L_k."""
    allowed = range(max(1, math.ceil(lo * N - 1e-6)), math.floor(hi * N + 1e-6) + 1)
    return float(np.mean([N / k * mean_of_size(table, k) for k in allowed]))


def quadrature_coefficients(n: int, lo: float, hi: float) -> np.ndarray:
    """c_1..c_n = 1/(hi - lo) integral_lo^hi C(n, k) t^(k-1) (1-t)^(n-k) dt by Gauss-Legendre, exact for the
    polynomial integrand."""
    nodes, weights = np.polynomial.legendre.leggauss(n + 1)
    t = lo + (hi - lo) * (nodes + 1) / 2
    return np.array([(weights / 2) @ (math.comb(n, k) * t ** (k - 1) * (1 - t) ** (n - k)) for k in range(1, n + 1)])


def stratified_k(length: int, block_size: int, lo: float, hi: float, seed: int, step: int, chunk: int,
                 chunks: int) -> Noise:
    """The old default, as step_noise would draw it: k uniform on the counts with lo <= k / n <= hi, stratified over
    the blocks, weight n / k."""
    bounds = torch.full((block_size, block_size), 2.0, dtype=torch.float64)
    weights = torch.zeros(block_size, block_size, dtype=torch.float64)
    for n in range(1, block_size + 1):
        k = torch.arange(1, n + 1, dtype=torch.float64)
        allowed = (k >= lo * n - 1e-6) & (k <= hi * n + 1e-6)
        bounds[n - 1, : n - 1], weights[n - 1, :n] = (allowed / allowed.sum()).cumsum(0)[:-1], n / k
    levels = stratified_levels(seed, step, chunk, chunks, -(-length // block_size)).repeat_interleave(block_size)
    uniforms = torch.rand(length, generator=sequence_generator(seed, step, chunk, chunks))
    return count_noise(bounds, weights, levels[:length], uniforms, block_size)


def drawn_coefficients(estimator, lo: float, hi: float, n: int, steps: int, sequences: int,
                       full_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """The coefficient of L_k, k = 1..n, in the drawn noise's loss: E[w 1{K = k}] over blocks of n tokens whose K
    masked tokens weigh w each (given K, they are a uniform K-subset, so the block's loss is w L_K in expectation),
    from train.py's noise of `steps` steps of `sequences` sequences. The blocks of n tokens: the full ones if n is
    16, else each sequence's last. Returns the mean and its standard error as if the blocks were independent, which
    bounds the error of stratified draws."""
    seed, length = int(np.random.default_rng().integers(2**31)), 16 * full_blocks + (n % 16)
    blocks = slice(0, 16 * full_blocks) if n == 16 else slice(16 * full_blocks, length)
    draw = estimator if callable(estimator) else functools.partial(step_noise, estimator=estimator)
    noises = [draw(length, 16, lo, hi, seed, step, chunk, sequences)
              for step in range(steps) for chunk in range(sequences)]
    masked = torch.stack([x.masked[blocks] for x in noises]).reshape(-1, n).double()
    weight = torch.stack([x.weight[blocks] for x in noises]).reshape(-1, n).double()
    w = weight.max(1, keepdim=True).values
    assert torch.all((weight == w) | (masked == 0))  # one weight per block
    terms = w * torch.nn.functional.one_hot(masked.sum(1).long(), n + 1)[:, 1:]  # [blocks, k]: w 1{K = k}
    return terms.mean(0).numpy(), (terms.std(0) / len(terms) ** 0.5).numpy()


def matches(drawn: tuple[np.ndarray, np.ndarray], exact: np.ndarray) -> bool:
    """Every coefficient within 5 standard errors of the exact one (plus float32 rounding of the weights)."""
    mean, stderr = drawn
    return bool(np.all(np.abs(mean - exact) <= 5 * stderr + 1e-6 * exact))


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_each_estimator_weighs_every_count_by_the_records_coefficient(estimator):
    """The records' objective, per 16-token block: sum_k c_k L_k, k = 1..16. Each training estimator's drawn noise
    has those coefficients; stratified_k's (k in 5..12 at weight 16 / k) fails the same check."""
    lo, hi = 0.3, 0.8
    exact = quadrature_coefficients(16, lo, hi)
    assert np.allclose(count_coefficients(16, lo, hi).numpy(), exact, rtol=1e-12, atol=0)
    assert np.sum(np.arange(1, 17) * exact) == pytest.approx(16)
    drawn = drawn_coefficients(estimator, lo, hi, 16, steps=100, sequences=8, full_blocks=128)
    assert drawn[1].max() < 0.02 * exact.max()  # sampling error far below stratified_k's bias (0.22 at k = 5)
    assert matches(drawn, exact), np.stack([np.arange(1, 17), exact, *drawn], 1)
    old = drawn_coefficients(stratified_k, lo, hi, 16, steps=100, sequences=8, full_blocks=128)
    assert not matches(old, exact)
    assert np.all(old[0][:4] == 0) and np.all(old[0][12:] == 0)  # and 19.7% of the c_k lie outside 5..12
    assert 1 - exact[4:12].sum() / exact.sum() == pytest.approx(0.197, abs=0.001)


@pytest.mark.parametrize("n", [5, 11])
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_a_short_block_gets_its_own_coefficients(estimator, n):
    """A sequence of n < 16 tokens is one short block: its coefficients are c_k of n. (One block per sequence keeps
    the step's levels stratified over the short blocks.)"""
    exact = quadrature_coefficients(n, 0.3, 0.8)
    assert matches(drawn_coefficients(estimator, 0.3, 0.8, n, steps=8, sequences=400, full_blocks=0), exact)


def test_count_coefficients_are_the_quadrature_on_any_interval():
    for n, lo, hi in ((16, 0.0, 1.0), (16, 0.1, 0.4), (7, 0.5, 0.55), (1, 0.3, 0.8), (3, 0.0, 0.2)):
        exact = quadrature_coefficients(n, lo, hi)
        assert np.allclose(count_coefficients(n, lo, hi).numpy(), exact, rtol=1e-10, atol=1e-15), (n, lo, hi)
    assert np.allclose(count_coefficients(16, 0.0, 1.0).numpy(), 1 / np.arange(1, 17))  # the NELBO's 1 / k


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
        levels = stratified_levels(7, step, 0, 1, blocks) if estimator != "iid" else None
        noise = train_noise(blocks * N, N, lo, hi, generator, estimator, levels)
        means.append(block_values(table, noise).mean())
    return float(np.mean(means)), float(np.std(means, ddof=1) / steps**0.5)


@pytest.mark.parametrize("lo, hi", [(0.2, 0.8), (0.5, 1.0)])
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_monte_carlo_mean_is_the_clipped_loss(estimator, lo, hi):
    """Where a token's CE depends on which others are masked: the mean of each estimator's loss is iid's."""
    table = fresh_table()
    exact = t_expectation(table, lo, hi)
    mean, stderr = monte_carlo(table, estimator, lo, hi)
    assert abs(mean - exact) < 4.5 * stderr, (mean, exact, stderr)


def test_exact_k_claims_another_expectation_on_a_clipped_interval():
    """The test above can fail: counting k uniformly on the clipped interval changes the number."""
    table = fresh_table()
    assert abs(t_expectation(table, 0.2, 0.8) - k_expectation(table, 0.2, 0.8)) > 1e-3


def test_on_the_whole_interval_each_is_the_nelbo():
    """sum_k L_k / k: the continuous-time NELBO, by (1/t) C(N, k) t^k (1 - t)^(N - k) integrating to 1/k."""
    table = fresh_table()
    nelbo = sum(mean_of_size(table, k) / k for k in range(1, N + 1))
    assert t_expectation(table, 0.0, 1.0) == pytest.approx(nelbo, rel=1e-9)
    assert k_expectation(table, 0.0, 1.0) == pytest.approx(nelbo, rel=1e-12)


def test_val_estimators_are_unbiased_for_the_nelbo():
    """On [0, 1]: eval_noise's exact_k (weights at most N) to a few standard errors; its error is far smaller than
    iid's at the same tokens."""
    table = fresh_table()
    nelbo = k_expectation(table, 0.0, 1.0)
    seed = int(np.random.default_rng().integers(2**20))
    values = {"iid": block_values(table, iid_noise(4096 * N, N, seed, 0, "linear")),
              "exact_k": block_values(table, eval_noise(4096 * N, N, seed, 0))}
    exact_k = values["exact_k"]
    assert abs(exact_k.mean() - nelbo) < 4.5 * exact_k.std() / len(exact_k) ** 0.5
    assert exact_k.max() <= N * table.max() and values["iid"].std() > 1.5 * exact_k.std()


def test_proposal_masks_exactly_k_tokens_at_weight_n_over_k():
    noise = step_noise(16 * 1000 + 5, 16, 0.3, 0.8, 0, 0, 0, 1, estimator="proposal")
    masked, weight = noise.masked[:16000].view(-1, 16), noise.weight[:16000].view(-1, 16)
    k = masked.sum(1)
    assert k.min() >= 1 and k.max() <= 16 and len(set(k.tolist())) >= 12  # 1..16, the rare ends aside
    assert torch.equal(weight, torch.where(masked, 16 / k[:, None].float(), 0.0))
    tail = int(noise.masked[16000:].sum())
    assert 1 <= tail <= 5 and torch.equal(noise.weight[16000:], torch.where(noise.masked[16000:], 5 / tail, 0.0))


def test_masked_fraction_is_the_mean_of_drawn_training_noise():
    for estimator in ESTIMATORS:
        masked = torch.cat([step_noise(4096, 16, 0.2, 0.7, 5, step, 0, 1, estimator=estimator).masked
                            for step in range(64)])
        # 0.006: about 4 standard errors of the mean over 64 x 256 blocks
        assert masked.float().mean().item() == pytest.approx(
            training_masked_fraction(train.Hyperparameters(t_lo=0.2, t_hi=0.7, block_size=16), estimator), abs=0.006)


def test_bad_estimator_settings_are_one_clear_error():
    with pytest.raises(ValueError, match="needs each block's level"):
        train_noise(32, 16, 0.3, 0.8, torch.Generator(), estimator="stratified")
    with pytest.raises(ValueError, match="must be iid, stratified, proposal, not 'stratified_k'"):
        step_noise(32, 16, 0.3, 0.8, 0, 0, 0, 1, "stratified_k")
    assert TRAIN_ESTIMATOR == "proposal"


def test_stratified_levels_cover_every_stratum_once_per_step():
    chunks, blocks = 6, 5
    levels = torch.cat([stratified_levels(3, 11, chunk, chunks, blocks) for chunk in range(chunks)])
    assert sorted((levels * chunks * blocks).floor().long().tolist()) == list(range(chunks * blocks))
    one_chunk = stratified_levels(3, 11, 0, chunks, blocks)
    assert one_chunk.max() - one_chunk.min() > 0.5  # a chunk's blocks spread over the range
    assert not torch.equal(stratified_levels(3, 12, 0, chunks, blocks), one_chunk)  # a new offset every step


def step_noises(estimator: str, world_size: int, micro_batch: int, batch_size: int = 8, length: int = 64):
    """Every chunk's noise of step 5 as train.Run.noise_of draws it on each rank and micro-step, in batch order."""
    hp = SimpleNamespace(seed=2, batch_size=batch_size, estimator=estimator, t_lo=0.3, t_hi=0.8)
    by_chunk = {}
    for rank, micro_step in itertools.product(range(world_size), range(batch_size // (world_size * micro_batch))):
        run = SimpleNamespace(model=SimpleNamespace(config=train.ModelConfig(block_size=16)), hp=hp, rank=rank,
                              world_size=world_size)
        noise = train.Run.noise_of(run, 5, micro_step, micro_batch, length)
        for row in range(micro_batch):
            by_chunk[(micro_step * world_size + rank) * micro_batch + row] = noise.masked[row], noise.weight[row]
    return [by_chunk[chunk] for chunk in range(batch_size)]


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_a_steps_noise_does_not_depend_on_ranks_or_micro_steps(estimator):
    one = step_noises(estimator, 1, 8)
    for world_size, micro_batch in ((2, 4), (2, 1), (4, 2), (8, 1)):
        for (masked, weight), (masked_one, weight_one) in zip(step_noises(estimator, world_size, micro_batch), one):
            assert torch.equal(masked, masked_one) and torch.equal(weight, weight_one)


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_the_run_seed_draws_new_masks(estimator):
    """--seed is the seed of the training noise. Drawn from one uniform per token, the masks of two seeds would be
    nested in every block (one the other's first tokens in the uniforms' order), as they were when the seed sat above
    the 32 bits a CPU generator keeps; from two streams, few blocks (about 8%) are. Seed 0 keeps the noise of earlier
    runs: the generator of sequence j of the run is seeded with j."""
    step, chunk, chunks, length = 3, 5, 8, 16 * 1024
    seed = int(np.random.default_rng().integers(1, 2**31))
    base, other = (step_noise(length, 16, 0.3, 0.8, s, step, chunk, chunks, estimator).masked.view(-1, 16)
                   for s in (0, seed))
    nested = ~(base & ~other).any(1) | ~(other & ~base).any(1)
    assert nested.float().mean() < 0.3, seed
    assert sequence_generator(0, step, chunk, chunks).initial_seed() == step * chunks + chunk


def test_iid_is_the_draw_of_before_the_estimators():
    """The iid estimator keeps the training noise of earlier runs: t from the first uniform of each block, masks from
    the second row of the same draw."""
    length, generator = 100, torch.Generator().manual_seed(9)
    noise = train_noise(length, 16, 0.3, 0.8, generator)
    draws = torch.rand(2, length, generator=torch.Generator().manual_seed(9))
    index = torch.arange(length)
    t = 0.3 + 0.5 * draws[0, index - index % 16]
    assert torch.equal(noise.masked, draws[1] < t)
    assert torch.equal(noise.weight, torch.where(noise.masked, 1 / t, 0.0))
