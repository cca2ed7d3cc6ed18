"""What the scripts share: flags, device, process group, version-dependent torch calls, checkpoints, the val NELBO."""

import contextlib, functools, inspect, os, resource, sys
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from tqdm import tqdm

from data.loader import val_batches
from model import BD3LM, check_token_ids
from noise import Noise, eval_noise

CHECKPOINT_FORMAT = "bd3lm-speedrun-v3"
VAL_NOISE_SEED = 0  # fixed for every run, so all val losses are measured under the same noise

class ConfigError(ValueError):
    """A flag, file or combination of settings a script cannot use: one line on stderr, exit status 2."""

# -----------------------------------------------------------------------------
# Flags and errors

def usage(command: str, settings_class) -> str:
    """--help: each field of a settings dataclass with its default and help text."""
    return "\n".join([f"usage: {command}", "", *(f"  {f'--{f.name}={f.default}':<44} {f.metadata['help']}"
                                                 for f in fields(settings_class))])

def parse_flags(argv: list[str], settings_class) -> dict:
    """`--name=value` flags for the fields of a settings dataclass, each value converted to its field's type."""
    kinds, flags = {f.name: f.type for f in fields(settings_class)}, {}
    for arg in argv:
        name, equals, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not equals:
            raise ConfigError(f"expected --name=value, got {arg!r} (see --help)")
        if name not in kinds:
            raise ConfigError(f"unknown flag --{name} (see --help)")
        if kinds[name] is bool:
            if text.lower() not in ("true", "1", "yes", "false", "0", "no"):
                raise ConfigError(f"--{name} takes True or False, got {text!r}")
            flags[name] = text.lower() in ("true", "1", "yes")
            continue
        try:
            flags[name] = kinds[name](text)
        except ValueError:
            raise ConfigError(f"--{name} takes a value of type {kinds[name].__name__}, got {text!r}") from None
    return flags

def command_line(argv: list[str], settings_class, command: str, more_help: str = ""):
    """A script's settings from its flags; --help prints them and exits, a bad flag is one line and exit status 2."""
    if "--help" in argv or "-h" in argv:
        print(usage(command, settings_class) + more_help)
        sys.exit(0)
    with user_errors():
        return settings_class(**parse_flags(argv, settings_class))

@contextlib.contextmanager
def user_errors():
    """A bad input (any ValueError, ShardError and ConfigError included, or a missing file): one line, status 2."""
    try:
        yield
    except (ValueError, FileNotFoundError) as error:
        fail(str(error), status=2)

def fail(message: str, status: int = 1):
    """One line on stderr (rank 0 only), then exit: user errors never print a traceback."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)

def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"--{name} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")

# -----------------------------------------------------------------------------
# Device, precision, process group

def pick_device(name: str = "auto") -> torch.device:
    """`--device`: auto (this rank's GPU if there is one, else the CPU), cpu or cuda."""
    check_choice("device", name, ("auto", "cpu", "cuda"))
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but this machine has no CUDA device")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if not any(variable in os.environ for variable in ALLOC_CONF_VARIABLES) and not allocator_settings():
        set_allocator_settings("expandable_segments:True")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device

def ranks() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) for a plain `python script.py`."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))

def init_process_group(device: torch.device) -> None:
    """Join torchrun's ranks, NCCL on GPUs and gloo on CPUs; nothing for one process."""
    if ranks()[1] > 1:
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)

def uses_bf16(autocast: str, device: torch.device) -> bool:
    """`--autocast`: auto (bf16 where fast_bf16, else fp32), bf16 or fp32."""
    return autocast == "bf16" or (autocast == "auto" and fast_bf16(device))

