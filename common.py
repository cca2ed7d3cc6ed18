"""
What the scripts share: --name=value flags and --help, the device, precision and process group, the guards of
every private or version-dependent torch call, checkpoints, peak memory, and the val NELBO (the protocol of
train.py's validation and of eval.py).

train.py, sample.py, eval.py and bench.py import this file; it imports only model.py and data/, never a script.
"""

import contextlib
import functools
import inspect
import os
import resource
import sys
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
import torch.nn.attention.flex_attention as flex_attention_module
from tqdm import tqdm

from data.loader import val_batches
from model import BD3LM, ModelConfig, Noise, check_token_ids, eval_noise

CHECKPOINT_FORMAT = "bd3lm-speedrun-v3"
VAL_NOISE_SEED = 0  # fixed for every run, so all val losses are measured under the same noise
# k masked tokens per block, k uniform on 1..16, weight 16 / k: the NELBO, at a fraction of iid t's standard error
VAL_ESTIMATOR = "exact_k"


class ConfigError(ValueError):
    """A flag, file or combination of settings a script cannot use: one line on stderr, exit status 2."""


# -----------------------------------------------------------------------------
# Flags


def usage(command: str, settings_class) -> str:
    """--help: each field of a settings dataclass with its default and help text."""
    lines = [f"usage: {command}", ""]
    lines += [f"  {f'--{f.name}={f.default}':<44} {f.metadata['help']}" for f in fields(settings_class)]
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
    """`--name=value` flags for the fields of a settings dataclass, each value converted to its field's type."""
    kinds, flags = {f.name: f.type for f in fields(settings_class)}, {}
    for arg in argv:
        name, equals, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not equals:
            raise ConfigError(f"expected --name=value, got {arg!r} (see --help)")
        if name not in kinds:
            raise ConfigError(f"unknown flag --{name} (see --help)")
        flags[name] = parse_value(name, kinds[name], text)
    return flags


def command_line(argv: list[str], settings_class, command: str, more_help: str = ""):
    """A script's settings from its --name=value flags; --help prints them and exits, a bad flag is one line
    and exit status 2."""
    if "--help" in argv or "-h" in argv:
        print(usage(command, settings_class) + more_help)
        sys.exit(0)
    with user_errors():
        return settings_class(**parse_flags(argv, settings_class))


@contextlib.contextmanager
def user_errors():
    """What the user gave and the script cannot use (a ConfigError, a ShardError or another ValueError, a missing
    file) ends the script with one line and exit status 2."""
    try:
        yield
    except (ValueError, FileNotFoundError) as error:
        fail(str(error), status=2)


def fail(message: str, status: int = 1):
    """One line on stderr (from rank 0 only), then exit: user errors never print a traceback."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        *others, last = choices
        raise ConfigError(f"--{name} must be {', '.join(others)} or {last}, got {value!r}")


# -----------------------------------------------------------------------------
# Device, precision, process group


def pick_device(name: str = "auto") -> torch.device:
    """`--device`: auto (this rank's GPU if there is one, else the CPU), cpu or cuda."""
    check_choice("device", name, ("auto", "cpu", "cuda"))
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but this machine has no CUDA device")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    user_set = any(name in os.environ for name in ALLOC_CONF_VARIABLES)
    if not user_set and not allocator_settings():  # the user's setting wins
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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)


def uses_bf16(autocast: str, device: torch.device) -> bool:
    """`--autocast` (checked with the other flags): auto (bf16 on CUDA and on CPUs with bf16 kernels, else fp32),
    bf16 or fp32."""
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
    """Check a chunk's token ids on the CPU (the compiled loss cannot without waiting for the device), then copy it
    and its noise to `device`; to a GPU from pinned memory, without blocking."""
    check_token_ids(tokens, vocab_size)

    def copy(x: torch.Tensor) -> torch.Tensor:
        return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)
    return copy(tokens), Noise(*(copy(x) for x in noise))


# -----------------------------------------------------------------------------
# Torch versions: every private or version-dependent torch call of the scripts, each with a fallback that keeps
# the behaviour on every supported release (2.11 to the newest; requirements.txt)

ALLOC_CONF_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # the new name, then the older one


def allocator_settings() -> str:
    """The accelerator allocator's settings in effect (PYTORCH_ALLOC_CONF syntax); empty: torch's defaults.
    torch 2.11 has no getter: there the settings are read back from the environment, which
    set_allocator_settings keeps in step."""
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if getter is not None:
        return getter()
    return next((os.environ[name] for name in ALLOC_CONF_VARIABLES if os.environ.get(name)), "")


