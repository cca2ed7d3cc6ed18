"""
Train a block diffusion language model (BD3-LM), speedrun style.

    python train.py --preset=demo                       # CPU demo on a built-in corpus, a few minutes
    torchrun --standalone --nproc_per_node=8 train.py   # the record run on FineWeb-Edu

Every setting is a field of Hyperparameters below, overridable as --name=value (`--help` lists them).
The log logs/<run_id>.txt starts with the source of this file and model.py, the versions and the config,
so a run can be reproduced from its log alone. Whatever the number of ranks and of sequences per forward
(`micro_batch`), a step consumes the same `batch_size` sequences of the token stream in the same order, with
the same noise, so 1 GPU and 8 GPUs train the same model: presets `record` (8x H100) and `record_24gb` (one
24 GB GPU) differ only in how a step is cut into forwards.

This file knows the training loop, the optimizers, distributed training, logs and checkpoints. The model
and its objective live in model.py; shards, the token loader and the demo corpus in data/.
"""

import functools
import glob
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
from tqdm import tqdm

from data.demo import DEMO_DIR, prepare_demo
from data.loader import DataExhausted, TokenLoader, find_shards, unigram_baseline, val_batches
from model import (
    BD3LM,
    ModelConfig,
    Noise,
    check_token_ids,
    eval_noise,
    flex_kernel_options,
    model_flops_per_token,
    train_noise,
)

# -----------------------------------------------------------------------------
# Settings


def setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Hyperparameters:
    preset: str = setting("record", "record (FineWeb-Edu speedrun, 80 GB GPUs), record_24gb (the same run on 24 GB "
                          "GPUs) or demo (CPU, built-in corpus)")
    run_id: str = setting("", "name of the log and checkpoint folder; empty: date, time and a random suffix")
    # data
    train_files: str = setting("data/finewebedu10B/finewebedu_train_*.bin", "glob of train shards")
    val_file: str = setting("data/finewebedu10B/finewebedu_val_000000.bin", "val shard")
    val_tokens: int = setting(10_485_760, "val tokens per evaluation, a multiple of seq_len")
    log_dir: str = setting("logs", "folder of the log files")
    checkpoint_dir: str = setting("checkpoints", "checkpoints go to checkpoint_dir/run_id/")
    # model (see ModelConfig in model.py)
    n_layer: int = setting(12, "transformer layers (even: U-net skips)")
    n_head: int = setting(6, "attention heads")
    head_dim: int = setting(128, "dimension of one head")
    model_dim: int = setting(768, "width of the residual stream")
    mlp_hidden: int = setting(3056, "hidden width of the MLP")
    block_size: int = setting(16, "tokens per diffusion block (records: 16)")
    attn_backend: str = setting("auto", "auto (flex on CUDA, sdpa on CPU), flex or sdpa")
    # batch and schedule
    # 32 x 8K = 262K tokens a step, 917M in 3500 steps (10 shards hold 1B). Peak memory per GPU, estimated by
    # `python bench.py --estimate_only=True` (unmeasured: this repo's machines have no GPU): 4 x 8K tokens per
    # forward ~39 GiB (80 GB GPUs), 1 x 8K ~11 GiB (record_24gb)
    seq_len: int = setting(8 * 1024, "tokens per sequence, a chunk of the stream that starts at a document")
    batch_size: int = setting(32, "sequences per optimizer step, all ranks together")
    micro_batch: int = setting(4, "sequences each rank stacks into one forward (documents never cross rows); "
                               "batch_size must be a multiple of micro_batch x ranks; the rest is accumulated")
    steps: int = setting(3500, "optimizer steps")
    warmup_steps: int = setting(0, "steps of linear LR warm-up from 0")
    cooldown_frac: float = setting(0.45, "fraction of the steps at the end over which the LR decays to 0")
    t_lo: float = setting(0.3, "training noise level t ~ U(t_lo, t_hi) per block (validation: U(0, 1))")
    t_hi: float = setting(0.8, "upper end of the training noise interval")
    clip_search: bool = setting(False, "at each validation but the last, choose the candidate interval whose "
                                "per-block loss varies least on held-out train tokens and train with it from then on "
                                "(BD3-LM's data-driven clipped schedule); t_lo/t_hi until the first search")
    clip_search_widths: str = setting("0.5,0.6,0.7,0.8,0.9,1", "widths of the candidate intervals, comma-separated")
    clip_search_step: float = setting(0.05, "candidate intervals of a width start at 0, step, 2 step, ... 1 - width")
    clip_search_tokens: int = setting(65_536, "tokens at the end of the train stream held out for the search")
    # optimizers
    muon_lr: float = setting(0.05, "Muon LR of the hidden matrices")
    muon_momentum: float = setting(0.95, "Muon momentum after its warm-up")
    muon_momentum_start: float = setting(0.85, "Muon momentum at step 0")
    muon_momentum_warmup: int = setting(300, "steps over which the Muon momentum rises")
    embed_lr: float = setting(0.3, "Adam LR of the token embedding")
    head_lr: float = setting(0.004, "Adam LR of the output head")
    scalar_lr: float = setting(0.02, "Adam LR of the scalar parameters")
    weight_decay: float = setting(0.0, "decoupled weight decay of every parameter")
    # run
    seed: int = setting(0, "seed of the initial weights and of the training noise")
    autocast: str = setting("auto", "auto (bf16 on CUDA and on CPUs with bf16 kernels, else fp32), bf16 or fp32")
    compile: bool = setting(True, "compile the loss on CUDA, one full graph with static shapes (CPU runs stay eager)")
    warm_up: bool = setting(True, "run the training and val passes once before the clock starts (compile_time)")
    val_every: int = setting(250, "validate every this many steps (0: only at the start and the end)")
    save_every: int = setting(0, "write checkpoint_dir/run_id/latest.pt every this many steps (0: never)")
    save_final: bool = setting(False, "write checkpoint_dir/run_id/final.pt at the end")
    resume: str = setting("", "continue from this checkpoint; all other settings must match that run")
    unigram_baseline: bool = setting(False, "log the val NELBO of a unigram model of the train data")
    dry_run: bool = setting(False, "build the model, check the config, print it and exit without data")


