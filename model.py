"""
The block diffusion language model (BD3-LM, arXiv 2503.09573), its noise and its exact training objective.

Token i of a sequence is in block i // block_size, at rotary position i; `<|endoftext|>` ends a document and is a
target like any other token. The model predicts a noisy block's clean tokens from that block and the clean earlier
blocks of the document it starts in, nothing else, so the loss bounds the stream's negative log-likelihood. Training
is one pass over [x_t ; x_0] under mask_rule; inference caches the clean blocks and runs one noisy block at a time.
Imports only torch: no data files, tokenizer, optimizer or distributed training.
"""

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

TILE = 128  # FlexAttention's tile size: a BlockMask says which TILE x TILE tiles of scores to compute
ROPE_BASE = 10_000.0
LOGIT_SOFTCAP = 15.0  # logits = c * tanh(logits / c)
SMALL_GPU_SHARED_MEMORY = 101_376  # bytes of shared memory per block on sm_86 and sm_89 (RTX 3090, RTX 4090)


def setting(default, help: str):
    """A settings field with the help text that --help prints."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """The record model's sizes, declared once; train.py's Hyperparameters extends it, so each is a flag."""
    vocab_size: int = setting(50257, "real tokens (GPT-2); the [MASK] id is vocab_size")
    n_layer: int = setting(12, "transformer layers (even: U-net skips)")
    n_head: int = setting(6, "attention heads")
    head_dim: int = setting(128, "dimension of one head")
    model_dim: int = setting(768, "width of the residual stream")
    # not 4 * 768: that would put the record model over the 162M-parameter cap
    mlp_hidden: int = setting(3056, "hidden width of the MLP")
    block_size: int = setting(16, "tokens per diffusion block (records: 16)")

    @property
    def eot_id(self) -> int:  # <|endoftext|>: the last real token, as in GPT-2
        return self.vocab_size - 1

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @property
    def padded_vocab(self) -> int:
        return math.ceil((self.vocab_size + 1) / 128) * 128

    def validate(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "head_dim", "model_dim", "mlp_hidden", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_layer % 2:
            raise ValueError(f"n_layer must be even for the U-net skip connections, got {self.n_layer}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")


# -----------------------------------------------------------------------------
# The noise: schedules, estimators of the objective, and the noise of a sequence

class Schedule(NamedTuple):
    """A token is [MASK] at time t with probability p(t) (p(0) = 0, p(1) = 1), and its cross-entropy weighs
    p'(t) / p(t). With t ~ U(0, 1) all schedules have one expected NELBO (substitute p for t), not one variance.
    A clipped interval [lo, hi] bounds p(t), so it means the same under every schedule."""
    mask_prob: Callable[[Tensor], Tensor]  # p(t)
    weight: Callable[[Tensor], Tensor]  # p'(t) / p(t)
    time_of: Callable[[Tensor], Tensor]  # the inverse of p

    def times(self, lo: float, hi: float, u: Tensor) -> Tensor:
        """Times uniform in [time_of(lo), time_of(hi)] from uniforms u in [0, 1)."""
        t_lo, t_hi = (float(self.time_of(torch.tensor(x, dtype=torch.float64))) for x in (lo, hi))
        return t_lo + (t_hi - t_lo) * u

    def unmask_prob(self, t: float, s: float) -> float:
        """The sampler's step from t down to s: the chance that a token masked at t is revealed at s."""
        p_t, p_s = (self.mask_prob(torch.tensor(x, dtype=torch.float64)) for x in (t, s))
        return float((p_t - p_s) / p_t)

    def mean_mask_prob(self, lo: float, hi: float) -> float:
        """The expected masked fraction of a block under times(lo, hi, u ~ U(0, 1))."""
        u = (torch.arange(10_000, dtype=torch.float64) + 0.5) / 10_000
        return float(self.mask_prob(self.times(lo, hi, u)).mean())


SCHEDULES = {
    "linear": Schedule(mask_prob=lambda t: t, weight=lambda t: 1 / t, time_of=lambda p: p),
    # alpha_t = cos^2(pi t / 2): nano-dlm's cosine without its offset, so that p(0) = 0 and the NELBO stays exact
    "cosine": Schedule(mask_prob=lambda t: torch.sin(math.pi / 2 * t).square(),
                       weight=lambda t: (math.pi / torch.tan(math.pi / 2 * t)).clamp(min=0),
                       time_of=lambda p: 2 / math.pi * torch.asin(p.sqrt())),
    "sqrt": Schedule(mask_prob=lambda t: t.sqrt(), weight=lambda t: 0.5 / t, time_of=lambda p: p.square()),
}


