"""
Measure training speed, scaling with sequence length, attention-mask cost and sampling speed; estimate the
record run on GPUs from FLOPs and bytes.

    python bench.py                      # on the machine's accelerator if it has one, else the CPU
    python bench.py --quick=True         # fewer and smaller runs: under 5 minutes on a 2-core CPU
    python bench.py --checkpoint=checkpoints/demo/final.pt   # sampling figures from a trained model
    python bench.py --estimate_only=True # only the GPU estimates for the record config: seconds, times nothing

Prints one markdown report. Every time is the median of several runs after a warm-up. FLOP utilization is
achieved model FLOP/s (model.model_flops_per_token, the count train.py logs) divided by the matmul peak
that this script measures on the same machine in the same run. The estimates for 8x H100 and 1x RTX 3090 are
not measurements: FLOPs and bytes of each part of a step over datasheet peaks and assumed efficiencies, with
the BlockMask's share of attention tiles measured here; on a GPU the report puts the measured step next to the
estimate for it. It knows the model, the trainer's optimizer set-up and the sampler; it writes nothing to disk.
"""

import platform
import statistics
import sys
import time
from dataclasses import dataclass, fields

import torch

from model import (
    BD3LM,
    TILE,
    ModelConfig,
    Noise,
    block_diffusion_block_mask,
    block_diffusion_mask,
    flex_kernel_options,
    model_flops_per_token,
)
from model import train_noise as make_train_noise
from sample import Settings as SampleSettings
from sample import generate, load_model
from train import (
    PRESETS,
    ConfigError,
    Hyperparameters,
    cpu_has_bf16_kernels,
    make_optimizers,
    model_config,
    parse_flags,
    setting,
    to_device,
    turns,
)

EOT = 50256


@dataclass
class BenchSettings:
    device: str = setting("auto", "auto (cuda if available, else cpu), cpu or cuda")
    quick: bool = setting(False, "fewer repeats and shorter sequences")
    repeats: int = setting(5, "timed runs per figure (quick: 3)")
    checkpoint: str = setting("", "sample from this checkpoint (e.g. the demo's); empty: a demo-size random model")
    estimate_only: bool = setting(False, "print only the GPU estimates for the record config; times nothing")


def usage() -> str:
    lines = ["usage: python bench.py [--name=value ...]", ""]
    lines += [f"  {f'--{f.name}={f.default}':<28} {f.metadata['help']}" for f in fields(BenchSettings)]
    return "\n".join(lines)


def parse_settings(argv: list[str]) -> BenchSettings:
    bench = BenchSettings(**parse_flags(argv, BenchSettings))
    if bench.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {bench.device!r}")
    if bench.repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {bench.repeats}")
    return bench


