"""Train a block diffusion language model (BD3-LM), speedrun style: `python train.py --preset=demo` on a CPU, `torchrun
--standalone --nproc_per_node=8 train.py` for the record. Flags: the fields of Hyperparameters (`--help`); the log is
logs/<run_id>.txt. Whatever the ranks and micro_batch, a step consumes the same sequences with the same noise, so
presets record (8 GPUs) and record_24gb (one) are one run."""

import glob, json, math, os, platform, site, subprocess, sys, time, traceback, types, uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist

import common
from common import ConfigError, fail, to_device
from data.loader import (DEMO_DIR, DataExhausted, TokenLoader, find_shards, train_val_paths, unigram_baseline,
                         val_batches)
from data.shards import file_sha256, shard_num_tokens
from model import BD3LM, ModelConfig, flex_kernel_options, setting
from noise import TRAIN_ESTIMATOR, Noise, eval_noise, step_noise

@dataclass
class Hyperparameters(ModelConfig):
    preset: str = setting("record", "record (FineWeb-Edu speedrun, 80 GB GPUs), record_24gb (the same run on 24 GB "
                          "GPUs) or demo (CPU, built-in corpus)")
    run_id: str = setting("", "names logs/<run_id>.txt and checkpoints/<run_id>/; empty: date, time, a random suffix")
    data: str = setting("data/finewebedu10B/finewebedu", "shards DATA_train_*.bin and DATA_val_000000.bin")
    val_tokens: int = setting(10_485_760, "val tokens per evaluation, a multiple of seq_len")
    seq_len: int = setting(8 * 1024, "tokens per sequence, a chunk of the stream that starts at a document")
    batch_size: int = setting(32, "sequences per optimizer step, all ranks together")
    micro_batch: int = setting(4, "sequences each rank stacks into one forward (documents never cross rows); "
                               "batch_size must be a multiple of micro_batch x ranks; the rest is accumulated")
    steps: int = setting(3500, "optimizer steps")
    t_lo: float = setting(0.3, "training masks each block with probability in [t_lo, t_hi] (validation never clips)")
    t_hi: float = setting(0.8, "upper end of the training masking probability")
    muon_lr: float = setting(0.05, "Muon LR of the hidden matrices")
    embed_lr: float = setting(0.3, "Adam LR of the token embedding")
    head_lr: float = setting(0.004, "Adam LR of the output head")
    scalar_lr: float = setting(0.02, "Adam LR of the scalar parameters")
    val_every: int = setting(250, "validate and save latest.pt every this many steps (0: at the start and end only)")
    resume: str = setting("", "continue from this checkpoint; all other settings must match that run")
    seed: int = setting(0, "seed of the initial weights and of the training noise")
    autocast: str = setting("auto", "auto (bf16 on CUDA and on CPUs with bf16 kernels, else fp32), bf16 or fp32")

    train_files = property(lambda self: train_val_paths(self.data)[0])
    val_file = property(lambda self: train_val_paths(self.data)[1])
    estimator = TRAIN_ESTIMATOR  # the training noise (noise.ESTIMATORS): a choice of the code, logged in the config

    def config(self) -> dict:
        """The settings as the log's config line and checkpoints record them, the estimator included."""
        return {**asdict(self), "estimator": self.estimator}

LOG_DIR, CHECKPOINT_DIR = "logs", "checkpoints"
HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON_FOLDERS = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, site.getusersitepackages(),
                  *site.getsitepackages()}  # the Python installation and its packages
COOLDOWN_FRAC = 0.45  # the LR decays linearly to 0 over this last fraction of the steps
MUON_MOMENTUM = (0.85, 0.95)  # at step 0 and after MUON_MOMENTUM_WARMUP steps
MUON_MOMENTUM_WARMUP = 300  # steps, a quarter of the run if that is shorter
PRESETS = {
    "record": {},  # 8 x 80 GB GPUs, each rank one forward of 4 x 8K tokens a step
    "record_24gb": dict(micro_batch=1),  # the same run on 24 GB GPUs (RTX 3090/4090), 8K tokens per forward
    # many steps of few short sequences: a small model learns on CPU cores (docs/training.md)
    "demo": dict(data=f"{DEMO_DIR}/demo", val_tokens=32 * 1024, n_layer=4, n_head=4, head_dim=64, model_dim=256,
                 mlp_hidden=1024, seq_len=256, batch_size=4, micro_batch=1, steps=220, val_every=110),
}

