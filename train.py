"""
Train a block diffusion language model (BD3-LM), speedrun style.

    python train.py --preset=demo                       # CPU demo on a built-in corpus, a few minutes
    torchrun --standalone --nproc_per_node=8 train.py   # the record run on FineWeb-Edu

Every setting is a field of Hyperparameters below, overridable as --name=value (`--help` lists them).
The log logs/<run_id>.txt starts with the source of this file and model.py, the versions and the config,
so a run can be reproduced from its log alone. Whatever the number of ranks, a step consumes the same
`batch_size` sequences of the token stream in the same order, with the same noise, so 1 GPU and 8 GPUs
train the same model.

This file knows the training loop, the optimizers, distributed training, logs and checkpoints. The model
and its objective live in model.py; shards, the token loader and the demo corpus in data/.
"""

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
from model import BD3LM, ModelConfig, Noise, eval_noise, flex_kernel_options, model_flops_per_token, train_noise

# -----------------------------------------------------------------------------
# Settings


def setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Hyperparameters:
    preset: str = setting("record", "record (FineWeb-Edu speedrun) or demo (CPU, built-in corpus)")
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
    # 32 x 8K = 262K tokens a step, 917M in 3500 steps (10 shards hold 1B); 8K tokens (16K with the clean
    # half) per micro-step should fit a 24 GB GPU in bf16 (unmeasured: this repo's machines have no GPU)
    seq_len: int = setting(8 * 1024, "tokens per sequence: what one rank feeds the model per micro-step")
    batch_size: int = setting(32, "sequences per optimizer step, all ranks together; a multiple of the ranks")
    steps: int = setting(3500, "optimizer steps")
    warmup_steps: int = setting(0, "steps of linear LR warm-up from 0")
    cooldown_frac: float = setting(0.45, "fraction of the steps at the end over which the LR decays to 0")
    t_lo: float = setting(0.3, "training noise level t ~ U(t_lo, t_hi) per block (validation: U(0, 1))")
    t_hi: float = setting(0.8, "upper end of the training noise interval")
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
    compile: bool = setting(True, "torch.compile the transformer trunk on CUDA (CPU runs stay eager)")
    val_every: int = setting(250, "validate every this many steps (0: only at the start and the end)")
    save_every: int = setting(0, "write checkpoint_dir/run_id/latest.pt every this many steps (0: never)")
    save_final: bool = setting(False, "write checkpoint_dir/run_id/final.pt at the end")
    resume: str = setting("", "continue from this checkpoint; all other settings must match that run")
    unigram_baseline: bool = setting(False, "log the val NELBO of a unigram model of the train data")
    dry_run: bool = setting(False, "build the model, check the config, print it and exit without data")


PRESETS = {
    "record": {},
    # sized for 2 idle CPU cores: a few minutes; bf16 autocast (on CPUs with bf16 kernels) doubles throughput
    "demo": dict(
        train_files=f"{DEMO_DIR}/demo_train_*.bin", val_file=f"{DEMO_DIR}/demo_val_000000.bin",
        val_tokens=32 * 1024, n_layer=4, n_head=4, head_dim=64, model_dim=256, mlp_hidden=1024,
        seq_len=256, batch_size=8, steps=120, warmup_steps=5, cooldown_frac=0.5, muon_momentum_warmup=40,
        val_every=60, save_final=True, unigram_baseline=True,
    ),
}
VAL_NOISE_SEED = 0  # fixed for every run, so all val losses are measured under the same noise
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
    positive = ("steps", "seq_len", "batch_size", "block_size", "n_layer", "n_head", "head_dim", "model_dim",
                "mlp_hidden", "val_tokens")
    for name in positive:
        if getattr(hp, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(hp, name)}")
    for name in ("warmup_steps", "val_every", "save_every", "muon_momentum_warmup", "muon_lr", "embed_lr",
                 "head_lr", "scalar_lr", "weight_decay"):
        if getattr(hp, name) < 0:
            raise ConfigError(f"--{name} must not be negative, got {getattr(hp, name)}")
    if hp.batch_size % world_size:
        raise ConfigError(f"--batch_size={hp.batch_size} sequences do not divide over {world_size} ranks")
    if hp.val_tokens % hp.seq_len:
        raise ConfigError(f"--val_tokens={hp.val_tokens} is not a multiple of --seq_len={hp.seq_len}")
    if not 0 <= hp.t_lo < hp.t_hi <= 1:
        raise ConfigError(f"need 0 <= t_lo < t_hi <= 1, got t_lo={hp.t_lo} t_hi={hp.t_hi}")
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


def model_config(hp: Hyperparameters) -> ModelConfig:
    return ModelConfig(n_layer=hp.n_layer, n_head=hp.n_head, head_dim=hp.head_dim, model_dim=hp.model_dim,
                       mlp_hidden=hp.mlp_hidden, block_size=hp.block_size, attn_backend=hp.attn_backend)


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


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update step for step (Nesterov momentum, Newton-Schulz, lr scaled by
    sqrt(max(1, rows / cols)), decoupled weight decay), with the Newton-Schulz dtype a choice: torch's bf16
    where bf16 matmuls are fast, fp32 on CPUs without bf16 kernels, where they run hundreds of times slower."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, ns_dtype: torch.dtype):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - group["momentum"])
                update = newton_schulz(p.grad.lerp(buffer, group["momentum"]), self.ns_dtype)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * max(1, p.size(0) / p.size(1)) ** 0.5)


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


