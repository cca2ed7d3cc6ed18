"""
The estimate of train.py's record run on GPUs, for the code as it is now (RECIPE); bench.py prints it. Nothing here
is timed: each part of a step is FLOPs, bytes, eager ops and bus bytes over datasheet peaks at assumed efficiencies
(docs/performance.md), peak memory what a GPU holds when the backward starts. Only the BlockMask's share of attention
tiles is taken from the code, counted on synthetic streams.
"""

import os, statistics, sys
from collections import namedtuple
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import train
from model import BD3LM, TILE, ModelConfig, block_diffusion_block_mask
from noise import TRAIN_ESTIMATOR, count_table

RECIPE = ("the head and loss in one compiled graph on every noisy row (static shapes, no host sync); the preset's "
          "micro_batch rows per forward (the FLOPs and bytes of one row at a time: rows change the memory and the "
          "number of forwards); one all-reduce of every gradient after the backward, exposed in full; Muon's "
          "Newton-Schulz shared by the ranks in turns and all-gathered; compile before the clock starts")
# match: a part of torch.cuda.get_device_name(); count: GPUs of the record set-up; bf16_flops: dense peak in FLOP/s;
# bandwidths in bytes/s (bus: NCCL all-reduce bus bandwidth per GPU, assumed); memory in bytes; train.py's preset
GPU = namedtuple("GPU", "name match count bf16_flops memory_bandwidth bus_bandwidth memory preset")
GPUS = (GPU("H100 SXM", "H100", 8, 989e12, 3.35e12, 400e9, 80 * 2**30, "record"),  # datasheets
        GPU("RTX 3090", "3090", 1, 71e12, 936e9, 0.0, 24 * 2**30, "record_24gb"))
EFFICIENCY = {"matmul": 0.55, "attention": 0.35, "memory": 0.8}  # assumed shares of the peaks
EAGER_OP_SECONDS = 5e-6  # host time of one eager op: Muon's small ops on 768-wide matrices are bound by it
FLASH_BACKWARD = 2.5  # flash attention's backward recomputes the scores: 5 matmuls to the forward's 2
FINEWEB_MEAN_DOC = 1000  # tokens per FineWeb-Edu document, about
EOT = ModelConfig().eot_id
# Muon's eager ops (tests/tools/test_bench.py counts them): per matrix momentum lerp_ and the update (view, mul_,
# add_); per turn the Nesterov lerp, newton_schulz's 24 and 3 to flatten, gather and split; a tall matrix 3 more
MUON_OPS_PER_MATRIX, MUON_OPS_PER_TURN = 4, 28
# Bytes per logit of the compiled head and loss (an assumed fusion): traffic of the bf16 logits, their gradient and
# one fp32 tensor; memory of the kept logits meeting their gradient and that tensor
LOSS_TRAFFIC, LOSS_MEMORY = 20, 8

@dataclass(frozen=True)
class Work:
    """One part of a step on one GPU: FLOPs at EFFICIENCY[kind], memory bytes, eager ops and exposed bus bytes."""
    flops: float = 0.0
    kind: str = "matmul"
    bytes: float = 0.0
    eager_ops: int = 0
    bus_bytes: float = 0.0

    def seconds(self, gpu: GPU) -> float:
        """The GPU's time for the FLOPs and bytes (or the host's for the eager ops if longer), plus communication."""
        device = self.flops / (gpu.bf16_flops * EFFICIENCY[self.kind]) \
            + self.bytes / (gpu.memory_bandwidth * EFFICIENCY["memory"])
        return max(device, self.eager_ops * EAGER_OP_SECONDS) + (self.bus_bytes and self.bus_bytes / gpu.bus_bandwidth)

    def __str__(self) -> str:
        figures = ((self.flops, f"{self.flops / 1e12:.2f} TFLOP"), (self.bytes, f"{self.bytes / 1e9:.1f} GB"),
                   (self.eager_ops, f"{self.eager_ops} eager ops"),
                   (self.bus_bytes, f"{self.bus_bytes / 1e9:.2f} GB on the bus"))
        return ", ".join(text for value, text in figures if value) or "none"

