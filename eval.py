"""The validation NELBO of a checkpoint on data by training's protocol (common.val_nelbo), for any world size:
`python eval.py --checkpoint=PATH --seeds=8` gives the mean and standard error over noise seeds (seed k is train.py's
val seed plus k: --seeds=1 reproduces the run's last val line). The last line is the result, `key:value` pairs."""

import math
import os
import statistics
import sys
from dataclasses import dataclass

import torch.distributed as dist

import common
from common import VAL_NOISE_SEED, ConfigError, load_model
from data.loader import find_shards, train_val_paths, val_batches
from model import setting
from noise import SCHEDULES, VAL_ESTIMATORS

@dataclass
class Settings:
    checkpoint: str = setting("", "checkpoint written by train.py (required)")
    files: str = setting("", "glob of shards to evaluate on; empty: the run's val shard")
    val_tokens: int = setting(-1, "tokens, a multiple of seq_len; -1: the run's number; 0: every whole chunk")
    seq_len: int = setting(0, "tokens per chunk; 0: the run's seq_len")
    seeds: int = setting(1, "noise seeds; with more than one, the mean and its standard error")
    estimator: str = setting(common.VAL_ESTIMATOR, "val noise: exact_k (as in training) or iid (t under --schedule)")
    schedule: str = setting("linear", "with --estimator=iid: the schedule of t (noise.SCHEDULES)")
    autocast: str = setting("auto", "auto (bf16 on CUDA and on CPUs with bf16 kernels), bf16 or fp32")
    device: str = setting("auto", "auto (cuda if available, else cpu), cpu or cuda")

def main(argv: list[str]) -> None:
    s = common.command_line(argv, Settings, "python eval.py --checkpoint=PATH [--name=value ...]")
    rank, world_size = common.ranks()
    with common.user_errors():
        if s.seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {s.seeds}")
        common.check_choice("estimator", s.estimator, VAL_ESTIMATORS)
        common.check_choice("schedule", s.schedule, tuple(SCHEDULES))
        if s.schedule != "linear" and s.estimator != "iid":
            raise ConfigError(f"--schedule applies to --estimator=iid only: {s.estimator} masks a number of tokens")
        if s.val_tokens < -1 or s.seq_len < 0:
            raise ConfigError(f"--val_tokens must be -1, 0 or positive and --seq_len 0 or positive, got "
                              f"{s.val_tokens} and {s.seq_len}")
        common.check_choice("autocast", s.autocast, ("auto", "bf16", "fp32"))
        device = common.pick_device(s.device)
        model, hparams = load_model(s.checkpoint, device)
        files = find_shards(s.files) if s.files else [train_val_paths(hparams["data"])[1]]
        if not os.path.isfile(files[0]):  # find_shards checked a glob: this is the run's own val shard
            raise ConfigError(f"the run's val shard {files[0]} is not here; give --files=GLOB")
        seq_len = s.seq_len or hparams["seq_len"]
        num_tokens = {-1: hparams["val_tokens"], 0: None}.get(s.val_tokens, s.val_tokens)
        val_batches(files, num_tokens, seq_len)  # checks the shards and the token count now
    common.init_process_group(device)
    bf16 = common.uses_bf16(s.autocast, device)
    results = []
    with common.autocast_context(device, bf16):
        for k in range(s.seeds):
            loss, tokens = common.val_nelbo(model, files, num_tokens, seq_len, VAL_NOISE_SEED + k, rank, world_size,
                                            progress=rank == 0, estimator=s.estimator, schedule=s.schedule)
            results.append(loss)
            if rank == 0 and s.seeds > 1:
                print(f"seed:{VAL_NOISE_SEED + k} val_nelbo:{loss:.4f}", flush=True)
    if world_size > 1:
        dist.destroy_process_group()
    if rank == 0:
        mean = statistics.fmean(results)
        stderr = statistics.stdev(results) / math.sqrt(len(results)) if len(results) > 1 else float("nan")
        print(f"val_nelbo:{mean:.4f} stderr:{stderr:.4f} ppl_bound:{math.exp(min(mean, 700)):.2f} seeds:{s.seeds} "
              f"tokens:{tokens} seq_len:{seq_len} autocast:{'bf16' if bf16 else 'fp32'} estimator:{s.estimator} "
              f"schedule:{s.schedule if s.estimator == 'iid' else 'none'} files:{','.join(files)}")

if __name__ == "__main__":
    main(sys.argv[1:])
