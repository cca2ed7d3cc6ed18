"""
The noise of each training estimator: the variance of the gradient and of the loss over noise draws on the same
tokens, at the demo preset's initial weights and at a checkpoint's. train.py's estimators (model.ESTIMATORS) all
estimate the records' objective; exact_k and stratified_k (k uniform on the interval's counts, weight 16 / k) are
here for comparison only: their expectation is another weighting of the L_k.

    python tools/grad_variance.py --checkpoint=checkpoints/demo/final.pt
    python tools/grad_variance.py --draws=32          # initial weights only

Each draw is one forward and backward of one optimizer step's sequences of the val text (equal compute for every
estimator); the variances are unbiased over the draws.
"""

import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch

import common
from data.loader import train_val_paths, val_batches
from model import BD3LM, ESTIMATORS, CountTable, Estimator, Noise, count_table, setting, step_noise
from tools.demo_corpus import prepare_demo
from train import PRESETS, Hyperparameters, build_model, model_config


def uniform_counts(block_size: int, lo: float, hi: float) -> CountTable:
    """k uniform on the counts k >= 1 with lo <= k / n <= hi, weight n / k: exact_k's draw on [lo, hi]. A block size
    without such a count gets NaN weights (the sequences here are whole blocks of block_size)."""
    def allowed(n: int) -> torch.Tensor:
        k = torch.arange(1, n + 1, dtype=torch.float64)
        return (k >= lo * n - 1e-6) & (k <= hi * n + 1e-6)

    def weight(n: int) -> torch.Tensor:
        return n / torch.arange(1, n + 1, dtype=torch.float64) if allowed(n).any() else torch.full((n,), math.nan)

    return count_table(block_size, lambda n: allowed(n) / allowed(n).sum().clamp(min=1), weight)


# train.py's estimators, then two whose expectation is not the records' objective
COMPARED = {
    **ESTIMATORS,
    "exact_k": Estimator(count_table=uniform_counts, stratified=False),
    "stratified_k": Estimator(count_table=uniform_counts, stratified=True),
}


@dataclass
class Settings:
    checkpoint: str = setting("", "measure at this checkpoint's weights, on its run's val text and interval")
    initial: bool = setting(True, "measure at the demo preset's initial weights (seed 0), on the demo's val text")
    draws: int = setting(16, "noise draws per estimator and weights")
    seed: int = setting(0, "seed of the noise draws")
    device: str = setting("auto", "auto (cuda if available, else cpu), cpu or cuda")


class GradientNoise(NamedTuple):
    relative: float  # variance / signal: the noise-to-signal ratio of one draw's gradient
    variance: float  # total variance of the gradient: E ||g - E g||^2, unbiased over the draws
    signal: float  # ||E g||^2, unbiased: ||mean g||^2 - variance / draws
    loss_variance: float  # the variance of the loss itself over the draws
    loss: float  # the mean loss over the draws


def gradient_noise(model: BD3LM, chunks: list[torch.Tensor], lo: float, hi: float, estimator: str | Estimator,
                   draws: int, seed: int) -> GradientNoise:
    """The gradient of the mean training loss over `chunks` (one optimizer step's sequences) under `draws` noise
    draws of `estimator` on [lo, hi]. Draw d of chunk i is train.py's noise of sequence i of step d, so every
    estimator and interval reuses the same uniforms. The gradients are dropped at the end."""
    device, config, params = model.head.weight.device, model.config, list(model.parameters())
    grad_sum = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=device)
    squares, losses = 0.0, []
    for draw in range(draws):
        model.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for index, tokens in enumerate(chunks):
            noise = step_noise(tokens.numel(), config.block_size, lo, hi, seed, draw, index, len(chunks),
                               estimator=estimator)
            tokens, noise = common.to_device(tokens[None], Noise(*(x[None] for x in noise)), device, config.vocab_size)
            loss = model(tokens, noise) / len(chunks)
            loss.backward()
            loss_sum += float(loss.detach())
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double() for p in params])
        grad_sum += grad
        squares += float(grad.square().sum())
        losses.append(loss_sum)
    model.zero_grad(set_to_none=True)
    mean_square = float((grad_sum / draws).square().sum())
    variance = (squares / draws - mean_square) * draws / (draws - 1)
    signal = mean_square - variance / draws
    return GradientNoise(variance / signal if signal > 0 else float("inf"), variance, signal,
                         statistics.variance(losses), statistics.fmean(losses))


def estimator_noise(model: BD3LM, chunks: list[torch.Tensor], lo: float, hi: float, draws: int,
                    seed: int = 0) -> dict[str, GradientNoise]:
    """gradient_noise of every estimator of COMPARED on the same chunks and interval: equal compute."""
    return {name: gradient_noise(model, chunks, lo, hi, rule, draws, seed) for name, rule in COMPARED.items()}


def grad_variance_table(checkpoint: str, initial: bool, draws: int, seed: int, device: torch.device) -> None:
    """One row per weights (the demo preset's initial ones; the checkpoint's) and estimator."""
    cases = []
    if initial:
        demo = Hyperparameters(**PRESETS["demo"])
        prepare_demo()
        cases.append(("initial (demo preset)", build_model(model_config(demo), 0, device), asdict(demo)))
    if checkpoint:
        cases.append((checkpoint, *common.load_model(checkpoint, device)))
    print(f"\n## Noise of the training estimators: {draws} draws each of one step's val tokens (variances unbiased "
          f"over the draws; relative: E||g - Eg||^2 / ||Eg||^2)\n\n| weights | estimator | records' objective | "
          "interval | tokens | grad variance / signal | grad variance | loss variance | mean loss |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for label, model, hp in cases:
        val_file = train_val_paths(hp["data"])[1]
        chunks = [tokens for _, tokens in val_batches(val_file, hp["batch_size"] * hp["seq_len"], hp["seq_len"])]
        with common.autocast_context(device, common.fast_bf16(device)):
            noise = estimator_noise(model, chunks, hp["t_lo"], hp["t_hi"], draws, seed)
        for name, n in noise.items():
            print(f"| {label} | {name} | {'yes' if name in ESTIMATORS else 'no'} | {hp['t_lo']:g}-{hp['t_hi']:g} | "
                  f"{len(chunks)} x {hp['seq_len']} | {n.relative:.4g} | {n.variance:.4g} | {n.loss_variance:.4g} | "
                  f"{n.loss:.4f} |")


def main(argv: list[str]) -> None:
    s = common.command_line(argv, Settings, "python tools/grad_variance.py [--name=value ...]",
                            f"\n\n{__doc__.strip()}")
    with common.user_errors():
        if not (s.checkpoint or s.initial):
            raise common.ConfigError("nothing to measure: give --checkpoint or leave --initial=True")
        if s.draws < 2:
            raise common.ConfigError(f"--draws must be at least 2 (a variance), got {s.draws}")
        if s.checkpoint and not os.path.isfile(s.checkpoint):
            raise common.ConfigError(f"--checkpoint={s.checkpoint} is not a file")
        device = common.pick_device(s.device)
    print(f"# tools/grad_variance.py, {time.strftime('%Y-%m-%d')}")
    grad_variance_table(s.checkpoint, s.initial, s.draws, s.seed, device)


if __name__ == "__main__":
    main(sys.argv[1:])