PRESETS = {
    "record": {},  # 8 x 80 GB: each rank one forward of 4 x 8K tokens a step
    "record_24gb": dict(micro_batch=1),  # RTX 3090/4090: 8K tokens per forward; on one GPU 32 of them a step
    # sized for 2 idle CPU cores: a few minutes; bf16 autocast (on CPUs with bf16 kernels) doubles throughput
    "demo": dict(
        train_files=f"{DEMO_DIR}/demo_train_*.bin", val_file=f"{DEMO_DIR}/demo_val_000000.bin",
        val_tokens=32 * 1024, n_layer=4, n_head=4, head_dim=64, model_dim=256, mlp_hidden=1024,
        seq_len=256, batch_size=8, micro_batch=1, steps=120, warmup_steps=5, cooldown_frac=0.5, muon_momentum_warmup=40,
        val_every=60, save_final=True, unigram_baseline=True, clip_search_tokens=4096,
    ),
}
VAL_NOISE_SEED = 0  # fixed for every run, so all val losses are measured under the same noise
CLIP_SEARCH_NOISE_SEED = 1  # fixed: every search, candidate interval and world size draws the same uniforms
CHECKPOINT_FORMAT = "bd3lm-speedrun-v2"  # v2: <|endoftext|> ends a document, fixed block slots


class ConfigError(ValueError):
    """A flag or a combination of settings that cannot work; exits with status 2."""


def usage() -> str:
    lines = ["usage: python train.py [--preset=record|demo] [--name=value ...]", ""]
    for f in fields(Hyperparameters):
        lines.append(f"  {f'--{f.name}={f.default}':<58} {f.metadata['help']}")
    for name, overrides in PRESETS.items():
        lines.append(f"\npreset {name}: " + (" ".join(f"--{k}={v}" for k, v in overrides.items()) or "the defaults"))
    return "\n".join(lines)


def parse_value(name: str, kind: type, text: str):
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--{name} takes True or False, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"--{name} takes a value of type {kind.__name__}, got {text!r}") from None


def parse_flags(argv: list[str], settings_class) -> dict:
    """`--name=value` flags for the fields of a settings dataclass, each value converted to its field's type
    (sample.py and eval.py use it too)."""
    kinds, flags = {f.name: f.type for f in fields(settings_class)}, {}
    for arg in argv:
        name, equals, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not equals:
            raise ConfigError(f"expected --name=value, got {arg!r} (see --help)")
        if name not in kinds:
            raise ConfigError(f"unknown flag --{name} (see --help)")
        flags[name] = parse_value(name, kinds[name], text)
    return flags


def parse_args(argv: list[str]) -> Hyperparameters:
    """`--name=value` flags over the chosen preset over the defaults."""
    flags = parse_flags(argv, Hyperparameters)
    preset = flags.get("preset", Hyperparameters.preset)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return Hyperparameters(**{**PRESETS[preset], **flags})