def median_time(fn, repeats: int, device: torch.device, warmup: bool = True) -> float:
    """Median seconds of fn() over `repeats` runs, after one warm-up run."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def document_stream(length: int, mean_doc: int, generator: torch.Generator) -> torch.Tensor:
    """Random token ids cut by <|endoftext|> into documents of about `mean_doc` tokens (one document when
    mean_doc >= length)."""
    tokens = torch.randint(0, EOT, (length,), generator=generator)
    tokens[torch.rand(length, generator=generator) < 1 / mean_doc] = EOT
    return tokens


def tile_fraction(tokens: torch.Tensor, block_size: int) -> float:
    """Share of the TILE x TILE tiles of the [x_t ; x_0] score matrix that the BlockMask computes (partial or full)."""
    block_mask = block_diffusion_block_mask(tokens, block_size, EOT)
    computed = block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()
    return computed.item() / (2 * tokens.numel() // TILE) ** 2


# -----------------------------------------------------------------------------
# Measurements


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    n = 4096 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / median_time(lambda: a @ b, repeats, device)


class TrainStep:
    """One optimizer step of train.py's recipe (forward, backward, Muon + Adam) on a fixed window of `rows`
    sequences in one forward; on a GPU with the loss compiled, as train.py compiles it."""

    def __init__(self, config: ModelConfig, seq_len: int, mean_doc: int, device: torch.device, bf16: bool,
                 rows: int = 1):
        gen = torch.Generator().manual_seed(0)
        self.model = BD3LM(config).to(device)
        if device.type == "cuda":  # what train.py does on a GPU
            self.model.set_flex_options(flex_kernel_options(torch.cuda.get_device_properties(device)))
            self.model.compile_loss()
        self.optimizers = make_optimizers(self.model, Hyperparameters(), fast_bf16=bf16)
        tokens = document_stream(rows * seq_len, mean_doc, gen).view(rows, seq_len)
        noise = make_train_noise(rows * seq_len, config.block_size, 0.3, 0.8, gen)
        self.tokens, self.noise = to_device(tokens, Noise(*(x.view(rows, seq_len) for x in noise)), device,
                                            config.vocab_size)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def __call__(self) -> None:
        with self.autocast:
            loss = self.model(self.tokens, self.noise)
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
        self.model.zero_grad(set_to_none=True)


def profile_step(step: TrainStep, top: int = 3) -> list[tuple[str, float]]:
    """The `top` operators by self time in one training step, with their share of the step."""
    step()
    with torch.profiler.profile() as prof:
        step()
    events = [e for e in prof.key_averages() if e.self_device_time_total or e.self_cpu_time_total]
    total = sum(max(e.self_device_time_total, e.self_cpu_time_total) for e in events)
    events.sort(key=lambda e: -max(e.self_device_time_total, e.self_cpu_time_total))
    return [(e.key, max(e.self_device_time_total, e.self_cpu_time_total) / total) for e in events[:top]]


# -----------------------------------------------------------------------------
# Estimates: FLOPs and bytes of each part of a training step over GPU peaks and assumed efficiencies


@dataclass(frozen=True)
class GPU:
    name: str
    match: str  # in torch.cuda.get_device_name() of the GPUs this spec stands for
    count: int  # GPUs of the record set-up
    bf16_flops: float  # dense tensor-core peak, FLOP/s
    memory_bandwidth: float  # bytes/s
    bus_bandwidth: float  # NCCL all-reduce bus bandwidth per GPU, bytes/s
    memory: int  # bytes
    preset: str  # train.py's preset for this GPU


GPUS = (
    # H100 SXM5 datasheet: 989 TFLOP/s dense bf16 (1979 is with sparsity), 3.35 TB/s HBM3, 80 GB
    # NVLink 4 moves 450 GB/s each way per GPU; NCCL all-reduce is assumed to reach 400 GB/s of bus bandwidth
    GPU("H100 SXM", "H100", 8, 989e12, 3.35e12, 400e9, 80 * 2**30, "record"),
    # GA102 whitepaper: RTX 3090 tensor cores 71 TFLOP/s dense bf16 with fp32 accumulation (142 is with sparsity)
    # 936 GB/s GDDR6X, 24 GB; one card, so no communication
    GPU("RTX 3090", "3090", 1, 71e12, 936e9, 0.0, 24 * 2**30, "record_24gb"),
)
# assumed, not measured: the share of the peak each kind of work reaches
EFFICIENCY = {"matmul": 0.55, "attention": 0.35, "memory": 0.8}  # attention: block-sparse flex, slower backward
EAGER_OP_SECONDS = 5e-6  # host time of one eager op: Muon's small ops on 768-wide matrices are bound by it
HOST_SYNC_SECONDS = 100e-6  # the GPU idles after a host sync until the next kernels arrive (assumed)
COMPILE_SECONDS = 120  # DESIGN.md section 11: 1-3 minutes (estimate)
FLASH_BACKWARD = 2.5  # flash attention's backward recomputes the scores: 5 matmuls to the forward's 2
FINEWEB_MEAN_DOC = 1000  # tokens per FineWeb-Edu document, about (its 10B-token sample holds ~9.7M documents)
# Muon's eager ops (counted by tests/test_bench.py): per matrix the momentum lerp_ and the update (view, mul_,
# add_); per turn, for the matrix this rank orthogonalizes, the Nesterov lerp, newton_schulz's 24 (cast, norm,
# clamp, divide, 5 x (transpose and 3 matmuls)) and 3 to flatten, gather and split the updates; a tall matrix
# takes 3 more (two transposes, and a copy to flatten the transposed result)
MUON_OPS_PER_MATRIX = 4
MUON_OPS_PER_TURN = 28
# bytes per logit (row x padded vocabulary) of the head and the loss. Eager: 6 ops forward (bf16 head output, fp32
# cast, divide, tanh, multiply, log-softmax: 44 bytes) and 8 backward (each in reverse, the zero-filled gradients
# of the loss and the slice, the two matmuls reading the gradient: 64), each through the whole tensor; it keeps
# tanh's and log-softmax's fp32 outputs, and their fp32 gradients meet them in the backward.
EAGER_LOSS_TRAFFIC, EAGER_LOSS_MEMORY = 108, 16
# Compiled (assumed fusion): the bf16 logits written once and read twice, their bf16 gradient written once and
# read by both matmuls, and one fp32 tensor Inductor may write and read; it keeps the logits, meets their
# gradient and that fp32 tensor.
COMPILED_LOSS_TRAFFIC, COMPILED_LOSS_MEMORY = 20, 8


@dataclass(frozen=True)
class Recipe:
    """What train.py does on a GPU: before and after the changes of issue 11."""
    name: str
    compiled_loss: bool  # head and loss in the compiled graph on every noisy row; else eager on the masked rows
    shared_muon: bool  # each rank orthogonalizes its turns of the matrices; else every rank all of them
    compile_in_clock: bool
    summary: str


BEFORE = Recipe("before", False, False, True,
                "one sequence per forward, trunk compiled, head and loss eager on the gathered masked rows (3 host "
                "syncs a forward), one all-reduce per parameter after the backward, every rank runs all of Muon, "
                "compile in the clock")
AFTER = Recipe("after", True, True, False,
               "the whole loss in one compiled graph on every noisy row (static shapes, no sync), bucketed "
               "all-reduce (still exposed: the compiled backward hands over every gradient at its end), Muon's "
               "Newton-Schulz shared by the ranks and all-gathered, compile before the clock, the preset's "
               "sequences per forward (the same FLOPs and bytes as one at a time: it changes the memory and the "
               "number of forwards)")


@dataclass(frozen=True)
class Work:
    """What one part of a step asks of one GPU."""
    flops: float = 0.0
    kind: str = "matmul"  # the EFFICIENCY its FLOPs run at
    bytes: float = 0.0  # through memory, in pointwise and reduction kernels
    eager_ops: int = 0  # launched one at a time from Python
    syncs: int = 0  # times the host waits for the GPU
    bus_bytes: float = 0.0  # communication nothing overlaps, in bus bytes (NCCL's busbw convention)

    def seconds(self, gpu: GPU) -> float:
        """The GPU's time for the FLOPs and bytes, or the host's for the eager ops when that is longer, plus the
        syncs and the exposed communication."""
        device = self.flops / (gpu.bf16_flops * EFFICIENCY[self.kind]) \
            + self.bytes / (gpu.memory_bandwidth * EFFICIENCY["memory"])
        bus = self.bus_bytes / gpu.bus_bandwidth if self.bus_bytes else 0.0
        return max(device, self.eager_ops * EAGER_OP_SECONDS) + self.syncs * HOST_SYNC_SECONDS + bus

    def __str__(self) -> str:
        figures = ((self.flops, f"{self.flops / 1e12:.2f} TFLOP"), (self.bytes, f"{self.bytes / 1e9:.1f} GB"),
                   (self.eager_ops, f"{self.eager_ops} eager ops"), (self.syncs, f"{self.syncs} host syncs"),
                   (self.bus_bytes, f"{self.bus_bytes / 1e9:.2f} GB on the bus"))
        return ", ".join(text for value, text in figures if value) or "none"


def parameter_groups(config: ModelConfig) -> dict[str, list[torch.Tensor]]:
    """The model's parameters by optimizer group, built on the meta device: shapes without memory."""
    with torch.device("meta"):
        return BD3LM(config).param_groups()


def numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def trunk_matmul_flops(hidden_matrices: list[torch.Tensor], positions: int) -> float:
    """Every hidden matrix at every position of [x_t ; x_0]: 2 FLOPs per weight forward, 4 backward."""
    return 6 * numel(hidden_matrices) * positions


def attention_forward_flops(config: ModelConfig, seq_len: int, tiles: float) -> float:
    """Scores and weighted values (2 x 2 FLOPs per query, key and head dimension) over the computed share `tiles`
    of the (2 seq_len)^2 pairs of [x_t ; x_0], in every layer."""
    return 4 * config.n_head * config.head_dim * tiles * (2 * seq_len) ** 2 * config.n_layer


def head_flops(config: ModelConfig, rows: float) -> float:
    return 6 * config.model_dim * config.padded_vocab * rows


def newton_schulz_flops(shape: torch.Size) -> float:
    """Five quintic iterations on an m x n matrix (m <= n): X X^T (2 m^2 n), B = bA + cA^2 (2 m^3), B X (2 m^2 n)."""
    m, n = sorted(shape)
    return 5 * (4 * m * m * n + 2 * m**3)


def saved_activation_bytes(config: ModelConfig) -> int:
    """Bytes the backward keeps per position of [x_t ; x_0] and per layer under bf16 autocast (an estimate of what
    the compiled trunk keeps: matmul inputs and outputs and norm inputs; the rotary and relu^2 are recomputed)."""
    d, inner, hidden = config.model_dim, config.n_head * config.head_dim, config.mlp_hidden
    return (2 * 4 * d  # the residual stream entering attention and the MLP (fp32, as the embedding is)
            + 2 * 2 * d  # its normed copies: the input of q, k, v and of the up projection
            + 2 * 2 * inner  # q and k before the QK-norm
            + 2 * inner  # v before the value-residual mix
            + 3 * 2 * inner  # q, k and v entering attention
            + 2 * inner + 4 * config.n_head  # the attention output and its logsumexp (fp32)
            + 2 * 2 * hidden)  # the up projection's output and relu^2 of it, the down projection's input