class Noise(NamedTuple):
    weight: Tensor  # float [L]: a masked token's loss weight (its block's p'(t) / p(t), or c_k / q_k); 0 where unmasked
    masked: Tensor  # bool [L]: which tokens are replaced by [MASK]


class CountTable(NamedTuple):
    """A masked-count draw for blocks of n = 1..N tokens: row n - 1 of `bounds` holds q_1 + ... + q_k at column
    k - 1 for k < n and 2 after (above every level); of `weights`, a masked token's weight when k are masked."""
    bounds: Tensor  # float64 [N, N]
    weights: Tensor  # float64 [N, N]


class Estimator(NamedTuple):
    """How a block is noised from its level u in [0, 1) and one uniform per token: u is its t, or draws its count k."""
    count_table: Callable[[int, float, float], CountTable] | None  # of (block_size, lo, hi); None: the level is t
    stratified: bool  # the levels of a step's blocks are stratified (stratified_levels), not independent


def count_coefficients(n: int, lo: float, hi: float) -> Tensor:
    """c_1..c_n of an n-token block: c_k = 1/(hi - lo) integral_lo^hi C(n, k) t^(k-1) (1-t)^(n-k) dt, in closed form:
    k C(n, k) t^(k-1) (1-t)^(n-k) is the derivative of P(Binomial(n, t) >= k)."""
    k = torch.arange(n + 1, dtype=torch.float64)
    binomial = torch.tensor([math.comb(n, j) for j in range(n + 1)], dtype=torch.float64)

    def tail(t: float) -> Tensor:  # P(Binomial(n, t) >= k) for k = 1..n
        return (binomial * t**k * (1 - t) ** (n - k)).flip(0).cumsum(0).flip(0)[1:]

    return (tail(hi) - tail(lo)) / (k[1:] * (hi - lo))


def count_table(block_size: int, proposal: Callable[[int], Tensor], weight: Callable[[int], Tensor]) -> CountTable:
    """The CountTable of the distributions proposal(n) of k = 1..n and the weights weight(n), n = 1..block_size."""
    bounds = torch.full((block_size, block_size), 2.0, dtype=torch.float64)
    weights = torch.zeros(block_size, block_size, dtype=torch.float64)
    for n in range(1, block_size + 1):
        bounds[n - 1, : n - 1] = proposal(n).cumsum(0)[:-1]
        weights[n - 1, :n] = weight(n)
    return CountTable(bounds, weights)


@functools.cache
def proposal_table(block_size: int, lo: float, hi: float) -> CountTable:
    """k from q_k = k c_k / n (the k c_k sum to n), a masked token weighing c_k / q_k = n / k: every block's
    expected loss is sum_k c_k L_k, whatever its size."""
    def proposal(n: int) -> Tensor:
        return count_coefficients(n, lo, hi) * torch.arange(1, n + 1) / n

    return count_table(block_size, proposal, lambda n: count_coefficients(n, lo, hi) / proposal(n))


@functools.cache
def uniform_count_table(block_size: int) -> CountTable:
    """Validation's exact_k on [0, 1], where c_k = 1 / k: k uniform on 1..n at weight n / k (LLaDA's form)."""
    return count_table(block_size, lambda n: torch.full((n,), 1 / n, dtype=torch.float64),
                       lambda n: n / torch.arange(1, n + 1, dtype=torch.float64))


# Each estimates the records' objective on [lo, hi]: per block sum_k c_k L_k, L_k the expected summed CE of k masked
# tokens chosen uniformly (count_coefficients gives c_k).
ESTIMATORS = {
    "iid": Estimator(count_table=None, stratified=False),  # t per block, each token masked with probability p(t)
    "stratified": Estimator(count_table=None, stratified=True),  # iid's t, stratified over a step's blocks
    "proposal": Estimator(count_table=proposal_table, stratified=True),  # k from proposal_table, stratified
}
TRAIN_ESTIMATOR = "proposal"  # chosen by measured gradient variance (docs/training.md)


def estimator_of(estimator: str | Estimator) -> Estimator:
    return ESTIMATORS[estimator] if isinstance(estimator, str) else estimator