def check_settings(hp: Hyperparameters, world_size: int) -> None:
    positive = ("steps", "seq_len", "batch_size", "micro_batch", "block_size", "n_layer", "n_head", "head_dim",
                "model_dim", "mlp_hidden", "val_tokens")
    for name in positive:
        if getattr(hp, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(hp, name)}")
    for name in ("warmup_steps", "val_every", "save_every", "muon_momentum_warmup", "muon_lr", "embed_lr",
                 "head_lr", "scalar_lr", "weight_decay"):
        if getattr(hp, name) < 0:
            raise ConfigError(f"--{name} must not be negative, got {getattr(hp, name)}")
    if hp.batch_size % (world_size * hp.micro_batch):
        raise ConfigError(f"--batch_size={hp.batch_size} sequences do not divide into forwards of --micro_batch="
                          f"{hp.micro_batch} on {world_size} rank{'s' * (world_size > 1)}")
    if hp.val_tokens % hp.seq_len:
        raise ConfigError(f"--val_tokens={hp.val_tokens} is not a multiple of --seq_len={hp.seq_len}")
    if not 0 <= hp.t_lo < hp.t_hi <= 1:
        raise ConfigError(f"need 0 <= t_lo < t_hi <= 1, got t_lo={hp.t_lo} t_hi={hp.t_hi}")
    if hp.clip_search:
        clip_candidates(hp.clip_search_widths, hp.clip_search_step)
        if hp.clip_search_tokens < hp.seq_len or hp.clip_search_tokens % hp.seq_len:
            raise ConfigError(f"--clip_search_tokens={hp.clip_search_tokens} is not a positive multiple of "
                              f"--seq_len={hp.seq_len}")
        if hp.seq_len % hp.block_size or hp.clip_search_tokens < 2 * hp.block_size:
            raise ConfigError(f"--clip_search needs whole blocks, two at least: --seq_len={hp.seq_len} and "
                              f"--clip_search_tokens={hp.clip_search_tokens} in blocks of {hp.block_size}")
    if not 0 <= hp.cooldown_frac <= 1:
        raise ConfigError(f"--cooldown_frac must lie in [0, 1], got {hp.cooldown_frac}")
    if hp.warmup_steps + round(hp.cooldown_frac * hp.steps) > hp.steps:
        raise ConfigError(f"warm-up ({hp.warmup_steps}) and cool-down ({hp.cooldown_frac} x {hp.steps}) "
                          f"steps overlap; lower one of them")
    if not 0 <= hp.seed < 2**31:
        raise ConfigError(f"--seed must lie in [0, 2**31), got {hp.seed}")
    if hp.autocast not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"--autocast must be auto, bf16 or fp32, got {hp.autocast!r}")
    if hp.resume and not os.path.isfile(hp.resume):
        raise ConfigError(f"--resume={hp.resume} is not a file")


def clip_candidates(widths: str, step: float) -> list[tuple[float, float]]:
    """The candidate noise intervals of --clip_search, built as bd3lms builds them: for each width w, the intervals
    (lo, lo + w) for lo = 0, step, 2 step, ... while lo + w <= 1."""
    try:
        parsed = [float(width) for width in widths.split(",")]
    except ValueError:
        raise ConfigError(f"--clip_search_widths takes comma-separated numbers, got {widths!r}") from None
    if not all(0 < width <= 1 for width in parsed):
        raise ConfigError(f"--clip_search_widths must lie in (0, 1], got {widths!r}")
    if not 0 < step <= 1:
        raise ConfigError(f"--clip_search_step must lie in (0, 1], got {step}")
    intervals = [(round(k * step, 6), round(k * step + width, 6))
                 for width in parsed for k in range(int((1 - width) / step + 1e-9) + 1)]
    return list(dict.fromkeys(intervals))


def grad_accum(hp: Hyperparameters, world_size: int) -> int:
    """Forwards (micro-steps) per optimizer step on each rank."""
    return hp.batch_size // (world_size * hp.micro_batch)


def model_config(hp: Hyperparameters) -> ModelConfig:
    return ModelConfig(n_layer=hp.n_layer, n_head=hp.n_head, head_dim=hp.head_dim, model_dim=hp.model_dim,
                       mlp_hidden=hp.mlp_hidden, block_size=hp.block_size, attn_backend=hp.attn_backend)


def fail(message: str, status: int = 1):
    """One line on stderr (from rank 0 only), then exit: user errors never print a traceback."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def settings_or_exit(argv: list[str], world_size: int) -> tuple[Hyperparameters, ModelConfig]:
    """The checked settings of the flags and the model config they give; a user error exits with status 2."""
    try:
        hp = parse_args(argv)
        check_settings(hp, world_size)
        config = model_config(hp)
        config.validate()
    except (ConfigError, ValueError) as error:
        fail(str(error), status=2)
    return hp, config


# -----------------------------------------------------------------------------
# The run, step by step


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(usage())
        return
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    hp, config = settings_or_exit(argv, world_size)
    device = set_up_device(world_size)
    fast_bf16 = device.type == "cuda" or cpu_has_bf16_kernels()
    bf16 = hp.autocast == "bf16" or (hp.autocast == "auto" and fast_bf16)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    model = build_model(config, hp.seed, device)
    if hp.dry_run:
        if rank == 0:
            print_dry_run(hp, model)
        return

    run_id = hp.run_id or f"{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"
    log = RunLog(hp.log_dir, run_id, rank)
    write_header(log, hp, world_size, bf16, model)
    loader, held_out = load_data(hp, rank, world_size, log)
    log(f"params:{model.num_params()}")
    if hp.unigram_baseline:
        log(f"unigram_baseline:{unigram_baseline(loader.stream.files, [hp.val_file]):.4f}")
    if device.type == "cuda" and hp.compile:
        model.compile_loss()
    optimizers = make_optimizers(model, hp, fast_bf16)
    run = Run(hp, rank, world_size, device, autocast, model, optimizers, GradReducer(model.parameters()), loader,
              held_out, log, checkpoint_folder=os.path.join(hp.checkpoint_dir, run_id))
    start_step = run.resume() if hp.resume else 0
    try:
        if hp.warm_up:
            log(f"compile_time:{warm_up(model, hp.val_file, hp.seq_len, hp.micro_batch, autocast, device):.0f}ms")
        run.train(start_step)
    except torch.OutOfMemoryError:
        hint = "lower --micro_batch (--preset=record_24gb runs 1)" if hp.micro_batch > 1 else "lower --seq_len"
        fail(f"out of GPU memory with --micro_batch={hp.micro_batch} sequences of {hp.seq_len} tokens per forward: "
             f"{hint} (last checkpoint: {run.last_checkpoint})")
    run.finish()


# -----------------------------------------------------------------------------
# Setup: distributed ranks, device, log


def set_up_device(world_size: int) -> torch.device:
    """This rank's GPU (the CPU if there is none) and, over several ranks, the process group."""
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
            os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"  # read at the first CUDA allocation
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return device


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 matmul kernels for this CPU: x86 with AVX-512 (in hardware with AVX512-BF16 or AMX,
    converted otherwise) or ARM with bf16. Without them (AVX2-only CPUs) bf16 matmuls run hundreds of times
    slower than fp32."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class RunLog:
    """log_dir/<run_id>.txt, written by rank 0 only; `log(line)` also prints the line unless console=False."""

    def __init__(self, log_dir: str, run_id: str, rank: int):
        self.file = None
        if rank == 0:
            os.makedirs(log_dir, exist_ok=True)
            self.file = open(os.path.join(log_dir, f"{run_id}.txt"), "w")

    def __call__(self, line: str, console: bool = True) -> None:
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()
            if console:
                print(line, flush=True)