def peak_memory(config: ModelConfig, tokens: int, recipe: Recipe, masked_fraction: float) -> dict[str, float]:
    """Bytes on one GPU by part when the backward of a micro-step of `tokens` tokens starts: what the step keeps
    and what autograd saved for the backward. An estimate: the CUDA context, allocator slack and the temporaries
    of single kernels come on top."""
    groups = parameter_groups(config)
    params = [p for group in groups.values() for p in group]
    adam = [p for name in ("embed", "head", "scalars") for p in groups[name]]
    states = 4 * numel(groups["hidden_matrices"]) + 8 * numel(adam) + 4 * len(adam)
    activations = 2 * tokens * (config.n_layer * saved_activation_bytes(config) + 2 * 4 * config.model_dim)
    rows = tokens if recipe.compiled_loss else masked_fraction * tokens
    loss_bytes = COMPILED_LOSS_MEMORY if recipe.compiled_loss else EAGER_LOSS_MEMORY
    loss_rows = "every noisy row, compiled" if recipe.compiled_loss else "the masked rows, eager"
    return {
        "weights (fp32)": 4 * numel(params),
        "bf16 copies of the matrices for the matmuls": 2 * numel(groups["hidden_matrices"] + groups["head"]),
        "gradients (fp32)": 4 * numel(params),
        "optimizer states (fp32): Muon momentum, Adam's two moments and step": states,
        f"trunk activations: {saved_activation_bytes(config):,} bytes per position and layer, and the fp32 embedding "
        "and final norm inputs": activations,
        f"head and loss buffers ({recipe.name}: {loss_bytes} bytes per logit of {loss_rows})":
            rows * config.padded_vocab * loss_bytes,
    }


