"""The noise of the records' objective: per 16-token block, t ~ U(t_lo, t_hi), each token masked with probability t,
a masked token's CE weighed 1 / t. Its estimators for training (BD3LM turns a Noise into the loss) and the NELBO's for
validation, each drawn from seeds and positions alone so that no split over ranks or steps moves it."""

import functools, math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Each estimates the records' objective on [lo, hi], per block sum_k c_k L_k (count_coefficients): iid, t per block;
# stratified, iid's t stratified over a step's blocks; proposal, k masked tokens from count_table, stratified.
ESTIMATORS = ("iid", "stratified", "proposal")
TRAIN_ESTIMATOR = "proposal"  # the least gradient variance (docs/training.md)
MASK32 = 0xFFFFFFFF

class Noise(NamedTuple):
    weight: Tensor  # float [L]: a masked token's loss weight; 0 where unmasked
    masked: Tensor  # bool [L]: which tokens are replaced by [MASK]

def count_coefficients(n: int, lo: float, hi: float) -> Tensor:
    """c_1..c_n of an n-token block, c_k = 1/(hi - lo) integral_lo^hi C(n, k) t^(k-1) (1-t)^(n-k) dt, in closed form:
    k C(n, k) t^(k-1) (1-t)^(n-k) is the derivative of P(Binomial(n, t) >= k)."""
    k = torch.arange(n + 1, dtype=torch.float64)
    binomial = torch.tensor([math.comb(n, j) for j in range(n + 1)], dtype=torch.float64)

    def tail(t: float) -> Tensor:  # P(Binomial(n, t) >= k) for k = 1..n
        return (binomial * t**k * (1 - t) ** (n - k)).flip(0).cumsum(0).flip(0)[1:]

    return (tail(hi) - tail(lo)) / (k[1:] * (hi - lo))

@functools.cache
def count_table(block_size: int, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    """Row n - 1, for blocks of n tokens: the bounds q_1 + ... + q_k of the proposal q_k = k c_k / n (2 past k = n - 1),
    and the weight c_k / q_k = n / k of a masked token, so a block's expected loss is sum_k c_k L_k whatever its size.
    On [0, 1], c_k = 1 / k: k is uniform, validation's exact_k."""
    bounds = torch.full((block_size, block_size), 2.0, dtype=torch.float64)
    weights = torch.zeros(block_size, block_size, dtype=torch.float64)
    for n in range(1, block_size + 1):
        k = torch.arange(1, n + 1, dtype=torch.float64)
        bounds[n - 1, : n - 1] = (count_coefficients(n, lo, hi) * k / n).cumsum(0)[:-1]
        weights[n - 1, :n] = n / k
    return bounds, weights

def mix32(x):
    """A bijection of 32-bit ints or int64 tensors (no overflow) that stirs each bit into every other; mix32(0) = 0."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & MASK32
    x = ((x ^ (x >> 15)) * 0x1B873593) & MASK32
    return x ^ (x >> 16)

def hash_uniform(seed: int, positions: Tensor) -> Tensor:
    """A uniform in (0, 1) per (seed, position), the same on every device."""
    x = mix32(mix32((positions & MASK32) ^ mix32(seed & MASK32)) ^ (positions >> 32))
    return ((x >> 8).double() + 0.5) / 2**24

def sequence_generator(seed: int, step: int, chunk: int, chunks: int) -> torch.Generator:
    """Sequence `chunk` of step `step`'s generator; the run's seed is mixed into the 32 bits a CPU generator keeps."""
    return torch.Generator().manual_seed((step * chunks + chunk) ^ mix32(seed & MASK32))

def stratified_levels(seed: int, step: int, chunk: int, chunks: int, blocks: int) -> Tensor:
    """The levels of the blocks of chunk `chunk` of `chunks` in optimizer step `step` (antithetic sampling): over a
    step they hit each of blocks x chunks strata of [0, 1) once from one random offset, each uniform on its own."""
    offset = hash_uniform(seed, torch.tensor(step))
    return ((offset + (torch.arange(blocks) * chunks + chunk) / (blocks * chunks)) % 1).float()

def count_noise(bounds: Tensor, weights: Tensor, levels: Tensor, uniforms: Tensor, block_size: int) -> Noise:
    """Per-token levels pick k among the bounds of the block's size; the block's k smallest uniforms are masked."""
    index = torch.arange(len(uniforms), device=uniforms.device)
    sizes = (len(uniforms) - index + index % block_size).clamp(max=block_size)
    bounds, weights = bounds.to(uniforms.device)[sizes - 1], weights.to(uniforms.device)[sizes - 1]
    below = (bounds <= levels.double()[:, None]).sum(1, keepdim=True)  # k - 1
    padded = F.pad(uniforms, (0, -len(uniforms) % block_size), value=2.0).view(-1, block_size)
    masked = padded.argsort(1).argsort(1).flatten()[: len(uniforms)] <= below[:, 0]
    return Noise(torch.where(masked, weights.gather(1, below)[:, 0], 0.0).float(), masked)

def train_noise(length: int, block_size: int, lo: float, hi: float, generator: torch.Generator,
                estimator: str = "iid", levels: Tensor | None = None) -> Noise:
    """A sequence's training noise on [lo, hi] from `generator`; stratified ones take block levels from `levels`."""
    draws = torch.rand(2, length, generator=generator, device=generator.device)
    index = torch.arange(length, device=generator.device)
    if estimator not in ESTIMATORS:
        raise ValueError(f"the training estimator must be {', '.join(ESTIMATORS)}, not {estimator!r}")
    if estimator == "iid":
        per_token = draws[0, index - index % block_size]
    elif levels is None:
        raise ValueError(f"the {estimator} estimator needs each block's level from stratified_levels")
    else:
        per_token = levels.to(generator.device)[index // block_size]
    if estimator == "proposal":
        return count_noise(*count_table(block_size, lo, hi), per_token, draws[1], block_size)
    t = lo + (hi - lo) * per_token
    masked = draws[1] < t
    return Noise(torch.where(masked, 1 / t, 0.0).float(), masked)

def step_noise(length: int, block_size: int, lo: float, hi: float, seed: int, step: int, chunk: int, chunks: int,
               estimator: str = TRAIN_ESTIMATOR) -> Noise:
    """The training noise of sequence `chunk` of `chunks` in step `step`: from its place, not the rank that draws it."""
    levels = None if estimator == "iid" else stratified_levels(seed, step, chunk, chunks, -(-length // block_size))
    return train_noise(length, block_size, lo, hi, sequence_generator(seed, step, chunk, chunks), estimator, levels)

def position_draws(length: int, block_size: int, seed: int, offset: int) -> tuple[Tensor, Tensor]:
    """A level per block and a uniform per token, hashed from `seed` and the position in the stream (from `offset`)."""
    index = torch.arange(length)
    levels = hash_uniform(2 * seed, offset + index - index % block_size).float()
    return levels, hash_uniform(2 * seed + 1, offset + index).float()

def eval_noise(length: int, block_size: int, seed: int, offset: int) -> Noise:
    """Validation's noise, exact_k: k of a block's n tokens masked, k uniform on 1..n, weight n / k (the NELBO)."""
    levels, uniforms = position_draws(length, block_size, seed, offset)
    return count_noise(*count_table(block_size, 0.0, 1.0), levels, uniforms, block_size)