def write_header(log: RunLog, hp: Hyperparameters, world_size: int, bf16: bool, model: BD3LM) -> None:
    """The source of this file and model.py, the versions and the config: what it takes to reproduce the run."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("train.py", "model.py"):
        with open(os.path.join(here, name), encoding="utf-8", newline="") as f:  # byte-exact for check.py --rev
            log(f"==== file: {name} ====\n{f.read()}==== end file: {name} ====", console=False)
    log(f"python:{platform.python_version()}", console=False)
    log(f"torch:{torch.__version__} cuda:{torch.version.cuda or 'none'}", console=False)
    log(f"nvidia-smi:\n{nvidia_smi()}", console=False)
    log(f"config:{json.dumps(asdict(hp), sort_keys=True)}")
    log(f"world_size:{world_size} micro_batch:{hp.micro_batch} grad_accum:{grad_accum(hp, world_size)} "
        f"autocast:{'bf16' if bf16 else 'fp32'}")
    if torch.cuda.is_available():
        log(f"flex_options:{json.dumps(model.trunk.blocks[0].attn.flex_options)}")


def nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.rstrip()
    except (OSError, subprocess.SubprocessError):
        return "(not available)"


def peak_memory_mib(use_cuda: bool) -> int:
    if use_cuda:
        return torch.cuda.max_memory_allocated() // 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux reports KiB


# -----------------------------------------------------------------------------
# Data


def load_data(hp: Hyperparameters, rank: int, world_size: int, log: RunLog) -> tuple[TokenLoader, list]:
    """The train loader, after a check of the val shard, and this rank's held-out chunks for --clip_search (none
    without it). The demo corpus is prepared on first use."""
    if rank == 0 and not glob.glob(hp.train_files) and os.path.dirname(os.path.abspath(hp.train_files)) == DEMO_DIR:
        prepare_demo()
    if world_size > 1:
        dist.barrier()
    try:
        train_files = find_shards(hp.train_files)
        loader = TokenLoader(train_files, hp.seq_len, rank, world_size, sequences=hp.micro_batch,
                             held_out_tokens=hp.clip_search_tokens if hp.clip_search else 0)
        val_batches(hp.val_file, hp.val_tokens, hp.seq_len)  # checks the val shard now, not at the first eval
    except (FileNotFoundError, ValueError) as error:  # ShardError is a ValueError
        fail(str(error))
    log(f"train_data:pattern={hp.train_files} shards={len(train_files)} tokens={loader.num_tokens}")
    log(f"val_data:path={hp.val_file} tokens={hp.val_tokens}")
    if not hp.clip_search:
        return loader, []
    held_out = held_out_chunks(loader, rank, world_size)
    log(f"clip_search_data:tokens {loader.end}-{loader.num_tokens} of the train stream, never trained on")
    return loader, held_out


def held_out_chunks(loader: TokenLoader, rank: int, world_size: int) -> list[tuple[int, torch.Tensor]]:
    """This rank's (index, int64 tokens) of the tail of the train stream that the loader never reads, cut into
    chunks of seq_len: chunk i goes to rank i % world_size."""
    starts = range(loader.end, loader.num_tokens - loader.seq_len + 1, loader.seq_len)
    return [(index, torch.from_numpy(loader.stream.read(start, start + loader.seq_len).astype("int64")))
            for index, start in enumerate(starts) if index % world_size == rank]


def to_device(tokens: torch.Tensor, noise: Noise, device: torch.device, vocab_size: int) -> tuple[torch.Tensor, Noise]:
    """Check a chunk's token ids on the CPU (the compiled loss cannot without waiting for the device), then copy it
    and its noise to `device`; to a GPU from pinned memory, without blocking."""
    check_token_ids(tokens, vocab_size)

    def copy(x: torch.Tensor) -> torch.Tensor:
        return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)
    return copy(tokens), Noise(*(copy(x) for x in noise))


# -----------------------------------------------------------------------------
# Model and optimizers


def build_model(config: ModelConfig, seed: int, device: torch.device) -> BD3LM:
    """The initial weights drawn from `seed`, on `device`; on a GPU, with its FlexAttention kernel options."""
    torch.manual_seed(seed)
    model = BD3LM(config).to(device)
    if device.type == "cuda":
        model.set_flex_options(flex_kernel_options(torch.cuda.get_device_properties(device)))
    return model


def print_dry_run(hp: Hyperparameters, model: BD3LM) -> None:
    print(f"config:{json.dumps(asdict(hp), sort_keys=True)}")
    print(f"params:{model.num_params()}")
    print(f"flops_per_token:{model_flops_per_token(model.config, hp.seq_len):.4g}")


def newton_schulz(grad: torch.Tensor, dtype: torch.dtype, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The quintic Newton-Schulz orthogonalization of torch.optim.Muon (and modded-nanogpt), in `dtype`."""
    a, b, c = 3.4445, -4.775, 2.0315
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def turns(params: list[torch.Tensor], world_size: int) -> list[list[torch.Tensor]]:
    """The matrices in turns of up to world_size of one size; rank r orthogonalizes the r-th of each turn. Tall
    and wide matrices of one size cost the same Newton-Schulz, so the ranks get equal work but for the last, partial
    turn of each size."""
    by_size = {}
    for p in params:
        by_size.setdefault(p.numel(), []).append(p)
    return [same[i:i + world_size] for same in by_size.values() for i in range(0, len(same), world_size)]


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update step for step (Nesterov momentum, Newton-Schulz, lr scaled by
    sqrt(max(1, rows / cols)), decoupled weight decay), with the Newton-Schulz dtype a choice: torch's bf16
    where bf16 matmuls are fast, fp32 on CPUs without bf16 kernels, where they run hundreds of times slower.

    Under torch.distributed the ranks share the Newton-Schulz work: each orthogonalizes its turns of the matrices
    (see `turns`) and the updates are all-gathered, so every rank applies the same updates. The gradients must
    already be summed over the ranks (GradReducer). Every rank keeps every momentum buffer, a cheap elementwise
    update: the state is the same on all ranks and on one process, so rank 0's checkpoint resumes on any number
    of ranks."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, ns_dtype: torch.dtype):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self) -> None:
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                state["momentum_buffer"].lerp_(p.grad, 1 - group["momentum"])
            gathers = []  # all launched before any is waited for: each gather overlaps the next Newton-Schulz
            for turn in turns(params, world_size):
                if rank < len(turn):
                    p = turn[rank]
                    nesterov = p.grad.lerp(self.state[p]["momentum_buffer"], group["momentum"])
                    mine = newton_schulz(nesterov, self.ns_dtype).flatten()
                else:  # the last turn of a size can leave ranks without a matrix
                    mine = turn[0].new_zeros(turn[0].numel(), dtype=self.ns_dtype)
                updates, handle = mine[None], None
                if world_size > 1:
                    updates = mine.new_empty(world_size, mine.numel())
                    handle = dist.all_gather_single(updates.view(-1), mine, async_op=True)
                gathers.append((handle, turn, updates))
            for handle, turn, updates in gathers:
                if handle is not None:
                    handle.wait()
                for p, update in zip(turn, updates):
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update.view_as(p), alpha=-group["lr"] * max(1, p.size(0) / p.size(1)) ** 0.5)