def step_parts(recipe: Recipe, config: ModelConfig, seq_len: int, sequences: int, world_size: int, tiles: float,
               masked_fraction: float) -> dict[str, Work]:
    """The work of each part of one optimizer step on one of `world_size` GPUs, each running `sequences`
    sequences of seq_len tokens (before: one per forward); `tiles` is the BlockMask's computed share of attention
    tiles."""
    groups = parameter_groups(config)
    hidden, params = groups["hidden_matrices"], [p for group in groups.values() for p in group]
    rows = seq_len if recipe.compiled_loss else masked_fraction * seq_len
    loss_traffic = COMPILED_LOSS_TRAFFIC if recipe.compiled_loss else EAGER_LOSS_TRAFFIC
    muon_turns = turns(hidden, world_size if recipe.shared_muon else 1)
    mine = [turn[0] for turn in muon_turns]  # rank 0 has a matrix in every turn
    ring = 2 * (world_size - 1) / world_size
    # The all-reduce is exposed in full both ways: the compiled graph returns every gradient at the end of its
    # backward, so GradReducer's buckets have no backward left to overlap. Each all-gather of bf16 updates overlaps
    # the next turn's Newton-Schulz but the last, which brings each rank the other ranks' matrix of that turn.
    gather = (world_size - 1) * 2 * numel(muon_turns[-1][:1]) if recipe.shared_muon else 0
    return {
        "trunk matmuls": Work(flops=sequences * trunk_matmul_flops(hidden, 2 * seq_len)),
        "trunk pointwise (norms, rotary, residuals, relu^2; 4x the saved activations)":
            Work(bytes=sequences * 4 * 2 * seq_len * config.n_layer * saved_activation_bytes(config)),
        f"attention (flex, {tiles:.1%} of the tiles)":
            Work(flops=sequences * (1 + FLASH_BACKWARD) * attention_forward_flops(config, seq_len, tiles),
                 kind="attention"),
        "head, softcap, cross-entropy": Work(flops=sequences * head_flops(config, rows),
                                             bytes=sequences * loss_traffic * rows * config.padded_vocab,
                                             syncs=0 if recipe.compiled_loss else 3 * sequences),
        "optimizer: Muon": Work(flops=sum(newton_schulz_flops(p.shape) for p in mine),
                                bytes=30 * numel(hidden) + 18 * numel(mine),  # momentum and update; own matrices
                                eager_ops=MUON_OPS_PER_MATRIX * len(hidden)
                                + sum(MUON_OPS_PER_TURN + 3 * (p.size(0) > p.size(1)) for p in mine)),
        "optimizer: Adam (fused)": Work(bytes=28 * (numel(params) - numel(hidden))),  # reads 4 fp32, writes 3
        "communication: gradient all-reduce, Muon all-gather": Work(bus_bytes=ring * 4 * numel(params) + gather),
    }


def gpu_spec(device_name: str) -> GPU | None:
    """The spec of GPUS that stands for a GPU of this name, if any."""
    return next((gpu for gpu in GPUS if gpu.match in device_name), None)


def fineweb_tile_fraction(seq_len: int, block_size: int, streams: int = 16) -> float:
    """The BlockMask's computed share of tiles, averaged over streams of ~FINEWEB_MEAN_DOC-token documents."""
    gen = torch.Generator().manual_seed(2)
    return statistics.mean(tile_fraction(document_stream(seq_len, FINEWEB_MEAN_DOC, gen), block_size)
                           for _ in range(streams))


def preset(name: str) -> Hyperparameters:
    return Hyperparameters(**PRESETS[name])


