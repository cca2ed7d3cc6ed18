"""
What a checkpoint is worth on data: the validation NELBO, by the protocol of training's validation
(common.val_nelbo), whose result does not depend on the world size.

    python eval.py --checkpoint=checkpoints/demo/final.pt                      # what the run's last val line says
    python eval.py --checkpoint=PATH --seeds=8                                 # mean and standard error over noise
    python eval.py --checkpoint=PATH --seeds=8 --estimator=iid                 # the same NELBO, noisier
    python eval.py --checkpoint=PATH --files='data/mine/mine_val_*.bin' --val_tokens=0
    torchrun --standalone --nproc_per_node=8 eval.py --checkpoint=PATH         # the same number, faster

Seed k of `--seeds=K` is train.py's val seed plus k, so `--seeds=1` reproduces the run's last val line. The quality
of samples under a judge is tools/sample_quality.py's. The last line is the result, `key:value` pairs a script can
parse.
"""

import math
import os
import statistics
import sys
from dataclasses import dataclass

import torch.distributed as dist

import common
from common import VAL_NOISE_SEED, ConfigError, load_model
from data.loader import find_shards, train_val_paths, val_batches
from model import BD3LM, SCHEDULES, VAL_ESTIMATORS, setting


@dataclass
class Settings:
    checkpoint: str = setting("", "checkpoint written by train.py (required)")
    files: str = setting("", "glob of shards to evaluate on; empty: the run's val shard")
    val_tokens: int = setting(-1, "tokens, a multiple of seq_len; -1: the run's number; 0: every whole chunk")
    seq_len: int = setting(0, "tokens per chunk; 0: the run's seq_len")
    seeds: int = setting(1, "noise seeds; with more than one, the mean and its standard error")
    estimator: str = setting(common.VAL_ESTIMATOR, "the val noise, exact_k (k masked tokens a block, k "
                             "uniform on 1..16, weight 16 / k; training's validation) or iid (t ~ U(0, 1) a block "
                             "under --schedule, weight 1 / t); both estimate the same NELBO, with their own variance")
    schedule: str = setting("linear", "with --estimator=iid: the schedule of t (model.SCHEDULES)")
    autocast: str = setting("auto", "auto (bf16 on CUDA and on CPUs with bf16 kernels), bf16 or fp32")
    device: str = setting("auto", "auto (cuda if available, else cpu), cpu or cuda")


def check_settings(s: Settings) -> None:
    if s.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {s.seeds}")
    common.check_choice("estimator", s.estimator, VAL_ESTIMATORS)
    common.check_choice("schedule", s.schedule, tuple(SCHEDULES))
    if s.schedule != "linear" and s.estimator != "iid":
        raise ConfigError(f"--schedule applies to --estimator=iid only: {s.estimator} masks a number of tokens, "
                          f"no schedule enters")
    if s.val_tokens < -1 or s.seq_len < 0:
        raise ConfigError(f"--val_tokens must be -1, 0 or positive and --seq_len 0 or positive, got "
                            f"{s.val_tokens} and {s.seq_len}")
    common.check_choice("autocast", s.autocast, ("auto", "bf16", "fp32"))


# -----------------------------------------------------------------------------
# Command line


def main(argv: list[str]) -> None:
    s = common.command_line(argv, Settings, "python eval.py --checkpoint=PATH [--name=value ...]")
    rank, world_size = common.ranks()
    with common.user_errors():
        check_settings(s)
        device = common.pick_device(s.device)
        model, hparams = load_model(s.checkpoint, device)
        val_file = train_val_paths(hparams["data"])[1]
        if not s.files and not os.path.isfile(val_file):
            raise ConfigError(f"the run's val shard {val_file} is not here; give --files=GLOB")
        files = find_shards(s.files) if s.files else [val_file]
        seq_len = s.seq_len or hparams["seq_len"]
        num_tokens = {-1: hparams["val_tokens"], 0: None}.get(s.val_tokens, s.val_tokens)
        val_batches(files, num_tokens, seq_len)  # checks the shards and the token count now
    report_nelbo(model, files, num_tokens, seq_len, s, device, rank, world_size)


def report_nelbo(model: BD3LM, files, num_tokens, seq_len: int, s: Settings, device, rank: int, world_size: int):
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
              f"tokens:{tokens} seq_len:{seq_len} autocast:{'bf16' if bf16 else 'fp32'} "
              f"estimator:{s.estimator} schedule:{s.schedule if s.estimator == 'iid' else 'none'} "
              f"files:{','.join(files)}")


if __name__ == "__main__":
    main(sys.argv[1:])