class GradReducer:
    """Sums the gradients over the ranks (on one process it does nothing). The parameters are cut into buckets
    of about `bucket_mb`, in reverse order, about the order in which the backward finishes them; in the last
    micro-step's backward each bucket is all-reduced as soon as its gradients are accumulated, so the sums
    overlap the rest of the backward. A gradient stays None only where it is None on every rank, as on one
    process that ran every rank's micro-steps."""

    def __init__(self, params, bucket_mb: float = 25):
        self.buckets, self.missing, self.sent = [], None, []
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        for p in reversed(list(params)):
            if not self.buckets or sum(q.numel() * q.element_size() for q in self.buckets[-1]) >= bucket_mb * 2**20:
                self.buckets.append([])
            self.buckets[-1].append(p)
            p.register_post_accumulate_grad_hook(functools.partial(self.grad_ready, len(self.buckets) - 1))

    def last_micro_step(self) -> None:
        """Call before the last micro-step's backward, which then sends the buckets."""
        self.missing = [len(bucket) for bucket in self.buckets]

    def grad_ready(self, index: int, param: torch.Tensor) -> None:
        if self.missing is None:
            return
        self.missing[index] -= 1
        # every rank sends the buckets in one order, whatever order the gradients come in: collectives must match
        while len(self.sent) < len(self.buckets) and self.missing[len(self.sent)] == 0:
            self.send_next()

    def send_next(self) -> None:
        bucket = self.buckets[len(self.sent)]
        # a 1 or 0 per parameter counts the ranks with its gradient; made on the device, as a copy from the host
        # could make the CPU wait for the GPU in the middle of the backward
        flat = torch.cat([*((p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in bucket),
                          *(p.new_ones(1) if p.grad is not None else p.new_zeros(1) for p in bucket)])
        for p, grad in zip(bucket, flat.split([p.numel() for p in bucket] + [len(bucket)])):
            p.grad = grad.view_as(p)  # the all-reduce sums in place
        self.sent.append((dist.all_reduce(flat, async_op=True), bucket, flat[-len(bucket):]))

    def wait(self) -> None:
        """Send the buckets the backward did not (one of their parameters got no gradient in the last micro-step)
        and wait for all sums."""
        while len(self.sent) < len(self.buckets):
            self.send_next()
        for handle, bucket, ranks_with_grad in self.sent:
            handle.wait()
            for p, count in zip(bucket, ranks_with_grad.tolist()):
                if count == 0:
                    p.grad = None
        self.missing, self.sent = None, []


def make_optimizers(model: BD3LM, hp: Hyperparameters, fast_bf16: bool) -> list[torch.optim.Optimizer]:
    """Muon for the hidden matrices, Adam for the embedding, the head and the scalars (bench.py uses it too)."""
    groups = model.param_groups()
    if sum(p.numel() for group in groups.values() for p in group) != model.num_params():
        raise RuntimeError("model.param_groups() does not cover every parameter exactly once")
    muon = Muon(groups["hidden_matrices"], lr=hp.muon_lr, momentum=hp.muon_momentum, weight_decay=hp.weight_decay,
                ns_dtype=torch.bfloat16 if fast_bf16 else torch.float32)
    adam_groups = [dict(params=groups[name], lr=lr) for name, lr in
                   (("embed", hp.embed_lr), ("head", hp.head_lr), ("scalars", hp.scalar_lr)) if groups[name]]
    adam = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=hp.weight_decay, fused=True)
    return [muon, adam]