def fail(message: str, status: int = 1):
    """One line on stderr (from rank 0 only), then exit: user errors never print a traceback."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(usage())
        return
    # -----------------------------------------------------------------------------
    # Setup: distributed ranks, device, log

    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    master = rank == 0
    try:
        hp = parse_args(argv)
        check_settings(hp, world_size)
        config = model_config(hp)
        config.validate()
    except (ConfigError, ValueError) as error:
        fail(str(error), status=2)
    grad_accum = hp.batch_size // world_size

    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
            os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"  # read at the first CUDA allocation
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    fast_bf16 = use_cuda or cpu_has_bf16_kernels()
    bf16 = hp.autocast == "bf16" or (hp.autocast == "auto" and fast_bf16)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    torch.manual_seed(hp.seed)
    model = BD3LM(config).to(device)
    if use_cuda:
        model.set_flex_options(flex_kernel_options(torch.cuda.get_device_properties(device)))
    if hp.dry_run:
        if master:
            print(f"config:{json.dumps(asdict(hp), sort_keys=True)}")
            print(f"params:{model.num_params()}")
            print(f"flops_per_token:{model_flops_per_token(config, hp.seq_len):.4g}")
        return

    run_id = hp.run_id or f"{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"
    log_path = os.path.join(hp.log_dir, f"{run_id}.txt")
    if master:
        os.makedirs(hp.log_dir, exist_ok=True)
        log_file = open(log_path, "w")

    def log(line: str, console: bool = True) -> None:
        if master:
            log_file.write(line + "\n")
            log_file.flush()
            if console:
                print(line, flush=True)

    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("train.py", "model.py"):
        with open(os.path.join(here, name), encoding="utf-8", newline="") as f:  # byte-exact for check.py --rev
            log(f"==== file: {name} ====\n{f.read()}==== end file: {name} ====", console=False)
    log(f"python:{platform.python_version()}", console=False)
    log(f"torch:{torch.__version__} cuda:{torch.version.cuda or 'none'}", console=False)
    log(f"nvidia-smi:\n{nvidia_smi()}", console=False)
    log(f"config:{json.dumps(asdict(hp), sort_keys=True)}")
    log(f"world_size:{world_size} grad_accum:{grad_accum} autocast:{'bf16' if bf16 else 'fp32'}")
    if use_cuda:
        log(f"flex_options:{json.dumps(model.trunk.blocks[0].attn.flex_options)}")

    # -----------------------------------------------------------------------------
    # Data

    if master and not glob.glob(hp.train_files) and os.path.dirname(os.path.abspath(hp.train_files)) == DEMO_DIR:
        prepare_demo()
    if world_size > 1:
        dist.barrier()
    try:
        train_files = find_shards(hp.train_files)
        loader = TokenLoader(train_files, hp.seq_len, rank, world_size)
        val_batches(hp.val_file, hp.val_tokens, hp.seq_len)  # checks the val shard now, not at the first eval
    except (FileNotFoundError, ValueError) as error:  # ShardError is a ValueError
        fail(str(error))
    log(f"train_data:pattern={hp.train_files} shards={len(train_files)} tokens={loader.num_tokens}")
    log(f"val_data:path={hp.val_file} tokens={hp.val_tokens}")
    baseline = unigram_baseline(train_files, [hp.val_file]) if hp.unigram_baseline else None

    # -----------------------------------------------------------------------------
    # Model and optimizers

    log(f"params:{model.num_params()}")
    if baseline is not None:
        log(f"unigram_baseline:{baseline:.4f}")
    if use_cuda and hp.compile:
        model.trunk.compile()
    optimizers = make_optimizers(model, hp, fast_bf16)
    muon = optimizers[0]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]

    def lr_multiplier(step: int) -> float:
        """Linear warm-up, constant, then a linear cool-down to 0 over the last cooldown_frac of the steps."""
        if step < hp.warmup_steps:
            return (step + 1) / hp.warmup_steps
        cooldown_steps = hp.cooldown_frac * hp.steps
        return min(1.0, (hp.steps - step) / cooldown_steps) if cooldown_steps > 0 else 1.0

    def muon_momentum(step: int) -> float:
        frac = min(step / hp.muon_momentum_warmup, 1.0) if hp.muon_momentum_warmup else 1.0
        return (1 - frac) * hp.muon_momentum_start + frac * hp.muon_momentum

    start_step = 0
    if hp.resume:
        start_step = load_checkpoint(hp.resume, model, config, optimizers, loader, device)
        log(f"resumed:{hp.resume} step:{start_step}")

    # -----------------------------------------------------------------------------
    # Validation

    def evaluate() -> tuple[float, int]:
        model.eval()
        with autocast:
            result = val_nelbo(model, hp.val_file, hp.val_tokens, hp.seq_len, VAL_NOISE_SEED, rank, world_size)
        model.train()
        return result

    # -----------------------------------------------------------------------------
    # Checkpoint

    checkpoint_folder = os.path.join(hp.checkpoint_dir, run_id)
    last_checkpoint = hp.resume or "none"

    def save(name: str, step: int) -> str:
        """Write atomically: a crash mid-write leaves the previous file intact."""
        path = os.path.join(checkpoint_folder, name)
        if master:
            os.makedirs(checkpoint_folder, exist_ok=True)
            state = dict(format=CHECKPOINT_FORMAT, model=model.state_dict(), model_config=asdict(config),
                         hparams=asdict(hp), step=step, optimizers=[opt.state_dict() for opt in optimizers],
                         loader=loader.state_dict(), rng=rng_state())
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)
        return path

    # -----------------------------------------------------------------------------
    # Training loop: step S runs validation and checkpoints of the weights after S optimizer steps

    noise_generator = torch.Generator()
    train_time_ms, step_start = 0.0, time.perf_counter()

    def sync_time() -> float:
        if use_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    for step in range(start_step, hp.steps + 1):
        last_step = step == hp.steps
        resumed_here = hp.resume and step == start_step
        if not resumed_here and (last_step or (hp.val_every and step % hp.val_every == 0) or step == 0):
            train_time_ms += 1000 * (sync_time() - step_start)
            val_loss, val_count = evaluate()
            log(f"step:{step}/{hp.steps} val_loss:{val_loss:.4f} ppl:{math.exp(min(val_loss, 700)):.2f} "
                f"train_time:{train_time_ms:.0f}ms tokens:{val_count}")
            step_start = sync_time()
        if not resumed_here and hp.save_every and step % hp.save_every == 0 and 0 < step < hp.steps:
            last_checkpoint = save("latest.pt", step)
            log(f"saved:{last_checkpoint} step:{step}")
        if last_step:
            break

        loss_sum = torch.zeros((), device=device)
        for micro_step in range(grad_accum):
            try:
                tokens = loader.next_batch()
            except DataExhausted as error:
                fail(f"step {step + 1} of {hp.steps}: {error}")
            # noise depends on the sequence's place in the global batch, not on which rank draws it
            chunk = step * hp.batch_size + micro_step * world_size + rank
            noise_generator.manual_seed((hp.seed << 32) + chunk)
            noise = train_noise(tokens.numel(), config.block_size, hp.t_lo, hp.t_hi, noise_generator)
            with autocast:
                loss = model(tokens.to(device), Noise(*(x.to(device) for x in noise))) / hp.batch_size
            loss.backward()
            loss_sum += loss.detach()
        if world_size > 1:
            handles = [dist.all_reduce(p.grad, async_op=True) for p in model.parameters()]
            handles.append(dist.all_reduce(loss_sum, async_op=True))
            for handle in handles:
                handle.wait()
        train_loss = loss_sum.item()
        if not math.isfinite(train_loss):
            fail(f"train loss is {train_loss} at step {step + 1}; stopped before updating the weights "
                 f"(last checkpoint: {last_checkpoint})")
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_multiplier(step)
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(step)
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        elapsed_ms = train_time_ms + 1000 * (sync_time() - step_start)
        log(f"step:{step + 1}/{hp.steps} train_loss:{train_loss:.4f} train_time:{elapsed_ms:.0f}ms "
            f"step_avg:{elapsed_ms / (step + 1 - start_step):.2f}ms")

    log(f"train_tokens:{loader.tokens_consumed}")
    log(f"peak_memory:{peak_memory_mib(use_cuda)}MiB")
    if hp.save_final:
        path = save("final.pt", hp.steps)
        log(f"checkpoint:{path}")
        if master:
            print(f"sample from it: python sample.py --checkpoint={path}")
    if world_size > 1:
        dist.destroy_process_group()


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
        loss = model(tokens.to(device), Noise(*(x.to(device) for x in noise)))
        loss_sum += loss.double() * tokens.numel()
        token_count += tokens.numel()
    if world_size > 1:
        dist.all_reduce(loss_sum)
        dist.all_reduce(token_count)
    return (loss_sum / token_count).item(), int(token_count.item())


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 matmul kernels for this CPU: x86 with AVX-512 (in hardware with AVX512-BF16 or AMX,
    converted otherwise) or ARM with bf16. Without them (AVX2-only CPUs) bf16 matmuls run hundreds of times
    slower than fp32."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.rstrip()
    except (OSError, subprocess.SubprocessError):
        return "(not available)"


def peak_memory_mib(use_cuda: bool) -> int:
    if use_cuda:
        return torch.cuda.max_memory_allocated() // 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux reports KiB


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


def load_checkpoint(path, model, config, optimizers, loader, device) -> int:
    """Restore weights, optimizer states, data position and RNG; returns the step to continue from."""
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
    return state["step"]


if __name__ == "__main__":
    main(sys.argv[1:])
