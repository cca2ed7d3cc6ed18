"""The block diffusion language model (BD3-LM, arXiv 2503.09573). A noisy block is predicted from itself and the
clean earlier blocks of the document it starts in, nothing else, so the loss bounds the stream's NLL. Training is one
pass over [x_t ; x_0] under mask_rule; inference caches the clean blocks and runs one noisy block at a time."""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from noise import Noise

TILE = 128  # FlexAttention's tile size: a BlockMask says which TILE x TILE tiles of scores to compute
ROPE_BASE = 10_000.0
LOGIT_SOFTCAP = 15.0  # logits = c * tanh(logits / c)
SMALL_GPU_SHARED_MEMORY = 101_376  # bytes of shared memory per block on sm_86 and sm_89 (RTX 3090, RTX 4090)

def setting(default, help: str):
    """A settings field with the help text that --help prints."""
    return field(default=default, metadata={"help": help})

@dataclass
class ModelConfig:
    """The record model's sizes; train.py's Hyperparameters extends it, so each is a flag."""
    vocab_size: int = setting(50257, "real tokens (GPT-2); the [MASK] id is vocab_size")
    n_layer: int = setting(12, "transformer layers (even: U-net skips)")
    n_head: int = setting(6, "attention heads")
    head_dim: int = setting(128, "dimension of one head")
    model_dim: int = setting(768, "width of the residual stream")
    mlp_hidden: int = setting(3056, "hidden width of the MLP (not 4 x 768: that passes the 162M-parameter cap)")
    block_size: int = setting(16, "tokens per diffusion block (records: 16)")

    eot_id = property(lambda self: self.vocab_size - 1)  # <|endoftext|>: the last real token, as in GPT-2
    mask_id = property(lambda self: self.vocab_size)
    padded_vocab = property(lambda self: math.ceil((self.vocab_size + 1) / 128) * 128)

    def validate(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "head_dim", "model_dim", "mlp_hidden", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name, why in (("n_layer", "the U-net skip connections"), ("head_dim", "rotary embeddings")):
            if getattr(self, name) % 2:
                raise ValueError(f"{name} must be even for {why}, got {getattr(self, name)}")

# -----------------------------------------------------------------------------
# Documents, blocks and the attention mask of the pass over [x_t ; x_0]

def document_layout(tokens: Tensor, block_size: int, eot_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per token of [..., L]: its document (<|endoftext|>s before it), its block, the document its block starts in."""
    eot = (tokens == eot_id).long()
    doc = eot.cumsum(-1) - eot
    block = torch.arange(tokens.size(-1), device=tokens.device) // block_size
    return doc, block.expand_as(tokens), doc[..., block * block_size]

def mask_rule(doc_q, block_q, clean_q, doc_k, block_k, clean_k):
    """BD3-LM attention (paper section 3.2); `doc` of a noisy position is the document its block starts in. A noisy
    block sees itself and the clean earlier blocks of its document; a clean token sees the clean tokens of its
    document up to the end of its own block."""
    block_diagonal = ~clean_q & ~clean_k & (block_k == block_q)
    offset_block_causal = ~clean_q & clean_k & (block_k < block_q) & (doc_k == doc_q)
    block_causal = clean_q & clean_k & (block_k <= block_q) & (doc_k == doc_q)
    return block_diagonal | offset_block_causal | block_causal

def doubled_layout(tokens: Tensor, block_size: int, eot_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Document (as mask_rule reads it), block and is-clean of every position of [x_t ; x_0], from x_0 alone."""
    doc, block, block_doc = document_layout(tokens, block_size, eot_id)
    clean = torch.arange(2 * tokens.size(-1), device=tokens.device) >= tokens.size(-1)
    return torch.cat([block_doc, doc], -1), torch.cat([block, block], -1), clean.expand(*tokens.shape[:-1], -1)

def block_diffusion_mask(tokens: Tensor, block_size: int, eot_id: int) -> Tensor:
    """Dense boolean mask [..., 2L, 2L] (queries by keys, x_t first) of the pass over `tokens` [..., L]."""
    doc, block, clean = doubled_layout(tokens, block_size, eot_id)
    q, k = (..., slice(None), None), (..., None, slice(None))
    return mask_rule(doc[q], block[q], clean[q], doc[k], block[k], clean[k])

def block_diffusion_block_mask(tokens: Tensor, block_size: int, eot_id: int) -> BlockMask:
    """The same mask as a FlexAttention BlockMask (one per row of [N, L]) from per-tile summaries, in O(N (2L/TILE)^2):
    documents and blocks only grow along each half, so a tile's first and last values bound it. A tile pair is
    skipped when no pair in it can pass the rule, full when every pair must."""
    length = tokens.size(-1)
    if length % TILE:
        raise ValueError(f"the flex attention backend needs a sequence length divisible by {TILE}, got {length}")
    doc, block, clean = doubled_layout(tokens.reshape(-1, length), block_size, eot_id)  # [N, 2L] each

    def tile_ends(x: Tensor) -> tuple[Tensor, Tensor]:
        per_tile = x.reshape(x.size(0), 2 * length // TILE, TILE)
        return per_tile[..., 0], per_tile[..., -1]

    (first_doc, last_doc), (first_block, last_block), (tile_clean, _) = map(tile_ends, (doc, block, clean))
    q, k = (..., slice(None), None), (..., None, slice(None))
    noisy_to_noisy, noisy_to_clean = ~tile_clean[q] & ~tile_clean[k], ~tile_clean[q] & tile_clean[k]
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

def flex_kernel_options(props) -> dict:
    """FlexAttention options for a GPU's properties: smaller tiles where the defaults need more shared memory."""
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

def rotary_tables(pos: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """cos and sin [N, S, 1, head_dim / 2] of the angles pos * ROPE_BASE^(-2i/head_dim), once per pass."""
    half = head_dim // 2
    # float64: a cache window far from position 0 must agree with a recompute of the same window from 0
    inv_freq = ROPE_BASE ** -(torch.arange(half, device=pos.device, dtype=torch.float64) / half)
    angle = pos[..., None, None].double() * inv_freq
    return angle.cos().float(), angle.sin().float()

def rotary(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    cos, sin = (table.to(x.dtype) for table in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], -1)

def linear(dim_in: int, dim_out: int, zero: bool = False) -> nn.Linear:
    layer = nn.Linear(dim_in, dim_out, bias=False)
    bound = 3**0.5 * 0.5 * dim_in**-0.5
    nn.init.zeros_(layer.weight) if zero else nn.init.uniform_(layer.weight, -bound, bound)
    return layer

class Attention(nn.Module):
    def __init__(self, config: ModelConfig, first_layer: bool):
        super().__init__()
        inner, self.n_head, self.head_dim = config.n_head * config.head_dim, config.n_head, config.head_dim
        self.q, self.k, self.v = (linear(config.model_dim, inner) for _ in range(3))
        self.proj = linear(inner, config.model_dim, zero=True)
        # value residual: later layers mix the first layer's values into their own
        self.value_mix = None if first_layer else nn.Parameter(torch.tensor(0.5))
        self.flex_options = {}  # BD3LM.set_flex_options: the GPU at hand's

    def forward(self, x: Tensor, rope, mask, first_values, past=None):
        """x [N, S, dim] attends to the cached (k, v) `past` and itself under `mask`; (output, its (k, v), values)."""
        N, S, _ = x.shape
        q, k, v = (proj(x).view(N, S, self.n_head, self.head_dim) for proj in (self.q, self.k, self.v))
        values = v = v if first_values is None else (1 - self.value_mix) * v + self.value_mix * first_values
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
        self.up = linear(config.model_dim, config.mlp_hidden)
        self.down = linear(config.mlp_hidden, config.model_dim, zero=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.relu(self.up(x)).square())

class Block(nn.Module):
    def __init__(self, config: ModelConfig, first_layer: bool):
        super().__init__()
        self.attn, self.mlp = Attention(config, first_layer), MLP(config)

    def forward(self, x, rope, mask, first_values, past=None):
        y, new_kv, values = self.attn(norm(x), rope, mask, first_values, past)
        x = x + y
        return x + self.mlp(norm(x)), new_kv, values

class Trunk(nn.Module):
    """Embedding and blocks with U-net skips: ids [N, S] -> normed hidden states [N, S, dim] and each layer's (k, v)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size + 1, config.model_dim)
        self.blocks = nn.ModuleList(Block(config, i == 0) for i in range(config.n_layer))
        self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2))
        self.head_dim = config.head_dim

    def forward(self, idx: Tensor, pos: Tensor, mask, past=None):
        x, rope = norm(self.embed(idx)), rotary_tables(pos, self.head_dim)
        skips, new_kvs, first_values, half = [], [], None, len(self.blocks) // 2
        for i, block in enumerate(self.blocks):
            if i >= half:
                x = x + self.skip_weights[i - half] * skips.pop()
            x, new_kv, values = block(x, rope, mask, first_values, None if past is None else past[i])
            first_values = values if i == 0 else first_values
            new_kvs.append(new_kv)
            if i < half:
                skips.append(x)
        return norm(x), new_kvs

class BD3LM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config, self.trunk = config, Trunk(config)
        self.head = linear(config.model_dim, config.padded_vocab, zero=True)
        self.flex = self.compiled = False  # compile_loss sets them

    def forward(self, tokens: Tensor, noise: Noise) -> Tensor:
        """The mean token_losses of `tokens` ([L] or [N, L]); with t ~ U(0, 1), a bound on the NLL in nats/token."""
        return self.token_losses(tokens, noise).sum() / tokens.numel()

    def token_losses(self, tokens: Tensor, noise: Noise) -> Tensor:
        """Per-token loss shaped like `tokens`: CE times the noise's weight where masked, 0 elsewhere (unmasked tokens
        are copied through). Eager, the head runs on the masked positions only; compiled, on all of them at weight 0
        where unmasked, so every shape is fixed and nothing waits for the device to count masked tokens."""
        self.check_tokens(tokens, (1, 2))
        if noise.masked.shape != tokens.shape or noise.weight.shape != tokens.shape:
            raise ValueError(f"noise of shape {tuple(noise.masked.shape)} for tokens of shape {tuple(tokens.shape)}")
        x_0 = tokens.reshape(-1, tokens.size(-1))
        x_t = torch.where(noise.masked, self.config.mask_id, tokens).reshape_as(x_0)
        hidden = self._pass(x_t, x_0)[:, : x_0.size(1)].flatten(0, 1)
        targets, masked, weight = x_0.flatten(), noise.masked.flatten(), noise.weight.flatten()
        compiling = torch.compiler.is_compiling()
        rows = torch.arange(targets.numel(), device=tokens.device) if compiling else masked.nonzero().squeeze(1)
        logits = self.logits_of(hidden if compiling else hidden[rows], padded=compiling)
        ce = F.cross_entropy(logits, targets[rows], reduction="none")
        return torch.zeros(targets.numel(), device=tokens.device).index_put((rows,), ce * weight[rows]).view_as(tokens)

    def logits(self, x_t: Tensor, x_0: Tensor) -> Tensor:
        """Logits [N, L, vocab_size] of the noisy half of [x_t ; x_0], by the slow, obvious path (the dense mask)."""
        for x in (x_0, x_t):
            self.check_tokens(x, (2,), allow_mask=True)
        return self.logits_of(self._pass(x_t, x_0, dense=True)[:, : x_0.size(1)])

    def logits_of(self, hidden: Tensor, padded: bool = False) -> Tensor:
        """Softcapped fp32 logits over the real vocabulary: [MASK] and the padding are never predicted. `padded`: the
        whole head (a width the compiled loss tiles), -inf past the vocabulary (after the softcap: it would be -cap)."""
        logits = self.head(hidden).float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        past_vocab = torch.arange(logits.size(-1), device=logits.device) >= self.config.vocab_size
        return logits.masked_fill(past_vocab, float("-inf")) if padded else logits[..., : self.config.vocab_size]

    def _pass(self, x_t: Tensor, x_0: Tensor, dense: bool = False) -> Tensor:
        """Hidden states of [x_t ; x_0]: BlockMask and flex inside a compiled flex loss, else the dense mask."""
        cfg, pos = self.config, torch.arange(x_0.size(1), device=x_0.device)
        if not dense and self.flex and torch.compiler.is_compiling():
            mask = block_diffusion_block_mask(x_0, cfg.block_size, cfg.eot_id)
        else:
            mask = block_diffusion_mask(x_0, cfg.block_size, cfg.eot_id)[:, None]
        return self.trunk(torch.cat([x_t, x_0], 1), torch.cat([pos, pos])[None], mask)[0]

    def check_tokens(self, tokens: Tensor, dims: tuple[int, ...], allow_mask: bool = False) -> None:
        if tokens.dim() not in dims or tokens.numel() == 0:
            raise ValueError(f"expected a non-empty {' or '.join(f'{d}-D' for d in dims)} tensor of token ids, "
                             f"got shape {tuple(tokens.shape)}")
        if not torch.compiler.is_compiling():  # compiled callers check on the CPU: a read-back would break the graph
            check_token_ids(tokens, self.config.vocab_size + allow_mask)

    def compile_loss(self, backend="inductor", flex: bool | None = None) -> None:
        """Compile token_losses as one full static graph per shape, without the token-id check. `flex` (default: on a
        GPU): FlexAttention and a BlockMask, else SDPA and the dense mask (eager flex materializes every score)."""
        self.flex, self.compiled = self.head.weight.is_cuda if flex is None else flex, True
        self.token_losses = torch.compile(self.token_losses, fullgraph=True, dynamic=False, backend=backend)

    def set_flex_options(self, options: dict) -> None:
        for block in self.trunk.blocks:
            block.attn.flex_options = dict(options)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Muon takes the hidden matrices; Adam the embedding, the head and the scalars."""
        return {"hidden_matrices": [p for p in self.trunk.blocks.parameters() if p.dim() == 2],
                "embed": [self.trunk.embed.weight], "head": [self.head.weight],
                "scalars": [p for p in self.trunk.parameters() if p.dim() < 2]}
