"""
The validation NELBO of a checkpoint, on its run's val shard or on any shards.

    python eval.py --checkpoint=checkpoints/demo/final.pt                      # what the run's last val line says
    python eval.py --checkpoint=PATH --seeds=8                                 # mean and standard error over noise
    python eval.py --checkpoint=PATH --files='data/mine/mine_val_*.bin' --val_tokens=0
    torchrun --standalone --nproc_per_node=8 eval.py --checkpoint=PATH         # the same number, faster

The protocol is training's validation (train.val_nelbo): fixed chunks of seq_len tokens, t ~ U(0, 1) per block
and masks from a seed and each token's global position, so the result does not depend on the world size.
Seed k of `--seeds=K` is train.py's val seed plus k, so `--seeds=1` reproduces the log. The last line is the
result, `key:value` pairs a script can parse.
"""

import glob
import math
import os
import statistics
import sys
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from data.loader import find_shards, val_batches
from sample import SettingsError, load_model
from train import VAL_NOISE_SEED, cpu_has_bf16_kernels, parse_flags, setting, val_nelbo


@dataclass
class Settings:
    checkpoint: str = setting("", "checkpoint written by train.py (required)")
    files: str = setting("", "glob of shards to evaluate on; empty: the run's val shard")
    val_tokens: int = setting(-1, "tokens, a multiple of seq_len; -1: the run's number; 0: every whole chunk")
    seq_len: int = setting(0, "tokens per chunk; 0: the run's seq_len")
    seeds: int = setting(1, "noise seeds; with more than one, the mean and its standard error")
    autocast: str = setting("auto", "auto (bf16 on CUDA and on CPUs with bf16 kernels), bf16 or fp32")


def usage() -> str:
    lines = ["usage: python eval.py --checkpoint=PATH [--name=value ...]", ""]
    lines += [f"  {f'--{f.name}={f.default}':<24} {f.metadata['help']}" for f in fields(Settings)]
    return "\n".join(lines)


def parse_settings(argv: list[str]) -> Settings:
    s = Settings(**parse_flags(argv, Settings))  # ConfigError, a ValueError, names a bad flag
    if s.seeds < 1:
        raise SettingsError(f"--seeds must be at least 1, got {s.seeds}")
    if s.val_tokens < -1 or s.seq_len < 0:
        raise SettingsError(f"--val_tokens must be -1, 0 or positive and --seq_len 0 or positive, got "
                            f"{s.val_tokens} and {s.seq_len}")
    if s.autocast not in ("auto", "bf16", "fp32"):
        raise SettingsError(f"--autocast must be auto, bf16 or fp32, got {s.autocast!r}")
    return s


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(usage())
        return
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    try:
        s = parse_settings(argv)
        model, hparams = load_model(s.checkpoint, device)
        files = find_shards(s.files) if s.files else [hparams["val_file"]]
        if not s.files and not glob.glob(hparams["val_file"]):
            raise SettingsError(f"the run's val shard {hparams['val_file']} is not here; give --files=GLOB")
        seq_len = s.seq_len or hparams["seq_len"]
        num_tokens = {-1: hparams["val_tokens"], 0: None}.get(s.val_tokens, s.val_tokens)
        val_batches(files, num_tokens, seq_len)  # checks the shards and the token count now
    except (SettingsError, ValueError, FileNotFoundError) as error:  # ShardError is a ValueError
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    bf16 = s.autocast == "bf16" or (s.autocast == "auto" and (use_cuda or cpu_has_bf16_kernels()))
    results = []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for k in range(s.seeds):
            loss, tokens = val_nelbo(model, files, num_tokens, seq_len, VAL_NOISE_SEED + k, rank, world_size,
                                     progress=rank == 0)
            results.append(loss)
            if rank == 0 and s.seeds > 1:
                print(f"seed:{VAL_NOISE_SEED + k} val_nelbo:{loss:.4f}", flush=True)
    if world_size > 1:
        dist.destroy_process_group()
    if rank == 0:
        mean = statistics.fmean(results)
        stderr = statistics.stdev(results) / math.sqrt(len(results)) if len(results) > 1 else float("nan")
        print(f"val_nelbo:{mean:.4f} stderr:{stderr:.4f} ppl_bound:{math.exp(min(mean, 700)):.2f} seeds:{s.seeds} "
              f"tokens:{tokens} seq_len:{seq_len} autocast:{'bf16' if bf16 else 'fp32'} files:{','.join(files)}")


if __name__ == "__main__":
    main(sys.argv[1:])
