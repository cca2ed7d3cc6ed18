"""
BD3-LM's data-driven clipped schedule as a study: at a checkpoint's weights, the gradient noise (grad_variance.py's
variance over signal) under each candidate interval [lo, hi] of the masking probability, and the least noisy one. A
record trains on 0.3-0.8 whatever this prints; a run may try the chosen one with --t_lo and --t_hi.

    python tools/clip_search.py --checkpoint=checkpoints/demo/final.pt

It measures on the last --tokens of the checkpoint run's train stream, which a run that stops early never trained on.
"""

import os, sys, time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import common
from data.loader import TokenStream, find_shards, train_val_paths
from model import setting
from noise import ESTIMATORS, TRAIN_ESTIMATOR
from sample import load_model
from tools.grad_variance import gradient_noise

CLIP_SEARCH_NOISE_SEED = 1  # every candidate interval draws the same uniforms

@dataclass
class Settings:
    checkpoint: str = setting("", "the weights to measure at (required)")
    train_files: str = setting("", "glob of the train shards whose tail is measured on; empty: the checkpoint run's")
    widths: str = setting("0.5,0.6,0.7,0.8,0.9,1", "widths of the candidate intervals, comma-separated")
    step: float = setting(0.05, "candidate intervals of a width start at 0, step, 2 step, ... 1 - width")
    tokens: int = setting(65_536, "tokens at the end of the train stream, a multiple of the run's seq_len")
    draws: int = setting(4, "noise draws per candidate, each a forward and backward of those tokens")
    estimator: str = setting(TRAIN_ESTIMATOR, "training noise, one of noise.ESTIMATORS")
    device: str = setting("auto", "auto (cuda if available, else cpu), cpu or cuda")

def candidates(widths: str, step: float) -> list[tuple[float, float]]:
    """bd3lms's candidates: for each width w, the intervals (lo, lo + w) for lo = 0, step, 2 step, ... to 1 - w."""
    try:
        parsed = [float(width) for width in widths.split(",")]
    except ValueError:
        raise common.ConfigError(f"--widths takes comma-separated numbers, got {widths!r}") from None
    if not all(0 < width <= 1 for width in parsed):
        raise common.ConfigError(f"--widths must lie in (0, 1], got {widths!r}")
    if not 0 < step <= 1:
        raise common.ConfigError(f"--step must lie in (0, 1], got {step}")
    intervals = [(round(k * step, 6), round(k * step + width, 6))
                 for width in parsed for k in range(int((1 - width) / step + 1e-9) + 1)]
    return list(dict.fromkeys(intervals))

def tail_chunks(pattern: str, tokens: int, seq_len: int) -> list[torch.Tensor]:
    """The last `tokens` tokens of the train stream of `pattern`, in chunks of seq_len."""
    stream = TokenStream(find_shards(pattern))
    if not 0 < tokens <= stream.num_tokens or tokens % seq_len:
        raise common.ConfigError(f"--tokens={tokens} is not a positive multiple of the run's seq_len {seq_len} "
                                 f"within the {stream.num_tokens} train tokens")
    return [torch.from_numpy(stream.read(at, at + seq_len).astype("int64"))
            for at in range(stream.num_tokens - tokens, stream.num_tokens, seq_len)]

def main(argv: list[str]) -> None:
    s = common.command_line(argv, Settings, "python tools/clip_search.py [--name=value ...]", f"\n\n{__doc__.strip()}")
    with common.user_errors():
        if s.draws < 2:
            raise common.ConfigError(f"--draws must be at least 2 (a variance), got {s.draws}")
        intervals = candidates(s.widths, s.step)
        common.check_choice("estimator", s.estimator, tuple(ESTIMATORS))
        device = common.pick_device(s.device)
        model, hp = load_model(s.checkpoint, device)
        chunks = tail_chunks(s.train_files or train_val_paths(hp["data"])[0], s.tokens, hp["seq_len"])
        with common.autocast_context(device, common.fast_bf16(device)):
            noise = {interval: gradient_noise(model, chunks, *interval, s.estimator, s.draws, CLIP_SEARCH_NOISE_SEED)
                     for interval in intervals}
    print(f"# tools/clip_search.py, {time.strftime('%Y-%m-%d')}: {s.checkpoint}, estimator {s.estimator}, "
          f"{len(chunks)} x {hp['seq_len']} tokens, {s.draws} draws per interval\n\n"
          "| interval | grad variance / signal | grad variance | loss variance | mean loss |\n|---|---|---|---|---|")
    for (lo, hi), n in noise.items():
        print(f"| {lo:g}-{hi:g} | {n.relative:.6g} | {n.variance:.4g} | {n.loss_variance:.4g} | {n.loss:.4f} |")
    lo, hi = min(noise, key=lambda interval: noise[interval].relative)
    print(f"\nchosen:{lo:g}-{hi:g} (train with --t_lo={lo:g} --t_hi={hi:g})")

if __name__ == "__main__":
    main(sys.argv[1:])