def lr_multiplier(hp: Hyperparameters, step: int) -> float:
    """Linear warm-up, constant, then a linear cool-down to 0 over the last cooldown_frac of the steps."""
    if step < hp.warmup_steps:
        return (step + 1) / hp.warmup_steps
    cooldown_steps = hp.cooldown_frac * hp.steps
    return min(1.0, (hp.steps - step) / cooldown_steps) if cooldown_steps > 0 else 1.0


def muon_momentum(hp: Hyperparameters, step: int) -> float:
    frac = min(step / hp.muon_momentum_warmup, 1.0) if hp.muon_momentum_warmup else 1.0
    return (1 - frac) * hp.muon_momentum_start + frac * hp.muon_momentum


# -----------------------------------------------------------------------------
# Training loop: step S runs validation and checkpoints of the weights after S optimizer steps


def warm_up(model: BD3LM, val_file: str, seq_len: int, micro_batch: int, autocast, device: torch.device) -> float:
    """Run what training compiles, once, before the clock starts: the training forward and backward on
    micro_batch sequences and the val forward on one, all copies of the first val chunk (only the shapes
    matter). Nothing the run depends on changes: there is no optimizer step, the gradients are dropped, and
    neither the loader nor the random state is used. Returns the milliseconds it took: the compile time, where
    the loss is compiled."""
    started = time.perf_counter()
    _, tokens = next(val_batches(val_file, seq_len, seq_len))
    noise = eval_noise(seq_len, model.config.block_size, VAL_NOISE_SEED, 0)
    tokens, noise = to_device(tokens, noise, device, model.config.vocab_size)
    with autocast:
        # repeat, not expand: the compiled graph is specialized to the strides of real batches too
        model(tokens.repeat(micro_batch, 1), Noise(*(x.repeat(micro_batch, 1) for x in noise))).backward()
        model.eval()
        with torch.no_grad():
            model(tokens, noise)
        model.train()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()  # every rank starts its clock together, so no first step waits for a slower compile
    return 1000 * (time.perf_counter() - started)