def print_estimates() -> None:
    """Estimated ms per step, minutes for the record and peak memory, before and after, for each GPU under its
    preset; and the memory formula part by part for both presets."""
    hp = preset("record")
    config, masked = model_config(hp), (hp.t_lo + hp.t_hi) / 2
    tiles = fineweb_tile_fraction(hp.seq_len, hp.block_size)
    params = numel(p for group in parameter_groups(config).values() for p in group)
    print(f"\n## Estimates for the record config (est.: computed from FLOPs and bytes, not measured)\n\n"
          f"{params / 1e6:.1f}M parameters; {hp.steps} steps of {hp.batch_size} sequences x {hp.seq_len} tokens; "
          f"block {hp.block_size}. Datasheet peaks times assumed efficiencies (matmul {EFFICIENCY['matmul']:.0%}, "
          f"attention {EFFICIENCY['attention']:.0%}, memory bandwidth {EFFICIENCY['memory']:.0%}; "
          f"{EAGER_OP_SECONDS * 1e6:.0f} us an eager op, {HOST_SYNC_SECONDS * 1e3:.1f} ms a host sync, "
          f"{COMPILE_SECONDS / 60:.0f} min to compile). The BlockMask computes {tiles:.1%} of the attention tiles "
          f"of {hp.seq_len}-token streams of ~{FINEWEB_MEAN_DOC}-token documents (measured here, 16 streams).\n")
    for recipe in (BEFORE, AFTER):
        print(f"- {recipe.name}: {recipe.summary}")
    for gpu in GPUS:
        run = preset(gpu.preset)
        sequences = run.batch_size // gpu.count
        before, after = (step_parts(recipe, config, run.seq_len, sequences, gpu.count, tiles, masked)
                         for recipe in (BEFORE, AFTER))
        forwards = sequences // run.micro_batch
        print(f"\n### {gpu.count}x {gpu.name}, --preset={gpu.preset}: per GPU and step {forwards} forward"
              f"{'s' * (forwards > 1)} of {run.micro_batch} x {run.seq_len} tokens (before: {sequences} of 1)\n")
        print("| part of one step | work per GPU (before -> after) | before, est. ms | after, est. ms |")
        print("|---|---|---|---|")
        for part, work in before.items():
            said = str(work) if str(work) == str(after[part]) else f"{work} -> {after[part]}"
            print(f"| {part} | {said} | {1e3 * work.seconds(gpu):.1f} | {1e3 * after[part].seconds(gpu):.1f} |")
        step_ms = {recipe: 1e3 * sum(work.seconds(gpu) for work in parts.values())
                   for recipe, parts in ((BEFORE, before), (AFTER, after))}
        minutes = {r: run.steps * step_ms[r] / 60e3 + r.compile_in_clock * COMPILE_SECONDS / 60 for r in step_ms}
        memory = {BEFORE: peak_memory(config, run.seq_len, BEFORE, masked),
                  AFTER: peak_memory(config, run.micro_batch * run.seq_len, AFTER, masked)}
        print(f"| **step** | | **{step_ms[BEFORE]:.0f}** | **{step_ms[AFTER]:.0f}** |")
        print(f"| **record, minutes** ({run.steps} steps; before: + compile in the clock) | | "
              f"**{minutes[BEFORE]:.1f}** | **{minutes[AFTER]:.1f}** |")
        print(f"| **peak memory per GPU, GiB** (of {gpu.memory / 2**30:.0f}) | | "
              f"**{sum(memory[BEFORE].values()) / 2**30:.1f}** | **{sum(memory[AFTER].values()) / 2**30:.1f}** |")

    runs = {name: preset(name) for name in ("record", "record_24gb")}
    memory = {name: peak_memory(config, run.micro_batch * run.seq_len, AFTER, masked) for name, run in runs.items()}
    print("\n### Peak memory per GPU by preset (est.: the formula of bench.peak_memory)\n")
    print("| part | " + " | ".join(f"--preset={name}: {run.micro_batch} x {run.seq_len} tokens per forward, est. GiB"
                                   for name, run in runs.items()) + " |\n|---|---|---|")
    for part in memory["record"]:
        print(f"| {part} | " + " | ".join(f"{parts[part] / 2**30:.2f}" for parts in memory.values()) + " |")
    print("| **total** | " + " | ".join(f"**{sum(parts.values()) / 2**30:.1f}**" for parts in memory.values()) + " |")


