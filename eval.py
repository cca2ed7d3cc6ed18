"""The validation NELBO of a checkpoint on data by training's protocol (common.val_nelbo), for any world size:
`python eval.py --checkpoint=PATH --seeds=8` gives the mean and standard error over noise seeds (seed k is train.py's
val seed plus k: --seeds=1 reproduces the run's last val line). The last line is the result, `key:value` pairs."""

import functools, math, os, statistics, sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

import common
from common import VAL_NOISE_SEED, ConfigError
from data.loader import find_shards, train_val_paths, val_batches
from model import setting
from noise import Noise, eval_noise, position_draws
from sample import SCHEDULES, load_model

VAL_ESTIMATORS = ("iid", "exact_k")  # the val noises that come from positions alone

@dataclass
class Settings:
    checkpoint: str = setting("", "checkpoint written by train.py (required)")
    files: str = setting("", "glob of shards to evaluate on; empty: the run's val shard")
    val_tokens: int = setting(-1, "tokens, a multiple of seq_len; -1: the run's number; 0: every whole chunk")
    seq_len: int = setting(0, "tokens per chunk; 0: the run's seq_len")
    seeds: int = setting(1, "noise seeds; with more than one, the mean and its standard error")
    estimator: str = setting("exact_k", "val noise: exact_k (as train.py validates) or iid (t under --schedule)")
    schedule: str = setting("linear", "with --estimator=iid: the schedule of t (sample.SCHEDULES)")
    autocast: str = setting("auto", "auto (bf16 on CUDA and on CPUs with bf16 kernels), bf16 or fp32")
    device: str = setting("auto", "auto (cuda if available, else cpu), cpu or cuda")

def iid_noise(length: int, block_size: int, seed: int, offset: int, schedule: str) -> Noise:
    """The t-form NELBO's noise: t ~ U(0, 1) per block, each token masked with probability p(t), weight p'(t) / p(t)."""
    t, uniforms = position_draws(length, block_size, seed, offset)
    masked = uniforms < SCHEDULES[schedule].mask_prob(t)
    return Noise(torch.where(masked, SCHEDULES[schedule].weight(t), 0.0).float(), masked)

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
    results, noise_of = [], functools.partial(iid_noise, schedule=s.schedule) if s.estimator == "iid" else eval_noise
    with common.autocast_context(device, bf16):
        for k in range(s.seeds):
            loss, tokens = common.val_nelbo(model, files, num_tokens, seq_len, VAL_NOISE_SEED + k, rank, world_size,
                                            progress=rank == 0, noise_of=noise_of)
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