def gpu_spec(device_name: str) -> GPU | None:
    return next((gpu for gpu in GPUS if gpu.match in device_name), None)

def document_stream(length: int, mean_doc: int, generator: torch.Generator) -> torch.Tensor:
    """Random token ids cut by EOT into documents of about `mean_doc` tokens (one document if mean_doc >= length)."""
    tokens = torch.randint(0, EOT, (length,), generator=generator)
    tokens[torch.rand(length, generator=generator) < 1 / mean_doc] = EOT
    return tokens

def tile_fraction(tokens: torch.Tensor, block_size: int) -> float:
    """Share of the TILE x TILE tiles of the [x_t ; x_0] score matrix that the BlockMask computes (partial or full)."""
    block_mask = block_diffusion_block_mask(tokens, block_size, EOT)
    return (block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()).item() / (2 * len(tokens) // TILE)**2

def fineweb_tile_fraction(seq_len: int, block_size: int, streams: int = 16) -> float:
    gen = torch.Generator().manual_seed(2)
    return statistics.mean(tile_fraction(document_stream(seq_len, FINEWEB_MEAN_DOC, gen), block_size)
                           for _ in range(streams))

def parameter_groups(config: ModelConfig) -> dict[str, list[torch.Tensor]]:
    with torch.device("meta"):  # shapes without memory
        return BD3LM(config).param_groups()

def numel(tensors) -> int:
    return sum(t.numel() for t in tensors)

def saved_activation_bytes(config: ModelConfig) -> int:
    """Bytes kept for the backward per position of [x_t ; x_0] and layer, bf16 autocast (rotary, relu^2 recomputed)."""
    d, inner, hidden = config.model_dim, config.n_head * config.head_dim, config.mlp_hidden
    return (2 * 4 * d  # the residual stream entering attention and the MLP (fp32, as the embedding is)
            + 2 * 2 * d  # its normed copies: the input of q, k, v and of the up projection
            + 2 * 2 * inner + 2 * inner  # q and k before the QK-norm, v before the value-residual mix
            + 3 * 2 * inner  # q, k and v entering attention
            + 2 * inner + 4 * config.n_head  # the attention output and its logsumexp (fp32)
            + 2 * 2 * hidden)  # the up projection's output and relu^2 of it, the down projection's input

def peak_memory(config: ModelConfig, tokens: int) -> dict[str, float]:
    """Bytes by part on one GPU as the backward of `tokens` tokens starts (CUDA context and temporaries on top)."""
    groups = parameter_groups(config)
    params, hidden = [p for group in groups.values() for p in group], groups["hidden_matrices"]
    adam = groups["embed"] + groups["head"] + groups["scalars"]
    per_position = config.n_layer * saved_activation_bytes(config) + 2 * 4 * config.model_dim
    return {
        "weights (fp32)": 4 * numel(params),
        "bf16 copies of the matrices for the matmuls": 2 * numel(hidden + groups["head"]),
        "gradients (fp32)": 4 * numel(params),
        "optimizer states (fp32): Muon momentum, Adam's two moments and step":
            4 * numel(hidden) + 8 * numel(adam) + 4 * len(adam),
        f"trunk activations: {saved_activation_bytes(config):,} bytes per position and layer, and the fp32 "
        "embedding and final norm inputs": 2 * tokens * per_position,
        f"head and loss buffers ({LOSS_MEMORY} bytes per logit of every noisy row)":
            tokens * config.padded_vocab * LOSS_MEMORY,
    }

def model_flops_per_token(config: ModelConfig, seq_len: int, masked_fraction: float) -> float:
    """Training FLOPs (3x forward) per clean token: the trunk on both halves, the head on the masked fraction only
    (what the objective needs; the compiled loss runs every noisy row), attention for one seq_len-token document,
    where a query sees about seq_len / 2 + block_size keys in either half."""
    c, inner = config, config.n_head * config.head_dim
    matmul_params = c.n_layer * (4 * c.model_dim * inner + 2 * c.model_dim * c.mlp_hidden)
    trunk = 2 * (2 * matmul_params + c.n_layer * 4 * inner * (seq_len / 2 + c.block_size))
    return 3 * (trunk + masked_fraction * 2 * c.model_dim * c.padded_vocab)

def training_masked_fraction(hp: train.Hyperparameters, estimator: str = TRAIN_ESTIMATOR) -> float:
    """The expected share of masked tokens in a full block of the run's training noise."""
    if estimator != "proposal":  # t uniform on [lo, hi], each token masked with probability t
        return (hp.t_lo + hp.t_hi) / 2
    cumulative = count_table(hp.block_size, hp.t_lo, hp.t_hi)[0][-1].clamp(max=1.0)  # q_1 + ... + q_k, k = 1..n
    q = cumulative.diff(prepend=cumulative.new_zeros(1))
    return float((q * torch.arange(1, hp.block_size + 1)).sum()) / hp.block_size

def step_parts(config: ModelConfig, seq_len: int, sequences: int, world_size: int, tiles: float) -> dict[str, Work]:
    """Each part's work in one step on one of `world_size` GPUs of `sequences` x seq_len tokens, `tiles` computed."""
    c, groups = config, parameter_groups(config)
    hidden, params = groups["hidden_matrices"], [p for group in groups.values() for p in group]
    positions = sequences * 2 * seq_len  # [x_t ; x_0]; the head and loss run on the x_t half
    # scores and weighted values, 2 x 2 FLOPs per query, key and head dimension, on the computed share of the pairs
    attention = sequences * 4 * c.n_head * c.head_dim * tiles * (2 * seq_len) ** 2 * c.n_layer
    mine = [turn[0] for turn in train.turns(hidden, world_size)]  # rank 0 orthogonalizes a matrix in every turn
    # 5 quintic Newton-Schulz iterations on an m x n matrix (m <= n): X X^T, B = bA + cA^2, B X
    newton_schulz = sum(5 * (4 * m * m * n + 2 * m**3) for m, n in (sorted(p.shape) for p in mine))
    # only the last turn's all-gather is exposed (the others overlap the next Newton-Schulz); the all-reduce is not
    gather = (world_size - 1) * 2 * mine[-1].numel()
    return {
        "trunk matmuls": Work(flops=6 * numel(hidden) * positions),  # 2 FLOPs per weight forward, 4 backward
        "trunk pointwise (norms, rotary, residuals, relu^2; 4x the saved activations)":
            Work(bytes=4 * positions * c.n_layer * saved_activation_bytes(c)),
        f"attention (flex, {tiles:.1%} of the tiles)": Work(flops=(1 + FLASH_BACKWARD) * attention, kind="attention"),
        "head, softcap, cross-entropy (every noisy row)":
            Work(flops=6 * c.model_dim * c.padded_vocab * positions / 2,
                 bytes=LOSS_TRAFFIC * c.padded_vocab * positions / 2),
        "optimizer: Muon": Work(flops=newton_schulz, bytes=30 * numel(hidden) + 18 * numel(mine),  # own matrices
                                eager_ops=MUON_OPS_PER_MATRIX * len(hidden)
                                + sum(MUON_OPS_PER_TURN + 3 * (p.size(0) > p.size(1)) for p in mine)),
        "optimizer: Adam (fused)": Work(bytes=28 * (numel(params) - numel(hidden))),  # reads 4 fp32, writes 3
        "communication: gradient all-reduce, Muon all-gather":
            Work(bus_bytes=2 * (world_size - 1) / world_size * 4 * numel(params) + gather),
    }