# -----------------------------------------------------------------------------
# Report


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(f"{__doc__.strip()}\n\n{usage()}")
        return
    try:
        bench = parse_settings(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    hp = preset("record")
    if bench.estimate_only:
        print(f"# bench.py --estimate_only=True, {time.strftime('%Y-%m-%d')}")
        print_estimates()
        return
    use_cuda = bench.device == "cuda" or (bench.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    repeats = 3 if bench.quick else bench.repeats
    bf16 = use_cuda or cpu_has_bf16_kernels()  # what train.py does with --autocast=auto
    machine = torch.cuda.get_device_name() if use_cuda else f"{platform.processor() or platform.machine()} CPU, " \
        f"{torch.get_num_threads()} threads"
    print(f"# bench.py, {time.strftime('%Y-%m-%d')}\n\nmachine: {machine}; python {platform.python_version()}; "
          f"torch {torch.__version__}; {'quick' if bench.quick else 'full'} run, median of {repeats}\n")

    dtypes = (("fp32", torch.float32), ("bf16", torch.bfloat16)) if bf16 else (("fp32", torch.float32),)
    peaks = {name: matmul_peak(device, dtype, repeats) for name, dtype in dtypes}
    peak = peaks["bf16" if bf16 else "fp32"]
    print("## Matmul peak\n\n| dtype | TFLOP/s |\n|---|---|")
    for name, flops in peaks.items():
        print(f"| {name} | {flops / 1e12:.3f} |")
    if not bf16:
        print("| bf16 | not measured: no bf16 kernels for this CPU (hundreds of times slower than fp32) |")

    demo = ModelConfig(n_layer=4, n_head=4, head_dim=64, model_dim=256, mlp_hidden=1024, attn_backend="auto")
    mid = ModelConfig(n_layer=8, n_head=6, head_dim=64, model_dim=384, mlp_hidden=1536)
    record = ModelConfig()
    gpu = gpu_spec(machine) if use_cuda else None
    record_rows = preset(gpu.preset).micro_batch if gpu else 1  # the forward of this GPU's preset
    train_cases = [("demo", demo, 512, 1), ("mid", mid, 1024, 1)]
    if use_cuda:
        train_cases = [("demo", demo, 4096, 1), ("mid", mid, 16384, 1), ("record", record, hp.seq_len, record_rows)]
    print(f"\n## Training step (forward + backward + Muon/Adam, {'bf16' if bf16 else 'fp32'}, "
          f"~{FINEWEB_MEAN_DOC}-token documents)\n")
    print("| config | params | tokens per forward | step ms | tokens/s | GFLOP/token | FLOP utilization |")
    print("|---|---|---|---|---|---|---|")
    step_seconds = {}
    for name, config, seq_len, rows in train_cases:
        step = TrainStep(config, seq_len, FINEWEB_MEAN_DOC, device, bf16, rows)
        seconds = step_seconds[name] = median_time(step, repeats, device)
        flops, tokens = model_flops_per_token(config, seq_len), rows * seq_len
        print(f"| {name} | {step.model.num_params() / 1e6:.1f}M | {rows} x {seq_len} | {seconds * 1e3:.0f} | "
              f"{tokens / seconds:,.0f} | {flops / 1e9:.3f} | {flops * tokens / seconds / peak:.1%} |")
    top_costs = profile_step(TrainStep(*train_cases[-1][1:3], FINEWEB_MEAN_DOC, device, bf16, train_cases[-1][3]))

    scale_config, base = (record, 8192) if use_cuda else (demo, 256) if bench.quick else (mid, 512)
    print(f"\n## Scaling with sequence length (training step, {scale_config.n_layer}x{scale_config.model_dim} model)\n")
    print("| documents | " + " | ".join(f"{base * k} tokens" for k in (1, 2, 4)) + " | growth 2x | growth 4x |")
    print("|---|---|---|---|---|---|")
    for label, mean_doc in (("~200 tokens", 200), ("one document", 10**9)):
        times = [median_time(TrainStep(scale_config, base * k, mean_doc, device, bf16), repeats, device)
                 for k in (1, 2, 4)]
        print(f"| {label} | " + " | ".join(f"{t * 1e3:.0f} ms" for t in times) +
              f" | {times[1] / times[0]:.2f}x | {times[2] / times[0]:.2f}x |")

    name, config, seq_len, _ = train_cases[-1]
    print(f"\n## Attention mask (block size 16; share of the {name} training step at {seq_len} tokens)\n")
    print("| stream | tokens | tiles computed | BlockMask build ms | dense mask build ms | share of step |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(1)
    for length in (seq_len, 16384):
        for label, mean_doc in (("~1K-token documents", 1000), ("one document", 10**9)):
            tokens = document_stream(length, mean_doc, gen).to(device)
            computed = tile_fraction(tokens, 16)
            build = median_time(lambda: block_diffusion_block_mask(tokens, 16, EOT), repeats, device)
            dense = median_time(lambda: block_diffusion_mask(tokens, 16, EOT), repeats, device) \
                if length == seq_len else None  # a dense 32K x 32K mask is what the BlockMask avoids
            share = f"{(build if use_cuda else dense) / step_seconds[name]:.1%}" if length == seq_len else "-"
            print(f"| {label} | {length} | {computed:.2%} | {build * 1e3:.1f} | "
                  f"{'-' if dense is None else f'{dense * 1e3:.1f}'} | {share} |")

    if bench.checkpoint:
        model, _ = load_model(bench.checkpoint, device)
    else:
        torch.manual_seed(0)
        model = BD3LM(demo).to(device).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
    print(f"\n## Sampling ({bench.checkpoint or 'demo-size model, random weights'}; one sample, stops at EOT)\n")
    print("| sampler | new tokens | KV cache | tokens/s | forwards per token |\n|---|---|---|---|---|")
    for sampler in ("ddpm", "first_hitting", "confidence"):
        for new_tokens, kv_cache in ((256, True), (256, False), (1024, True), (1024, False)):
            if bench.quick and new_tokens > 256 and not kv_cache:
                continue
            settings = SampleSettings(sampler=sampler, max_new_tokens=new_tokens, kv_cache=kv_cache)
            runs = []

            def run():
                generator = torch.Generator(device=device).manual_seed(0)
                runs.append(generate(model, [], settings, generator)[1])

            # generation has nothing to warm up; the slow reference and quick runs are timed once
            once = bench.quick or not kv_cache
            seconds = median_time(run, 1, device, warmup=False) if once else median_time(run, repeats, device)
            stats = runs[-1]
            print(f"| {sampler} | {stats.new_tokens} | {'yes' if kv_cache else 'no'} | "
                  f"{stats.new_tokens / seconds:,.0f} | {stats.forwards / stats.new_tokens:.2f} |")

    print(f"\n## Largest costs in one training step ({train_cases[-1][0]} config, torch.profiler self time)\n")
    print("| operator | share of step |\n|---|---|")
    for name, share in top_costs:
        print(f"| {name} | {share:.1%} |")

    print_estimates()
    if use_cuda:
        tiles = fineweb_tile_fraction(hp.seq_len, hp.block_size)
        parts = step_parts(AFTER, model_config(hp), hp.seq_len, record_rows, 1, tiles, (hp.t_lo + hp.t_hi) / 2)
        estimate = f"{1e3 * sum(w.seconds(gpu) for w in parts.values()):.0f}" if gpu else "no estimate for this GPU"
        print(f"\n## Measured and estimated (record config on this GPU: one forward of {record_rows} x {hp.seq_len} "
              f"tokens, one optimizer step)\n\n| GPU | measured ms | est. ms ({AFTER.name}) |\n|---|---|---|")
        print(f"| {machine} | {1e3 * step_seconds['record']:.0f} | {estimate} |")


if __name__ == "__main__":
    main(sys.argv[1:])