def usage() -> str:
    presets = [f"preset {name}: " + (" ".join(f"--{k}={v}" for k, v in overrides.items()) or "the defaults")
               for name, overrides in PRESETS.items()]
    return "\n\n".join([common.usage("python train.py [--preset=record|record_24gb|demo] [--name=value ...]",
                                     Hyperparameters), *presets])

def parse_args(argv: list[str]) -> Hyperparameters:
    """`--name=value` flags over the chosen preset over the defaults."""
    flags = common.parse_flags(argv, Hyperparameters)
    preset = flags.get("preset", Hyperparameters.preset)
    common.check_choice("preset", preset, tuple(PRESETS))
    return Hyperparameters(**{**PRESETS[preset], **flags})

def model_config(hp: Hyperparameters) -> ModelConfig:
    return ModelConfig(**{f.name: getattr(hp, f.name) for f in fields(ModelConfig)})

def check_settings(hp: Hyperparameters, world_size: int) -> None:
    for name in ("steps", "seq_len", "batch_size", "micro_batch", "val_tokens"):
        if getattr(hp, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(hp, name)}")
    for name in ("val_every", "muon_lr", "embed_lr", "head_lr", "scalar_lr"):
        if getattr(hp, name) < 0:
            raise ConfigError(f"--{name} must not be negative, got {getattr(hp, name)}")
    if hp.batch_size % (world_size * hp.micro_batch):
        raise ConfigError(f"--batch_size={hp.batch_size} sequences do not divide into forwards of --micro_batch="
                          f"{hp.micro_batch} on {world_size} rank{'s' * (world_size > 1)}")
    if hp.val_tokens % hp.seq_len:
        raise ConfigError(f"--val_tokens={hp.val_tokens} is not a multiple of --seq_len={hp.seq_len}")
    if not 0 <= hp.t_lo < hp.t_hi <= 1:
        raise ConfigError(f"need 0 <= t_lo < t_hi <= 1, got t_lo={hp.t_lo} t_hi={hp.t_hi}")
    if not 0 <= hp.seed < 2**31:
        raise ConfigError(f"--seed must lie in [0, 2**31), got {hp.seed}")
    common.check_choice("autocast", hp.autocast, ("auto", "bf16", "fp32"))
    if hp.resume and not os.path.isfile(hp.resume):
        raise ConfigError(f"--resume={hp.resume} is not a file")
    model_config(hp).validate()

def grad_accum(hp: Hyperparameters, world_size: int) -> int:
    """Forwards (micro-steps) per optimizer step on each rank."""
    return hp.batch_size // (world_size * hp.micro_batch)

# -----------------------------------------------------------------------------
# Optimizers

