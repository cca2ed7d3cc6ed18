"""
The noise of each training estimator: the variance of the gradient and of the loss over noise draws on the same
tokens, at the demo preset's initial weights and at a checkpoint's. noise.ESTIMATORS all estimate the records'
objective; exact_k and stratified_k (k uniform on the interval's counts, weight n / k) are here for comparison only.

    python tools/grad_variance.py --checkpoint=checkpoints/demo/final.pt
    python tools/grad_variance.py --draws=32          # initial weights only

Each draw is one forward and backward of one optimizer step's val sequences (equal compute for every estimator).
"""

import os, statistics, sys, time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import common
from data.loader import train_val_paths, val_batches
from model import BD3LM, setting
from noise import ESTIMATORS, Noise, count_noise, sequence_generator, step_noise, stratified_levels
from sample import load_model
from tools.demo_corpus import prepare_demo
from train import PRESETS, Hyperparameters, build_model, model_config

COMPARED = (*ESTIMATORS, "exact_k", "stratified_k")  # the last two do not keep the records' objective

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

def uniform_counts(block_size: int, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """noise.count_table's (bounds, weights) for k uniform on the counts with lo <= k / n <= hi at weight n / k; a
    block size without such a count gets NaN weights."""
    bounds = torch.full((block_size, block_size), 2.0, dtype=torch.float64)
    weights = torch.zeros(block_size, block_size, dtype=torch.float64)
    for n in range(1, block_size + 1):
        k = torch.arange(1, n + 1, dtype=torch.float64)
        allowed = (k >= lo * n - 1e-6) & (k <= hi * n + 1e-6)
        bounds[n - 1, : n - 1] = (allowed / allowed.sum().clamp(min=1)).cumsum(0)[:-1]
        weights[n - 1, :n] = n / k if allowed.any() else torch.nan
    return bounds, weights

def sequence_noise(length: int, block_size: int, lo: float, hi: float, seed: int, step: int, chunk: int, chunks: int,
                   estimator: str) -> Noise:
    """noise.step_noise, or for exact_k and stratified_k uniform_counts' draw with independent or stratified levels."""
    if estimator in ESTIMATORS:
        return step_noise(length, block_size, lo, hi, seed, step, chunk, chunks, estimator=estimator)
    uniforms = torch.rand(2, length, generator=sequence_generator(seed, step, chunk, chunks))
    block = torch.arange(length) // block_size
    levels = stratified_levels(seed, step, chunk, chunks, int(block[-1]) + 1)[block] \
        if estimator == "stratified_k" else uniforms[0, block * block_size]
    return count_noise(*uniform_counts(block_size, lo, hi), levels, uniforms[1], block_size)

def gradient_noise(model: BD3LM, chunks: list[torch.Tensor], lo: float, hi: float, estimator: str, draws: int,
                   seed: int) -> GradientNoise:
    """The gradient of the mean loss over `chunks` (one step's sequences) under `draws` draws of `estimator` on
    [lo, hi]; draw d of chunk i is sequence i of step d, so every estimator and interval reuses the same seeds."""
    device, config, params = model.head.weight.device, model.config, list(model.parameters())
    grad_sum = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=device)
    squares, losses = 0.0, []
    for draw in range(draws):
        model.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for index, tokens in enumerate(chunks):
            noise = sequence_noise(tokens.numel(), config.block_size, lo, hi, seed, draw, index, len(chunks), estimator)
            tokens, noise = common.to_device(tokens[None], Noise(*(x[None] for x in noise)), device, config.vocab_size)
            loss = model(tokens, noise) / len(chunks)
            loss.backward()
            loss_sum += float(loss.detach())
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double() for p in params])
        grad_sum += grad
        squares += float(grad.square().sum())
        losses.append(loss_sum)
    model.zero_grad(set_to_none=True)  # dropped, as training expects between steps
    mean_square = float((grad_sum / draws).square().sum())
    variance = (squares / draws - mean_square) * draws / (draws - 1)
    signal = mean_square - variance / draws
    return GradientNoise(variance / signal if signal > 0 else float("inf"), variance, signal,
                         statistics.variance(losses), statistics.fmean(losses))

def estimator_noise(model: BD3LM, chunks: list[torch.Tensor], lo: float, hi: float, draws: int,
                    seed: int = 0) -> dict[str, GradientNoise]:
    return {name: gradient_noise(model, chunks, lo, hi, name, draws, seed) for name in COMPARED}

def grad_variance_table(checkpoint: str, initial: bool, draws: int, seed: int, device: torch.device) -> None:
    """One row per weights (the demo preset's initial ones; the checkpoint's) and estimator."""
    cases, demo = [], Hyperparameters(**PRESETS["demo"])
    if initial:
        prepare_demo()
        cases.append(("initial (demo preset)", build_model(model_config(demo), 0, device), asdict(demo)))
    if checkpoint:
        cases.append((checkpoint, *load_model(checkpoint, device)))
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