def _hash_uniform(seed: int, positions: Tensor) -> Tensor:
    """A uniform in (0, 1) per (seed, position), the same on every device; multipliers < 2**31 never overflow int64."""
    mask32 = 0xFFFFFFFF

    def mix(x: Tensor) -> Tensor:
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & mask32
        x = x ^ (x >> 15)
        x = (x * 0x1B873593) & mask32
        return x ^ (x >> 16)

    seed_hash = mix(torch.tensor(seed & mask32, dtype=torch.int64))
    x = mix(mix((positions & mask32) ^ seed_hash) ^ (positions >> 32))
    return ((x >> 8).double() + 0.5) / 2**24


def stratified_levels(seed: int, step: int, chunk: int, chunks: int, blocks: int) -> Tensor:
    """The levels of the blocks of chunk `chunk` of `chunks` in optimizer step `step` (bd3lms's antithetic sampling):
    over a step they hit each of blocks * chunks strata of [0, 1) once from one random offset, each level is
    uniform on its own, and they depend on the chunk's place in the step, never on its rank or micro-step."""
    offset = _hash_uniform(seed, torch.tensor(step))
    return ((offset + (torch.arange(blocks) * chunks + chunk) / (blocks * chunks)) % 1).float()


def _block_sizes(length: int, block_size: int, device) -> tuple[Tensor, Tensor]:
    """Per token: the index of its block's first token, and its block's size (the last block may be short)."""
    index = torch.arange(length, device=device)
    start = index - index % block_size
    return start, (length - start).clamp(max=block_size)


def _masked_ranks(uniforms: Tensor, block_size: int) -> Tensor:
    """Each token's rank among its block's uniforms: masking the k smallest is a uniformly random k-subset."""
    padded = F.pad(uniforms, (0, -len(uniforms) % block_size), value=2.0).view(-1, block_size)
    return padded.argsort(1).argsort(1).flatten()[: len(uniforms)]


def _noise(rule: Estimator, levels: Tensor, uniforms: Tensor, block_size: int, lo: float, hi: float,
           schedule: str) -> Noise:
    """The noise of a sequence from per-token levels (equal within a block) and per-token uniforms."""
    if rule.count_table is not None:
        if schedule != "linear":
            raise ValueError(f"a masked-count estimator draws the linear schedule's counts, not the {schedule} one")
        return _count_noise(rule.count_table(block_size, lo, hi), levels, uniforms, block_size)
    s = SCHEDULES[schedule]
    t = s.times(lo, hi, levels)
    masked = uniforms < s.mask_prob(t)
    return Noise(torch.where(masked, s.weight(t), 0.0).float(), masked)


def _count_noise(table: CountTable, levels: Tensor, uniforms: Tensor, block_size: int) -> Noise:
    """k = the level's place among the bounds of the block's size; the k smallest uniforms of the block are masked."""
    _, sizes = _block_sizes(len(uniforms), block_size, uniforms.device)
    bounds, weights = (x.to(uniforms.device)[sizes - 1] for x in table)
    below = (bounds <= levels.double()[:, None]).sum(1, keepdim=True)  # k - 1
    masked = _masked_ranks(uniforms, block_size) <= below[:, 0]
    return Noise(torch.where(masked, weights.gather(1, below)[:, 0], 0.0).float(), masked)