def set_allocator_settings(settings: str) -> None:
    """Apply allocator settings before the first CUDA allocation: torch may have read os.environ at import
    already. The environment gets them too, for allocator_settings on torch 2.11 and for child processes."""
    torch._C._accelerator_setAllocatorSettings(settings)
    os.environ["PYTORCH_ALLOC_CONF"] = settings


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast here: on CUDA, and on CPUs for which oneDNN has bf16 kernels (x86 with
    AVX-512, ARM with bf16); on AVX2-only CPUs they are far slower than fp32."""
    return device.type == "cuda" or (torch.backends.mkldnn.is_available()
                                     and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def inductor_sorts_fall_back() -> bool:
    """Whether Inductor honours model.py's `fallback_to_eager` annotation on the BlockMask's argsort (torch 2.13
    and later do). Where it does not (2.11), each flex graph compiles Triton sorts: slower to compile, same
    result."""
    import torch._inductor.graph as lowering  # Inductor's lowering of each graph node reads the annotation
    return "fallback_to_eager" in inspect.getsource(lowering)


def torch_limitations() -> list[str]:
    """One line for each thing this torch cannot do that a GPU run would use: for the log header and gpu_check."""
    if inductor_sorts_fall_back():
        return []
    return [f"torch {torch.__version__}: Inductor ignores the fallback_to_eager annotation on the BlockMask's "
            "argsort, so every flex graph compiles Triton sorts (pytorch#182060): minutes more compile, same results"]


@contextlib.contextmanager
def flex_backward_on_cpu():
    """Lift FlexAttention's only refusal of a CPU backward (a private guard), so a CPU traces and runs the compiled
    graph a GPU runs: for gpu_check's rehearsal and the tests, never for training."""
    guard = flex_attention_module._validate_device
    flex_attention_module._validate_device = lambda *tensors: None
    try:
        yield
    finally:
        flex_attention_module._validate_device = guard


# -----------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: str, model: BD3LM, hparams: dict, **training_state) -> None:
    """Write a checkpoint that load_model reads (and train.py's resume, given its training state), atomically: a
    crash mid-write leaves the previous file intact."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    state = dict(format=CHECKPOINT_FORMAT, model=model.state_dict(), model_config=asdict(model.config),
                 hparams=hparams, **training_state)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_checkpoint(path: str, device) -> dict:
    """A checkpoint of this code's format, loaded with weights_only=True; a ConfigError naming the problem
    otherwise."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path!r} does not exist" if path else "--checkpoint=PATH is required")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception:
        raise ConfigError(f"{path} is not a checkpoint of this project (torch.load cannot read it)") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        said = state.get("format") if isinstance(state, dict) else None
        found = f" (it says {said!r}: retrain with this code)" if said else ""
        raise ConfigError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint of this project{found}")
    return state


def load_model(path: str, device: torch.device) -> tuple[BD3LM, dict]:
    """The trained model of a checkpoint, in eval mode, and the settings of the run that wrote it."""
    state = read_checkpoint(path, device)
    try:
        model = BD3LM(ModelConfig(**state["model_config"])).to(device)
        model.load_state_dict(state["model"])
        return model.eval(), state["hparams"]
    except (KeyError, TypeError, ValueError, RuntimeError) as error:  # a damaged or hand-edited checkpoint
        raise ConfigError(f"{path} does not hold a usable model: {str(error).splitlines()[0]}") from None


# -----------------------------------------------------------------------------
# Validation


@torch.no_grad()
def val_nelbo(model: BD3LM, files, num_tokens: int | None, seq_len: int, seed: int, rank: int = 0,
              world_size: int = 1, progress: bool = False, estimator: str = VAL_ESTIMATOR,
              schedule: str = "linear") -> tuple[float, int]:
    """NELBO in nats/token of the first `num_tokens` tokens of `files` (None: every whole chunk), cut into fixed
    chunks of seq_len, under eval_noise(seed, estimator, schedule): the same chunks and noise whatever the world
    size. Returns (NELBO, tokens) summed over all ranks."""
    device, config = model.head.weight.device, model.config
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    token_count = torch.zeros((), dtype=torch.float64, device=device)
    chunks = val_batches(files, num_tokens, seq_len, rank, world_size)
    for offset, tokens in tqdm(chunks, unit="chunk", disable=not progress, leave=False):
        noise = eval_noise(tokens.numel(), config.block_size, seed, offset, schedule, estimator)
        loss = model(*to_device(tokens, noise, device, config.vocab_size))
        loss_sum += loss.double() * tokens.numel()
        token_count += tokens.numel()
    if world_size > 1:
        dist.all_reduce(loss_sum)
        dist.all_reduce(token_count)
    return (loss_sum / token_count).item(), int(token_count.item())