def newton_schulz(grad: torch.Tensor, dtype: torch.dtype, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The quintic Newton-Schulz orthogonalization of torch.optim.Muon (and modded-nanogpt), in `dtype`."""
    a, b, c = 3.4445, -4.775, 2.0315
    tall = grad.size(0) > grad.size(1)
    x = grad.to(dtype).T if tall else grad.to(dtype)
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x

def turns(params: list[torch.Tensor], world_size: int) -> list[list[torch.Tensor]]:
    """The matrices in turns of up to world_size of one size; rank r orthogonalizes the r-th of each turn."""
    by_size = {}
    for p in params:
        by_size.setdefault(p.numel(), []).append(p)
    return [same[i:i + world_size] for same in by_size.values() for i in range(0, len(same), world_size)]

class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update, Newton-Schulz in `ns_dtype`. Distributed, each rank orthogonalizes its `turns` and
    the updates are all-gathered; every rank keeps every momentum buffer, so any can resume."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, ns_dtype: torch.dtype):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self) -> None:
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
                self.state[p]["momentum_buffer"].lerp_(p.grad, 1 - group["momentum"])
            gathers = []  # all launched before any is waited for: each gather overlaps the next Newton-Schulz
            for turn in turns(params, world_size):
                if rank < len(turn):
                    nesterov = turn[rank].grad.lerp(self.state[turn[rank]]["momentum_buffer"], group["momentum"])
                    mine = newton_schulz(nesterov, self.ns_dtype).flatten()
                else:  # the last turn of a size can leave ranks without a matrix
                    mine = turn[0].new_zeros(turn[0].numel(), dtype=self.ns_dtype)
                updates, handle = mine[None], None
                if world_size > 1:
                    updates = mine.new_empty(world_size, mine.numel())
                    handle = common.all_gather(updates.view(-1), mine)
                gathers.append((handle, turn, updates))
            for handle, turn, updates in gathers:
                if handle is not None:
                    handle.wait()
                for p, update in zip(turn, updates):
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update.view_as(p), alpha=-group["lr"] * max(1, p.size(0) / p.size(1)) ** 0.5)

def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients over the ranks in one all-reduce; a gradient stays None only where it is None on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    present = [p.grad is not None for p in params]
    # the per-parameter count of ranks with a gradient is made on the device: a host copy would wait
    flat = torch.cat([*((p.grad if has else torch.zeros_like(p)).flatten() for p, has in zip(params, present)),
                      *(p.new_ones(1) if has else p.new_zeros(1) for p, has in zip(params, present))])
    dist.all_reduce(flat)
    *grads, ranks_with_grad = flat.split([p.numel() for p in params] + [len(params)])
    for p, grad in zip(params, grads):
        p.grad = grad.view_as(p)
    if not all(present):  # a rank that has every gradient keeps them all, with no read-back from the device
        for p, count in zip(params, ranks_with_grad.tolist()):
            p.grad = None if count == 0 else p.grad

def make_optimizers(model: BD3LM, hp: Hyperparameters, fast_bf16: bool) -> list[torch.optim.Optimizer]:
    """Muon for the hidden matrices, Adam for the embedding, the head and the scalars."""
    groups = model.param_groups()
    if sum(p.numel() for group in groups.values() for p in group) != model.num_params():
        raise RuntimeError("model.param_groups() does not cover every parameter exactly once")
    muon = Muon(groups["hidden_matrices"], lr=hp.muon_lr, momentum=MUON_MOMENTUM[1], weight_decay=0.0,
                ns_dtype=torch.bfloat16 if fast_bf16 else torch.float32)
    adam_groups = [dict(params=groups[name], lr=lr) for name, lr in
                   (("embed", hp.embed_lr), ("head", hp.head_lr), ("scalars", hp.scalar_lr)) if groups[name]]
    return [muon, torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, fused=True)]

def lr_multiplier(hp: Hyperparameters, step: int) -> float:
    return min(1.0, (hp.steps - step) / (COOLDOWN_FRAC * hp.steps))

def muon_momentum(hp: Hyperparameters, step: int) -> float:
    frac = min(step / min(MUON_MOMENTUM_WARMUP, max(1, hp.steps // 4)), 1.0)
    return (1 - frac) * MUON_MOMENTUM[0] + frac * MUON_MOMENTUM[1]

# -----------------------------------------------------------------------------
# Setup: the run's steps in order

def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        return print(usage())
    rank, world_size = common.ranks()
    with common.user_errors():
        hp = parse_args(argv)
        check_settings(hp, world_size)
        device = common.pick_device()
    common.init_process_group(device)
    bf16 = common.uses_bf16(hp.autocast, device)
    model = build_model(model_config(hp), hp.seed, device)
    run_id = hp.run_id or f"{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"
    log = RunLog(LOG_DIR, run_id, rank)
    write_header(log, hp, world_size, bf16, model)
    loader = load_data(hp, rank, world_size, log)
    log(f"params:{model.num_params()}")
    autocast = common.autocast_context(device, bf16)
    run = Run(hp, rank, world_size, device, autocast, model, make_optimizers(model, hp, common.fast_bf16(device)),
              loader, log, checkpoint_folder=os.path.join(CHECKPOINT_DIR, run_id))
    start_step = run.resume() if hp.resume else 0
    try:
        if device.type == "cuda":
            model.compile_loss()
        if model.compiled:  # before the clock starts
            log(f"compile_time:{warm_up(model, hp.val_file, hp.seq_len, hp.micro_batch, autocast, device):.0f}ms")
        run.train(start_step)
    except torch.OutOfMemoryError:
        hint = "lower --micro_batch (--preset=record_24gb runs 1)" if hp.micro_batch > 1 else "lower --seq_len"
        fail(f"out of GPU memory with --micro_batch={hp.micro_batch} sequences of {hp.seq_len} tokens per forward: "
             f"{hint} (last checkpoint: {run.last_checkpoint})")
    run.finish()

class RunLog:
    """log_dir/<run_id>.txt, written by rank 0 only; `log(line)` also prints the line unless console=False."""

    def __init__(self, log_dir: str, run_id: str, rank: int):
        os.makedirs(log_dir, exist_ok=True)
        self.file = open(os.path.join(log_dir, f"{run_id}.txt"), "w") if rank == 0 else None

    def __call__(self, line: str, console: bool = True) -> None:
        if self.file is not None:
            print(line, file=self.file, flush=True)
            if console:
                print(line, flush=True)

def inside(path: str, folder: str) -> bool:
    return os.path.abspath(path).startswith(os.path.abspath(folder) + os.sep)

def module_files() -> set[str]:
    """The files of the imported modules (runpy leaves a script's own __file__ relative)."""
    files = {getattr(module, "__file__", None) for module in list(sys.modules.values())}
    return {os.path.abspath(path) for path in files if isinstance(path, str) and os.path.isfile(path)}

def repository_modules() -> list[str]:
    """The repository's imported modules, relative to it (tests and a virtual environment inside it excluded)."""
    environments = [folder for folder in PYTHON_FOLDERS if inside(folder, HERE)]
    paths = [os.path.relpath(path, HERE) for path in module_files() if inside(path, HERE) and path.endswith(".py")
             and not any(inside(path, folder) for folder in environments)]
    return sorted(path for path in paths if not path.startswith("tests" + os.sep))

def write_header(log: RunLog, hp: Hyperparameters, world_size: int, bf16: bool, model: BD3LM) -> None:
    """What reproduces the run: the source of every repository module it imported, the versions, the config, and a
    runtime line naming code that ran unembedded (the entry script, modules from elsewhere, a replaced clock)."""
    for name in repository_modules():
        with open(os.path.join(HERE, name), encoding="utf-8", newline="") as f:  # byte-exact for check.py --rev
            log(f"==== file: {name} ====\n{f.read()}==== end file: {name} ====", console=False)
    log(f"python:{platform.python_version()}", console=False)
    log(f"torch:{torch.__version__} cuda:{torch.version.cuda or 'none'}", console=False)
    log(f"allocator:{common.allocator_settings() or 'default'}", console=False)
    for limitation in common.torch_limitations() if torch.cuda.is_available() else ():
        log(f"torch_limitation:{limitation}")
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.rstrip()
    except (OSError, subprocess.SubprocessError):
        smi = "(not available)"
    log(f"nvidia-smi:\n{smi}", console=False)
    entry = os.path.abspath(traceback.extract_stack()[0].filename)
    outside = sorted(path for path in module_files()
                     if not inside(path, HERE) and not any(inside(path, folder) for folder in PYTHON_FOLDERS))
    clock = time.perf_counter
    genuine = isinstance(clock, types.BuiltinFunctionType) and clock.__self__ is time \
        and clock.__name__ == "perf_counter"
    log(f"runtime:entry={os.path.relpath(entry, HERE) if inside(entry, HERE) else entry} "
        f"outside_modules={','.join(outside) or 'none'} clock={'genuine' if genuine else 'replaced'}", console=False)
    log(f"config:{json.dumps(hp.config(), sort_keys=True)}")
    log(f"world_size:{world_size} micro_batch:{hp.micro_batch} grad_accum:{grad_accum(hp, world_size)} "
        f"autocast:{'bf16' if bf16 else 'fp32'}")
    if torch.cuda.is_available():
        log(f"flex_options:{json.dumps(model.trunk.blocks[0].attn.flex_options)}")

def load_data(hp: Hyperparameters, rank: int, world_size: int, log: RunLog) -> TokenLoader:
    """The train loader, after a check of the val shard; the demo corpus is prepared on first use."""
    if rank == 0 and not glob.glob(hp.train_files) and os.path.dirname(os.path.abspath(hp.train_files)) == DEMO_DIR:
        # a subprocess, not an import: the corpus builder is a tool, and a log carries only what the run imported
        subprocess.run([sys.executable, os.path.join(HERE, "tools", "demo_corpus.py")], check=True)
    if world_size > 1:
        dist.barrier()
    try:
        train_files = find_shards(hp.train_files)
        loader = TokenLoader(train_files, hp.seq_len, rank, world_size, sequences=hp.micro_batch)
        val_batches(hp.val_file, hp.val_tokens, hp.seq_len)  # checks the val shard now, not at the first eval
        unigram = unigram_baseline(train_files, [hp.val_file]) if rank == 0 else None  # the level to beat
    except (FileNotFoundError, ValueError) as error:  # ShardError is a ValueError
        fail(str(error))
    log(f"train_data:pattern={hp.train_files} shards={len(train_files)} tokens={loader.num_tokens}")
    log(f"val_data:path={hp.val_file} tokens={hp.val_tokens}")
    if rank == 0:  # the log names its data by content: each shard's size and sha256
        started, named = time.perf_counter(), [("train", path) for path in train_files] + [("val", hp.val_file)]
        with ThreadPoolExecutor(min(len(named), os.cpu_count() or 1)) as pool:
            hashes = list(pool.map(file_sha256, [path for _, path in named]))
        for (split, path), sha256 in zip(named, hashes):
            log(f"shard:{split} path={path} tokens={shard_num_tokens(path)} bytes={os.path.getsize(path)} "
                f"sha256={sha256}", console=False)
        log(f"shard_hash_time:{1000 * (time.perf_counter() - started):.0f}ms")
        log(f"unigram_baseline:{unigram:.4f}")
    return loader

def build_model(config: ModelConfig, seed: int, device: torch.device) -> BD3LM:
    """The initial weights drawn from `seed`, on `device`; on a GPU, with its FlexAttention kernel options."""
    torch.manual_seed(seed)
    model = BD3LM(config).to(device)
    if device.type == "cuda":
        model.set_flex_options(flex_kernel_options(torch.cuda.get_device_properties(device)))
    return model

def warm_up(model: BD3LM, val_file: str, seq_len: int, micro_batch: int, autocast, device: torch.device) -> float:
    """Compile before the clock starts (training forward and backward on micro_batch copies of the first val chunk,
    the val forward on one); its ms. No optimizer step, loader or RNG: nothing the run depends on changes."""
    started = time.perf_counter()
    _, tokens = next(val_batches(val_file, seq_len, seq_len))
    noise = eval_noise(seq_len, model.config.block_size, common.VAL_NOISE_SEED, 0)
    tokens, noise = to_device(tokens, noise, device, model.config.vocab_size)
    with autocast:
        # repeat, not expand: the compiled graph is specialized to the strides of real batches too
        model(tokens.repeat(micro_batch, 1), Noise(*(x.repeat(micro_batch, 1) for x in noise))).backward()
        model.eval()
        with torch.no_grad():
            model(tokens, noise)
        model.train()
    model.zero_grad(set_to_none=True)
    common.synchronize(device)
    if dist.is_initialized():
        dist.barrier()  # every rank starts its clock together, so no first step waits for a slower compile
    return 1000 * (time.perf_counter() - started)

# -----------------------------------------------------------------------------
# Training loop: step S validates and saves the weights after S optimizer steps

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
    loader: TokenLoader
    log: RunLog
    checkpoint_folder: str
    last_checkpoint: str = field(init=False)

    def __post_init__(self):
        self.last_checkpoint = self.hp.resume or "none"
        for group in (group for optimizer in self.optimizers for group in optimizer.param_groups):
            group["initial_lr"] = group["lr"]  # what lr_multiplier scales; checkpoints keep it

    def train(self, start_step: int) -> None:
        """Steps start_step to hp.steps; the train time counts everything but validation."""
        hp, train_time_ms, step_start = self.hp, 0.0, time.perf_counter()
        for step in range(start_step, hp.steps + 1):
            resumed_here = hp.resume and step == start_step  # the checkpoint's run validated and saved here
            if not resumed_here and (step in (0, hp.steps) or (hp.val_every and step % hp.val_every == 0)):
                train_time_ms += 1000 * (self.sync_time() - step_start)
                self.validate(step, train_time_ms)
                if 0 < step < hp.steps:
                    self.last_checkpoint = self.save("latest.pt", step)
                    self.log(f"saved:{self.last_checkpoint} step:{step}")
                step_start = self.sync_time()
            if step == hp.steps:
                break
            train_loss = self.train_step(step)
            elapsed_ms = train_time_ms + 1000 * (self.sync_time() - step_start)
            self.log(f"step:{step + 1}/{hp.steps} train_loss:{train_loss:.4f} train_time:{elapsed_ms:.0f}ms "
                     f"step_avg:{elapsed_ms / (step + 1 - start_step):.2f}ms")

    def train_step(self, step: int) -> float:
        """One optimizer step on batch_size sequences (each rank's in forwards of micro_batch); their mean loss."""
        hp, loss_sum = self.hp, torch.zeros((), device=self.device)
        for micro_step in range(grad_accum(hp, self.world_size)):
            try:
                tokens = self.loader.next_batch()
                noise = self.noise_of(step, micro_step, *tokens.shape)
                tokens, noise = to_device(tokens, noise, self.device, self.model.config.vocab_size)
            except (DataExhausted, ValueError) as error:
                fail(f"step {step + 1} of {hp.steps}: {error}")
            with self.autocast:  # the model's mean over this forward's tokens, weighted by its share of the batch
                loss = self.model(tokens, noise) * hp.micro_batch / hp.batch_size
            loss.backward()
            loss_sum += loss.detach()
        all_reduce_grads(list(self.model.parameters()))
        if self.world_size > 1:
            dist.all_reduce(loss_sum)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_multiplier(hp, step)
                if isinstance(optimizer, Muon):
                    group["momentum"] = muon_momentum(hp, step)
            optimizer.step()
        self.model.zero_grad(set_to_none=True)
        train_loss = loss_sum.item()  # the step's one wait for the device, once the optimizers' work is queued
        if not math.isfinite(train_loss):
            fail(f"train loss is {train_loss} at step {step + 1}; stopped before saving this step's weights "
                 f"(last checkpoint: {self.last_checkpoint})")
        return train_loss

    def noise_of(self, step: int, micro_step: int, rows: int, length: int) -> Noise:
        """The noise [rows, length] of this rank's sequences in a micro-step, each from its place in the step."""
        hp, first = self.hp, (micro_step * self.world_size + self.rank) * rows
        noises = [step_noise(length, self.model.config.block_size, hp.t_lo, hp.t_hi, hp.seed, step, chunk,
                             hp.batch_size, hp.estimator) for chunk in range(first, first + rows)]
        return Noise(*(torch.stack(parts) for parts in zip(*noises)))

    def validate(self, step: int, train_time_ms: float) -> None:
        hp = self.hp
        self.model.eval()
        try:
            with self.autocast:
                val_loss, val_count = common.val_nelbo(self.model, hp.val_file, hp.val_tokens, hp.seq_len,
                                                       common.VAL_NOISE_SEED, self.rank, self.world_size,
                                                       progress=self.rank == 0 and sys.stderr.isatty())
        except ValueError as error:  # val token ids the model cannot read (beyond --vocab_size)
            fail(f"validation at step {step}: {error} (last checkpoint: {self.last_checkpoint})")
        self.model.train()
        self.log(f"step:{step}/{hp.steps} val_loss:{val_loss:.4f} ppl:{math.exp(min(val_loss, 700)):.2f} "
                 f"train_time:{train_time_ms:.0f}ms tokens:{val_count}")

    def save(self, name: str, step: int) -> str:
        """Write checkpoint_folder/name from rank 0, with what a resume needs."""
        path = os.path.join(self.checkpoint_folder, name)
        if self.rank == 0:
            rng = {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()}
                                                      if torch.cuda.is_available() else {})}
            common.save_checkpoint(path, self.model, self.hp.config(), step=step, rng=rng,
                                   optimizers=[opt.state_dict() for opt in self.optimizers],
                                   loader=self.loader.state_dict())
        return path

    def resume(self) -> int:
        """Restore weights, optimizer states, data position and RNG from hp.resume; returns its step."""
        path, config = self.hp.resume, asdict(self.model.config)
        try:
            state = common.read_checkpoint(path, self.device)
        except ConfigError as error:
            fail(str(error))
        saved = {**asdict(ModelConfig()), **state["model_config"]}  # a field the writer lacked had its default
        if saved != config:
            differences = ", ".join(f"{key} {saved.get(key)} (now {config.get(key)})"
                                    for key in sorted(saved | config) if saved.get(key) != config.get(key))
            fail(f"checkpoint {path} has a different model config: {differences}", status=2)
        self.model.load_state_dict(state["model"])
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(optimizer_state)
        try:
            self.loader.load_state_dict(state["loader"])
        except ValueError as error:
            fail(f"cannot resume from {path}: {error}")
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())
        self.log(f"resumed:{path} step:{state['step']}")
        return state["step"]

    def finish(self) -> None:
        """The closing lines of the log and the final checkpoint."""
        self.log(f"train_tokens:{self.loader.position}")
        self.log(f"peak_memory:{common.peak_memory_mib(self.device)}MiB")
        path = self.save("final.pt", self.hp.steps)
        self.log(f"checkpoint:{path}")
        if self.rank == 0:
            print(f"sample from it: python sample.py --checkpoint={path}")
        if self.world_size > 1:
            dist.destroy_process_group()

    def sync_time(self) -> float:
        """The clock, once the GPU has done the work queued so far."""
        common.synchronize(self.device)
        return time.perf_counter()

if __name__ == "__main__":
    main(sys.argv[1:])