def train_noise(length: int, block_size: int, lo: float, hi: float, generator: torch.Generator,
                schedule: str = "linear", estimator: str | Estimator = "iid", levels: Tensor | None = None) -> Noise:
    """The training noise of a sequence on [lo, hi] under `estimator`, drawn from `generator`; a stratified
    estimator takes each block's level from `levels` (stratified_levels)."""
    draws, rule = torch.rand(2, length, generator=generator, device=generator.device), estimator_of(estimator)
    start, _ = _block_sizes(length, block_size, generator.device)
    if rule.stratified:
        if levels is None:
            raise ValueError("a stratified estimator needs each block's level from stratified_levels")
        per_token = levels.to(generator.device)[start // block_size]
    else:
        per_token = draws[0, start]
    return _noise(rule, per_token, draws[1], block_size, lo, hi, schedule)


def step_noise(length: int, block_size: int, lo: float, hi: float, seed: int, step: int, chunk: int, chunks: int,
               schedule: str = "linear", estimator: str | Estimator = TRAIN_ESTIMATOR) -> Noise:
    """The training noise of sequence `chunk` of `chunks` in optimizer step `step`, seeded by (seed, step, chunk):
    it depends on the sequence's place in the step, never on which rank or micro-step draws it."""
    generator = torch.Generator().manual_seed((seed << 32) + step * chunks + chunk)
    levels = stratified_levels(seed, step, chunk, chunks, -(-length // block_size)) \
        if estimator_of(estimator).stratified else None
    return train_noise(length, block_size, lo, hi, generator, schedule, estimator, levels)


VAL_ESTIMATORS = ("iid", "exact_k")  # the ones whose noise can come from positions alone


def eval_noise(length: int, block_size: int, seed: int, offset: int, schedule: str = "linear",
               estimator: str = "exact_k") -> Noise:
    """The NELBO's noise on [0, 1] (iid: t ~ U(0, 1) per block; exact_k: k uniform on 1..n), hashed from `seed` and
    each token's position in the val stream (`offset`: the first token's), so no split over ranks or steps moves it."""
    if estimator not in VAL_ESTIMATORS:
        raise ValueError(f"the val noise comes from positions alone: estimator {' or '.join(VAL_ESTIMATORS)}, "
                         f"not {estimator!r}")
    index = torch.arange(length)
    levels = _hash_uniform(2 * seed, offset + index - index % block_size).float()
    uniforms = _hash_uniform(2 * seed + 1, offset + index).float()
    if estimator == "exact_k":
        return _count_noise(uniform_count_table(block_size), levels, uniforms, block_size)
    return _noise(ESTIMATORS["iid"], levels, uniforms, block_size, 0.0, 1.0, schedule)


# -----------------------------------------------------------------------------
# Documents, blocks and the attention mask of the vectorized pass over [x_t ; x_0]

def document_layout(tokens: Tensor, block_size: int, eot_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per token of [..., L]: its document (the number of <|endoftext|> strictly before it), its block, and the
    document its block starts in (the only one the block may look back at)."""
    eot = (tokens == eot_id).long()
    doc = eot.cumsum(-1) - eot
    block = torch.arange(tokens.size(-1), device=tokens.device) // block_size
    return doc, block.expand_as(tokens), doc[..., block * block_size]


def mask_rule(doc_q, block_q, clean_q, doc_k, block_k, clean_k):
    """BD3-LM attention (paper section 3.2), elementwise; `doc` of a noisy position is the document its block starts
    in. A noisy block sees itself whatever the documents, and the clean earlier blocks of its document; a clean
    token sees the clean tokens of its document up to the end of its own block."""
    block_diagonal = ~clean_q & ~clean_k & (block_k == block_q)
    offset_block_causal = ~clean_q & clean_k & (block_k < block_q) & (doc_k == doc_q)
    block_causal = clean_q & clean_k & (block_k <= block_q) & (doc_k == doc_q)
    return block_diagonal | offset_block_causal | block_causal


def _doubled_layout(tokens: Tensor, block_size: int, eot_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Document (as mask_rule reads it), block and is-clean of every position of [x_t ; x_0], from x_0 alone."""
    doc, block, block_doc = document_layout(tokens, block_size, eot_id)
    clean = torch.arange(2 * tokens.size(-1), device=tokens.device) >= tokens.size(-1)
    return torch.cat([block_doc, doc], -1), torch.cat([block, block], -1), clean.expand(*tokens.shape[:-1], -1)


def block_diffusion_mask(tokens: Tensor, block_size: int, eot_id: int) -> Tensor:
    """Dense boolean mask [..., 2L, 2L] (queries by keys, x_t first) of the pass over `tokens` [..., L]."""
    doc, block, clean = _doubled_layout(tokens, block_size, eot_id)
    q, k = (..., slice(None), None), (..., None, slice(None))
    return mask_rule(doc[q], block[q], clean[q], doc[k], block[k], clean[k])


def block_diffusion_block_mask(tokens: Tensor, block_size: int, eot_id: int) -> BlockMask:
    """The same mask as a FlexAttention BlockMask (one per row of [N, L]), from per-tile summaries in
    O(N (2L/TILE)^2) instead of all (2L)^2 pairs. Documents and blocks only grow along each half, so a tile's first
    and last values bound it: a tile pair is skipped when no pair in it can pass the rule, full when every pair must."""
    length = tokens.size(-1)
    if length % TILE:
        raise ValueError(f"the flex attention backend needs a sequence length divisible by {TILE}, got {length}")
    doc, block, clean = _doubled_layout(tokens.reshape(-1, length), block_size, eot_id)  # [N, 2L] each

    def tile_ends(x: Tensor) -> tuple[Tensor, Tensor]:
        per_tile = x.reshape(x.size(0), 2 * length // TILE, TILE)
        return per_tile[..., 0], per_tile[..., -1]

    (first_doc, last_doc), (first_block, last_block), (tile_clean, _) = map(tile_ends, (doc, block, clean))
    q, k = (..., slice(None), None), (..., None, slice(None))
    noisy_to_noisy = ~tile_clean[q] & ~tile_clean[k]
    noisy_to_clean = ~tile_clean[q] & tile_clean[k]
    clean_to_clean = tile_clean[q] & tile_clean[k]
    docs_overlap = (first_doc[q] <= last_doc[k]) & (first_doc[k] <= last_doc[q])
    one_doc = (first_doc[q] == last_doc[q]) & (first_doc[k] == last_doc[k]) & (first_doc[q] == first_doc[k])
    blocks_overlap = (first_block[q] <= last_block[k]) & (first_block[k] <= last_block[q])
    one_block = (first_block[q] == last_block[q]) & (first_block[k] == last_block[k]) & blocks_overlap
    any_allowed = (noisy_to_noisy & blocks_overlap) \
        | (noisy_to_clean & docs_overlap & (first_block[k] < last_block[q])) \
        | (clean_to_clean & docs_overlap & (first_block[k] <= last_block[q]))
    all_allowed = (noisy_to_noisy & one_block) \
        | (noisy_to_clean & one_doc & (last_block[k] < first_block[q])) \
        | (clean_to_clean & one_doc & (last_block[k] <= first_block[q]))

    def as_kv_blocks(selected: Tensor) -> tuple[Tensor, Tensor]:  # [N, tiles, tiles] -> [N, 1, ...] for the heads
        # eager even when compiled, as torch's own BlockMask code does: Triton sorts have a compile-time cliff
        with torch.fx.traceback.annotate({"fallback_to_eager": True}):
            order = torch.argsort(selected.int(), dim=-1, descending=True, stable=True)
        return selected.sum(-1, dtype=torch.int32)[:, None], order.int()[:, None]

    def mask_mod(b, h, q_idx, kv_idx):
        return mask_rule(doc[b, q_idx], block[b, q_idx], clean[b, q_idx], doc[b, kv_idx], block[b, kv_idx],
                         clean[b, kv_idx])

    return BlockMask.from_kv_blocks(*as_kv_blocks(any_allowed & ~all_allowed), *as_kv_blocks(all_allowed),
                                    BLOCK_SIZE=TILE, mask_mod=mask_mod)


def flex_kernel_options(device_properties) -> dict:
    """FlexAttention options for a GPU (torch.cuda.get_device_properties): tiles that fit where the default ones need
    more shared memory than a block has (RTX 3090/4090; docs/performance.md); larger GPUs keep the defaults."""
    props = device_properties
    if getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block) > SMALL_GPU_SHARED_MEMORY:
        return {}
    return {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 2,
            "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32}


def check_token_ids(tokens: Tensor, top: int) -> None:
    """Token ids must lie in [0, top). Reading them waits for the device, so compiled callers check on the CPU."""
    if int(tokens.min()) < 0 or int(tokens.max()) >= top:
        raise ValueError(f"token ids must lie in [0, {top}), got ids in [{int(tokens.min())}, {int(tokens.max())}]")


# -----------------------------------------------------------------------------
# The transformer

def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(pos: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin [N, S, 1, head_dim / 2] of the angles pos * base^(-2i/head_dim), once per pass."""
    half = head_dim // 2
    # float64: a cache window far from position 0 must agree with a recompute of the same window from 0
    inv_freq = base ** -(torch.arange(half, device=pos.device, dtype=torch.float64) / half)
    angle = pos[..., None, None].double() * inv_freq
    return angle.cos().float(), angle.sin().float()


def rotary(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate the halves of x [N, S, H, D] by the angles of `rope`."""
    cos, sin = (table.to(x.dtype) for table in rope)
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], -1)


def init_linear(dim_in: int, dim_out: int, zero: bool = False) -> nn.Linear:
    layer = nn.Linear(dim_in, dim_out, bias=False)
    with torch.no_grad():
        if zero:
            layer.weight.zero_()
        else:
            bound = 3**0.5 * 0.5 * dim_in**-0.5
            layer.weight.uniform_(-bound, bound)
    return layer


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, first_layer: bool):
        super().__init__()
        inner = config.n_head * config.head_dim
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.q = init_linear(config.model_dim, inner)
        self.k = init_linear(config.model_dim, inner)
        self.v = init_linear(config.model_dim, inner)
        self.proj = init_linear(inner, config.model_dim, zero=True)
        # value residual: later layers mix the first layer's values into their own
        self.value_mix = None if first_layer else nn.Parameter(torch.tensor(0.5))
        self.flex_options = {}  # set by BD3LM.set_flex_options for the GPU at hand

    def forward(self, x: Tensor, rope, mask, first_values, past=None):
        """x [N, S, dim] attends to its own keys after the cached (k, v) `past`, under a BlockMask or a dense
        boolean [N, 1, S, S_past + S]. Returns (output, (k, v), values)."""
        N, S, _ = x.shape
        q, k, v = (linear(x).view(N, S, self.n_head, self.head_dim) for linear in (self.q, self.k, self.v))
        if first_values is not None:
            v = (1 - self.value_mix) * v + self.value_mix * first_values
        values = v
        # on CUDA, autocast runs rms_norm in fp32 (torch >= 2.12) while v stays bf16: flex attention needs one dtype
        q, k = rotary(norm(q), rope).to(v.dtype), rotary(norm(k), rope).to(v.dtype)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        new_kv = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        if isinstance(mask, BlockMask):
            y = flex_attention(q, k, v, block_mask=mask, kernel_options=self.flex_options)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(N, S, -1)), new_kv, values


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = init_linear(config.model_dim, config.mlp_hidden)
        self.down = init_linear(config.mlp_hidden, config.model_dim, zero=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.relu(self.up(x)).square())


class Block(nn.Module):
    def __init__(self, config: ModelConfig, first_layer: bool):
        super().__init__()
        self.attn = Attention(config, first_layer)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, first_values, past=None):
        y, new_kv, values = self.attn(norm(x), rope, mask, first_values, past)
        x = x + y
        return x + self.mlp(norm(x)), new_kv, values


class Trunk(nn.Module):
    """Embedding and blocks with U-net skips: token ids [N, S] -> normed hidden states [N, S, dim] and each layer's
    new (k, v). Its own module so that train.py can compile exactly the static-shape part."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size + 1, config.model_dim)
        self.blocks = nn.ModuleList(Block(config, i == 0) for i in range(config.n_layer))
        self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2))
        self.head_dim = config.head_dim

    def forward(self, idx: Tensor, pos: Tensor, mask, past=None):
        x = norm(self.embed(idx))
        rope = rotary_tables(pos, self.head_dim, ROPE_BASE)
        skips, new_kvs, first_values = [], [], None
        half = len(self.blocks) // 2
        for i, block in enumerate(self.blocks):
            if i >= half:
                x = x + self.skip_weights[i - half] * skips.pop()
            x, new_kv, values = block(x, rope, mask, first_values, None if past is None else past[i])
            first_values = values if i == 0 else first_values
            new_kvs.append(new_kv)
            if i < half:
                skips.append(x)
        return norm(x), new_kvs


@dataclass
class KVCache:
    """Keys and values of clean tokens, per layer [N, H, max_len, D], and the tokens; slot 0 is at position `start`."""
    keys: list[Tensor]
    values: list[Tensor]
    tokens: Tensor  # [N, max_len]
    length: int = 0
    start: int = 0


class BD3LM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.trunk = Trunk(config)
        self.head = init_linear(config.model_dim, config.padded_vocab, zero=True)
        self.flex = self.compiled = False  # compile_loss sets them

    # --- training and evaluation

    def forward(self, tokens: Tensor, noise: Noise) -> Tensor:
        """Negative ELBO of the clean `tokens` ([L] or [N, L]) under `noise`: the summed token_losses over the number
        of tokens, all of them; with t ~ U(0, 1) an upper bound on the NLL in nats per token."""
        return self.token_losses(tokens, noise).sum() / tokens.numel()

    def token_losses(self, tokens: Tensor, noise: Noise) -> Tensor:
        """Per-token loss, shaped like `tokens`: CE times the noise's weight where masked, 0 elsewhere (SUBS: unmasked
        tokens are copied through). Eager, the head runs on the masked positions only; compiled, on all of them at
        weight 0 where unmasked, so every shape is fixed and nothing waits for the device to count masked tokens."""
        self._check_tokens(tokens, (1, 2))
        if noise.masked.shape != tokens.shape or noise.weight.shape != tokens.shape:
            raise ValueError(f"noise of shape {tuple(noise.masked.shape)} for tokens of shape {tuple(tokens.shape)}")
        x_0 = tokens.reshape(-1, tokens.size(-1))
        x_t = torch.where(noise.masked, self.config.mask_id, tokens).reshape_as(x_0)
        hidden = self._pass(x_t, x_0)[:, : x_0.size(1)].flatten(0, 1)
        targets, masked, weight = x_0.flatten(), noise.masked.flatten(), noise.weight.flatten()
        if torch.compiler.is_compiling():
            rows = torch.arange(targets.numel(), device=tokens.device)
            logits = self._padded_logits(hidden)
        else:
            rows = masked.nonzero().squeeze(1)
            logits = self.logits_of(hidden[rows])
        ce = F.cross_entropy(logits, targets[rows], reduction="none")
        return torch.zeros(targets.numel(), device=tokens.device).index_put((rows,), ce * weight[rows]).view_as(tokens)

    def logits(self, x_t: Tensor, x_0: Tensor) -> Tensor:
        """Logits [N, L, vocab_size] of the noisy half of [x_t ; x_0], by the slow, obvious path (the dense mask)."""
        for x in (x_0, x_t):
            self._check_tokens(x, (2,), allow_mask=True)
        return self.logits_of(self._pass(x_t, x_0, dense=True)[:, : x_0.size(1)])

    def logits_of(self, hidden: Tensor) -> Tensor:
        """Logits over the real vocabulary: [MASK] and the padding can never be predicted."""
        return self._softcap(self.head(hidden)[..., : self.config.vocab_size])

    def _padded_logits(self, hidden: Tensor) -> Tensor:
        """logits_of over the whole padded head (a width the compiled loss can tile), -inf on [MASK] and the padding:
        the same softmax. The -inf comes after the softcap, which would turn it into -cap."""
        logits = self._softcap(self.head(hidden))
        return logits.masked_fill(torch.arange(logits.size(-1), device=logits.device) >= self.config.vocab_size,
                                  float("-inf"))

    def _softcap(self, logits: Tensor) -> Tensor:
        logits = logits.float()  # softcap and softmax in fp32 under bf16
        return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)

    def _pass(self, x_t: Tensor, x_0: Tensor, dense: bool = False) -> Tensor:
        """Hidden states of [x_t ; x_0]: BlockMask and flex inside a compiled flex loss, else the dense mask."""
        cfg = self.config
        if not dense and self.flex and torch.compiler.is_compiling():
            mask = block_diffusion_block_mask(x_0, cfg.block_size, cfg.eot_id)
        else:
            mask = block_diffusion_mask(x_0, cfg.block_size, cfg.eot_id)[:, None]
        pos = torch.arange(x_0.size(1), device=x_0.device)
        return self.trunk(torch.cat([x_t, x_0], 1), torch.cat([pos, pos])[None], mask)[0]

    def _check_tokens(self, tokens: Tensor, dims: tuple[int, ...], allow_mask: bool = False) -> None:
        if tokens.dim() not in dims or tokens.numel() == 0:
            raise ValueError(f"expected a non-empty {' or '.join(f'{d}-D' for d in dims)} tensor of token ids, "
                             f"got shape {tuple(tokens.shape)}")
        if torch.compiler.is_compiling():
            return  # reading the ids back would break the graph and wait for the device: compiled callers check first
        check_token_ids(tokens, self.config.vocab_size + (1 if allow_mask else 0))

    # --- inference with a KV cache of clean tokens

    def new_cache(self, batch_size: int, max_len: int, start: int = 0) -> KVCache:
        """An empty cache for `max_len` clean tokens from sequence position `start` (a multiple of the block size)."""
        cfg, param = self.config, self.head.weight
        if start % cfg.block_size:
            raise ValueError(f"a cache must start on a block boundary, not at {start} (block size {cfg.block_size})")
        shape = (batch_size, cfg.n_head, max_len, cfg.head_dim)
        return KVCache(keys=[param.new_empty(shape) for _ in range(cfg.n_layer)],
                       values=[param.new_empty(shape) for _ in range(cfg.n_layer)],
                       tokens=torch.zeros(batch_size, max_len, dtype=torch.long, device=param.device), start=start)

    def _cached_pass(self, cache: KVCache, tokens: Tensor, clean: bool):
        """Run `tokens` [N, n] after the cached clean context under the training mask: as the clean half if `clean`,
        else as one noisy block."""
        self._check_tokens(tokens, (2,), allow_mask=True)
        cfg, n, length = self.config, tokens.size(1), cache.length
        if tokens.size(0) != cache.tokens.size(0) or length + n > cache.tokens.size(1):
            raise ValueError(f"{tuple(tokens.shape)} tokens do not fit a cache of shape {tuple(cache.tokens.shape)} "
                             f"holding {length}")
        if not clean and (length % cfg.block_size or n > cfg.block_size):
            raise ValueError(f"a noisy block must start on a block boundary and fit one block of {cfg.block_size}: "
                             f"{n} tokens after {length} cached")
        if clean and (length + n) % cfg.block_size and length + n < cache.tokens.size(1):
            raise ValueError(f"clean tokens must end on a block boundary (a clean token sees its whole block): "
                             f"{n} tokens after {length} cached, block size {cfg.block_size}")
        history = torch.cat([cache.tokens[:, :length], tokens], 1)
        doc, block, block_doc = document_layout(history, cfg.block_size, cfg.eot_id)
        new = slice(length, length + n)
        clean_k = (torch.arange(length + n, device=tokens.device) < length) | clean
        mask = mask_rule((doc if clean else block_doc)[:, new, None], block[:, new, None],
                         torch.tensor(clean, device=tokens.device), doc[:, None, :], block[:, None, :], clean_k)
        past = [(k[:, :, :length], v[:, :, :length]) for k, v in zip(cache.keys, cache.values)]
        pos = torch.arange(cache.start + length, cache.start + length + n, device=tokens.device)
        return self.trunk(tokens, pos[None], mask[:, None], past)

    @torch.no_grad()
    def cache_logits(self, cache: KVCache, noisy_block: Tensor) -> Tensor:
        """Logits [N, n, vocab_size] of a noisy block [N, n] given the cached clean context."""
        return self.logits_of(self._cached_pass(cache, noisy_block, clean=False)[0])

    @torch.no_grad()
    def cache_append(self, cache: KVCache, clean_tokens: Tensor) -> None:
        """Add finished clean tokens [N, n] (a denoised block, or a prompt prefix) to the cache."""
        _, new_kvs = self._cached_pass(cache, clean_tokens, clean=True)
        end = cache.length + clean_tokens.size(1)
        for layer, (k, v) in enumerate(new_kvs):
            cache.keys[layer][:, :, cache.length:end] = k
            cache.values[layer][:, :, cache.length:end] = v
        cache.tokens[:, cache.length:end] = clean_tokens
        cache.length = end

    # --- helpers for the scripts around the model

    def compile_loss(self, backend="inductor", flex: bool | None = None) -> None:
        """Compile token_losses as one full graph with static shapes (one graph for training, one for evaluation),
        without the token-id check (its callers check on the CPU). `flex`: FlexAttention and a BlockMask (default: on
        a GPU), else SDPA and the dense mask; flex runs only compiled, as eager flex materializes every fp32 score."""
        self.flex, self.compiled = self.head.weight.is_cuda if flex is None else flex, True
        self.token_losses = torch.compile(self.token_losses, fullgraph=True, dynamic=False, backend=backend)

    def set_flex_options(self, options: dict) -> None:
        """FlexAttention kernel options (flex_kernel_options) for every layer."""
        for block in self.trunk.blocks:
            block.attn.flex_options = dict(options)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Muon takes the hidden matrices; Adam the embedding, the head and the scalars."""
        hidden = [p for p in self.trunk.blocks.parameters() if p.dim() == 2]
        scalars = [p for p in self.trunk.parameters() if p.dim() < 2]
        return {"hidden_matrices": hidden, "embed": [self.trunk.embed.weight], "head": [self.head.weight],
                "scalars": scalars}