def autocast_context(device: torch.device, bf16: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU, so that a clock read next counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def peak_memory_mib(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() // 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux reports KiB

def to_device(tokens: torch.Tensor, noise: Noise, device: torch.device, vocab_size: int) -> tuple[torch.Tensor, Noise]:
    """Check token ids on the CPU (a compiled loss cannot), then copy tokens and noise to `device` without blocking."""
    check_token_ids(tokens, vocab_size)
    cuda = device.type == "cuda"
    tokens, *noise = [x.pin_memory().to(device, non_blocking=True) if cuda else x.to(device) for x in (tokens, *noise)]
    return tokens, Noise(*noise)

# -----------------------------------------------------------------------------
# Torch versions: every private or version-dependent torch call, with a fallback for each supported release

ALLOC_CONF_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # the new name, then the older one

def allocator_settings() -> str:
    """The allocator settings in effect (empty: torch's defaults); from the environment on torch 2.11 (no getter)."""
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if getter is not None:
        return getter()
    return next((os.environ[name] for name in ALLOC_CONF_VARIABLES if os.environ.get(name)), "")

def set_allocator_settings(settings: str) -> None:
    """Apply allocator settings and put them in the environment, for allocator_settings on 2.11 and child processes."""
    torch._C._accelerator_setAllocatorSettings(settings)
    os.environ["PYTORCH_ALLOC_CONF"] = settings

def all_gather(output: torch.Tensor, tensor: torch.Tensor):
    """Every rank's `tensor` into `output`, async: all_gather_single, or all_gather_into_tensor (torch 2.11)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, tensor, async_op=True)

def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast: on CUDA and on CPUs with oneDNN bf16 kernels (not on AVX2-only CPUs)."""
    return device.type == "cuda" or (torch.backends.mkldnn.is_available()
                                     and torch.ops.mkldnn._is_mkldnn_bf16_supported())

@functools.cache
def inductor_sorts_fall_back() -> bool:
    """Whether Inductor honours model.py's `fallback_to_eager` annotation on the BlockMask's argsort (torch 2.13+)."""
    import torch._inductor.graph as lowering  # Inductor's lowering of each graph node reads the annotation
    return "fallback_to_eager" in inspect.getsource(lowering)

def torch_limitations() -> list[str]:
    """One line per thing this torch cannot do that a GPU run would use: for the log header and gpu_check."""
    return [] if inductor_sorts_fall_back() else [
        f"torch {torch.__version__}: Inductor ignores the fallback_to_eager annotation on the BlockMask's argsort, so "
        "every flex graph compiles Triton sorts (pytorch#182060): minutes more compile, same results"]

# -----------------------------------------------------------------------------
# Checkpoints and the val NELBO

def save_checkpoint(path: str, model: BD3LM, hparams: dict, **training_state) -> None:
    """Write a checkpoint for sample.load_model (and train.py's resume) atomically: a crash leaves the previous file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(dict(format=CHECKPOINT_FORMAT, model=model.state_dict(), model_config=asdict(model.config),
                    hparams=hparams, **training_state), path + ".tmp")
    os.replace(path + ".tmp", path)

def read_checkpoint(path: str, device) -> dict:
    """A checkpoint of this code's format, loaded with weights_only=True; else a ConfigError naming the problem."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path!r} does not exist" if path else "--checkpoint=PATH is required")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception:
        raise ConfigError(f"{path} is not a checkpoint of this project (torch.load cannot read it)") from None
    said = state.get("format") if isinstance(state, dict) else None
    if said != CHECKPOINT_FORMAT:
        found = f" (it says {said!r}: retrain with this code)" if said else ""
        raise ConfigError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint of this project{found}")
    return state

@torch.no_grad()
def val_nelbo(model: BD3LM, files, num_tokens: int | None, seq_len: int, seed: int, rank: int = 0,
              world_size: int = 1, progress: bool = False, noise_of=eval_noise) -> tuple[float, int]:
    """(NELBO in nats/token, tokens) over all ranks of the first `num_tokens` tokens of `files` (None: every whole
    chunk) in chunks of seq_len under `noise_of` (as eval_noise): the same chunks and noise whatever the world size."""
    device, config = model.head.weight.device, model.config
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [NELBO x tokens, tokens]
    for offset, tokens in tqdm(val_batches(files, num_tokens, seq_len, rank, world_size), unit="chunk",
                               disable=not progress, leave=False):
        noise = noise_of(tokens.numel(), config.block_size, seed, offset)
        sums[0] += model(*to_device(tokens, noise, device, config.vocab_size)).double() * tokens.numel()
        sums[1] += tokens.numel()
    if world_size > 1:
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item(), int(sums[1].item())