@dataclass
class Run:
    """What the steps of a training run share; main builds it, `train` runs the loop."""

    hp: Hyperparameters
    rank: int
    world_size: int
    device: torch.device
    autocast: torch.autocast
    model: BD3LM
    optimizers: list[torch.optim.Optimizer]  # Muon, then Adam
    reducer: GradReducer
    loader: TokenLoader
    held_out: list[tuple[int, torch.Tensor]]  # this rank's chunks for --clip_search
    log: RunLog
    checkpoint_folder: str
    noise_interval: tuple[float, float] = field(init=False)  # training t ~ U(lo, hi); --clip_search changes it
    last_checkpoint: str = field(init=False)
    noise_generator: torch.Generator = field(init=False, default_factory=torch.Generator)

    def __post_init__(self):
        self.noise_interval = (self.hp.t_lo, self.hp.t_hi)
        self.last_checkpoint = self.hp.resume or "none"
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["initial_lr"] = group["lr"]  # what lr_multiplier scales; checkpoints keep it

    def train(self, start_step: int) -> None:
        """Steps start_step to hp.steps; the train time counts everything but validation."""
        hp = self.hp
        train_time_ms, step_start = 0.0, time.perf_counter()
        for step in range(start_step, hp.steps + 1):
            last_step = step == hp.steps
            resumed_here = hp.resume and step == start_step  # the checkpoint's run validated and saved here
            if not resumed_here and (last_step or (hp.val_every and step % hp.val_every == 0) or step == 0):
                train_time_ms += 1000 * (self.sync_time() - step_start)
                self.validate(step, train_time_ms)
                step_start = self.sync_time()
                if hp.clip_search and not last_step:
                    self.noise_interval = self.search_noise_interval(step)  # in the train time: it steers training
            if not resumed_here and hp.save_every and step % hp.save_every == 0 and 0 < step < hp.steps:
                self.last_checkpoint = self.save("latest.pt", step)
                self.log(f"saved:{self.last_checkpoint} step:{step}")
            if last_step:
                break
            train_loss = self.train_step(step)
            elapsed_ms = train_time_ms + 1000 * (self.sync_time() - step_start)
            self.log(f"step:{step + 1}/{hp.steps} train_loss:{train_loss:.4f} train_time:{elapsed_ms:.0f}ms "
                     f"step_avg:{elapsed_ms / (step + 1 - start_step):.2f}ms")

    def train_step(self, step: int) -> float:
        """One optimizer step on batch_size sequences, batch_size / world_size of them on each rank in forwards of
        micro_batch; returns the mean loss over all of them."""
        micro_steps = grad_accum(self.hp, self.world_size)
        loss_sum = torch.zeros((), device=self.device)
        for micro_step in range(micro_steps):
            tokens, noise = self.micro_batch(step, micro_step)
            with self.autocast:  # the model's mean over this forward's tokens, weighted by its share of the batch
                loss = self.model(tokens, noise) * self.hp.micro_batch / self.hp.batch_size
            if micro_step == micro_steps - 1:
                self.reducer.last_micro_step()
            loss.backward()
            loss_sum += loss.detach()
        self.reducer.wait()
        if self.world_size > 1:
            dist.all_reduce(loss_sum)
        train_loss = loss_sum.item()
        if not math.isfinite(train_loss):
            fail(f"train loss is {train_loss} at step {step + 1}; stopped before updating the weights "
                 f"(last checkpoint: {self.last_checkpoint})")
        self.update_weights(step)
        return train_loss

    def micro_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, Noise]:
        """This rank's next micro_batch sequences [micro_batch, seq_len] and their training noise, on the device."""
        try:
            tokens = self.loader.next_batch()
            noise = self.noise_of(step, micro_step, *tokens.shape)
            return to_device(tokens, noise, self.device, self.model.config.vocab_size)
        except (DataExhausted, ValueError) as error:
            fail(f"step {step + 1} of {self.hp.steps}: {error}")

    def noise_of(self, step: int, micro_step: int, rows: int, length: int) -> Noise:
        """The training noise [rows, length] of this rank's sequences in a micro-step. Each sequence's comes from its
        place in the global batch, not from which rank or forward draws it."""
        noises = []
        for row in range(rows):
            chunk = step * self.hp.batch_size + (micro_step * self.world_size + self.rank) * rows + row
            self.noise_generator.manual_seed((self.hp.seed << 32) + chunk)
            noises.append(train_noise(length, self.model.config.block_size, *self.noise_interval, self.noise_generator))
        return Noise(*(torch.stack(parts) for parts in zip(*noises)))

    def update_weights(self, step: int) -> None:
        """Step every optimizer at this step's LRs and Muon momentum, then drop the gradients."""
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_multiplier(self.hp, step)
        muon = self.optimizers[0]
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(self.hp, step)
        for optimizer in self.optimizers:
            optimizer.step()
        self.model.zero_grad(set_to_none=True)

    def validate(self, step: int, train_time_ms: float) -> None:
        hp = self.hp
        self.model.eval()
        with self.autocast:
            val_loss, val_count = val_nelbo(self.model, hp.val_file, hp.val_tokens, hp.seq_len, VAL_NOISE_SEED,
                                            self.rank, self.world_size)
        self.model.train()
        self.log(f"step:{step}/{hp.steps} val_loss:{val_loss:.4f} ppl:{math.exp(min(val_loss, 700)):.2f} "
                 f"train_time:{train_time_ms:.0f}ms tokens:{val_count}")

    def search_noise_interval(self, step: int) -> tuple[float, float]:
        """The candidate interval under which the per-block training loss varies least on the held-out chunks."""
        started = time.perf_counter()
        self.model.eval()
        with self.autocast:
            variances = {interval: block_loss_variance(self.model, self.held_out, *interval, CLIP_SEARCH_NOISE_SEED,
                                                       self.world_size)
                         for interval in clip_candidates(self.hp.clip_search_widths, self.hp.clip_search_step)}
        self.model.train()
        chosen = min(variances, key=variances.get)
        listed = " ".join(f"{lo:g}-{hi:g}={variance:.6g}" for (lo, hi), variance in variances.items())
        self.log(f"clip_search step:{step} chosen:{chosen[0]:g}-{chosen[1]:g} var:{variances[chosen]:.6g} "
                 f"time:{1000 * (time.perf_counter() - started):.0f}ms candidates: {listed}")
        return chosen

    def save(self, name: str, step: int) -> str:
        """Write checkpoint_folder/name from rank 0, atomically: a crash mid-write leaves the previous file intact."""
        path = os.path.join(self.checkpoint_folder, name)
        if self.rank == 0:
            os.makedirs(self.checkpoint_folder, exist_ok=True)
            state = dict(format=CHECKPOINT_FORMAT, model=self.model.state_dict(),
                         model_config=asdict(self.model.config), hparams=asdict(self.hp), step=step,
                         optimizers=[opt.state_dict() for opt in self.optimizers], loader=self.loader.state_dict(),
                         rng=rng_state(), noise_interval=self.noise_interval)
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)
        return path

    def resume(self) -> int:
        """Continue from hp.resume; returns its step."""
        step, saved_interval = load_checkpoint(self.hp.resume, self.model, self.model.config, self.optimizers,
                                               self.loader, self.device)
        self.noise_interval = saved_interval or self.noise_interval
        self.log(f"resumed:{self.hp.resume} step:{step}")
        return step

    def finish(self) -> None:
        """The closing lines of the log and the final checkpoint."""
        self.log(f"train_tokens:{self.loader.tokens_consumed}")
        self.log(f"peak_memory:{peak_memory_mib(self.device.type == 'cuda')}MiB")
        if self.hp.save_final:
            path = self.save("final.pt", self.hp.steps)
            self.log(f"checkpoint:{path}")
            if self.rank == 0:
                print(f"sample from it: python sample.py --checkpoint={path}")
        if self.world_size > 1:
            dist.destroy_process_group()

    def sync_time(self) -> float:
        """The clock, once the GPU has done the work queued so far."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()


# -----------------------------------------------------------------------------
# Validation


@torch.no_grad()
def val_nelbo(model: BD3LM, files, num_tokens: int | None, seq_len: int, seed: int, rank: int = 0,
              world_size: int = 1, progress: bool = False) -> tuple[float, int]:
    """NELBO in nats/token of the first `num_tokens` tokens of `files` (None: every whole chunk), cut into
    fixed chunks of seq_len, under eval_noise(seed): the same chunks and noise whatever the world size.
    Returns (NELBO, tokens) summed over all ranks (eval.py uses it too)."""
    device = model.head.weight.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    token_count = torch.zeros((), dtype=torch.float64, device=device)
    chunks = val_batches(files, num_tokens, seq_len, rank, world_size)
    for offset, tokens in tqdm(chunks, unit="chunk", disable=not progress, leave=False):
        noise = eval_noise(tokens.numel(), model.config.block_size, seed, offset)
        loss = model(*to_device(tokens, noise, device, model.config.vocab_size))
        loss_sum += loss.double() * tokens.numel()
        token_count += tokens.numel()
    if world_size > 1:
        dist.all_reduce(loss_sum)
        dist.all_reduce(token_count)
    return (loss_sum / token_count).item(), int(token_count.item())


@torch.no_grad()
def block_loss_variance(model: BD3LM, chunks, t_lo: float, t_hi: float, seed: int, world_size: int = 1) -> float:
    """Sample variance, over every block of `chunks` on all ranks, of the per-block training loss (the mean over
    the block's tokens of CE / t where masked) under t ~ U(t_lo, t_hi). A chunk's noise comes from train_noise
    seeded by `seed` and the chunk's index, so every interval reuses the same uniforms (a fair comparison) on
    any number of ranks. `chunks` are this rank's (index, tokens), as held_out_chunks gives them."""
    device, block_size = model.head.weight.device, model.config.block_size
    moments = torch.zeros(3, dtype=torch.float64, device=device)  # blocks, sum, sum of squares
    generator = torch.Generator()
    for index, tokens in chunks:
        generator.manual_seed((seed << 32) + index)
        noise = train_noise(tokens.numel(), block_size, t_lo, t_hi, generator)
        losses = model.token_losses(*to_device(tokens, noise, device, model.config.vocab_size))
        block_losses = losses.double().view(-1, block_size).mean(1)
        moments[0] += block_losses.numel()
        moments[1] += block_losses.sum()
        moments[2] += block_losses.square().sum()
    if world_size > 1:
        dist.all_reduce(moments)
    count, total, squares = moments.tolist()
    return (squares - total**2 / count) / (count - 1)


# -----------------------------------------------------------------------------
# Checkpoint


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def read_checkpoint(path: str, device) -> dict:
    """A checkpoint of this code's format, loaded with weights_only=True (sample.py and eval.py use it too);
    a ValueError with one line naming the problem otherwise."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception:
        raise ValueError(f"{path} is not a checkpoint of this project (torch.load cannot read it)") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        said = state.get("format") if isinstance(state, dict) else None
        found = f" (it says {said!r}: retrain with this code)" if said else ""
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint of this project{found}")
    return state


def load_checkpoint(path, model, config, optimizers, loader, device) -> tuple[int, tuple[float, float] | None]:
    """Restore weights, optimizer states, data position and RNG; returns the step to continue from and the
    training noise interval (None in checkpoints written before --clip_search existed)."""
    try:
        state = read_checkpoint(path, device)
    except ValueError as error:
        fail(str(error))
    if state["model_config"] != asdict(config):
        differences = ", ".join(f"{key} {value} (now {asdict(config)[key]})"
                                for key, value in state["model_config"].items() if asdict(config)[key] != value)
        fail(f"checkpoint {path} has a different model config: {differences}", status=2)
    model.load_state_dict(state["model"])
    for optimizer, optimizer_state in zip(optimizers, state["optimizers"]):
        optimizer.load_state_dict(optimizer_state)
    try:
        loader.load_state_dict(state["loader"])
    except ValueError as error:
        fail(f"cannot resume from {path}: {error}")
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())
    return state["step"], state.get("noise_interval")


if __name__ == "__main__":
    main(sys.argv[1:])
