"""
Generate text from a trained BD3-LM checkpoint, block by block.

    python sample.py --checkpoint=checkpoints/<run_id>/final.pt --prompt="The history of" --max_new_tokens=256

Prompt and new text are one sequence cut into blocks, as in training. Each new block starts as [MASK] (or the
prompt's tail) and a sampler of SAMPLERS denoises it in a few steps; the finished block enters the KV cache, so a
step costs one forward of one block. Past `--context` tokens the window slides by half a context and the cache is
re-encoded from it. `--kv_cache=False` recomputes the window every step: the slow reference, with the same logits
up to float rounding. `generate` knows the model and the samplers, not tokenizers or files; `main` is the CLI.
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

import common
from common import ConfigError
from data.tokenizer import get_tokenizer
from model import BD3LM, SCHEDULES, Schedule, setting

MASK_GLYPH = "░"
SHOWN_BLOCKS = 4  # of the denoising display: a screenful
WIDTH = 80  # of the terminal the denoising display fits


@dataclass
class Settings:
    checkpoint: str = setting("", "checkpoint written by train.py (required)")
    prompt: str = setting("", "text to continue (an <|endoftext|> in it ends a document there: do not start "
                                  "with one); empty: a new document")
    prompt_file: str = setting("", "read the prompt from this file instead")
    num_samples: int = setting(3, "samples generated together as one batch")
    max_new_tokens: int = setting(256, "tokens to generate after the prompt (fewer if every sample ends early)")
    min_new_tokens: int = setting(64, "no <|endoftext|> among the first this many new tokens (probability 0)")
    context: int = setting(0, "tokens one forward sees, a multiple of the block size; 0: the training seq_len")
    stop_at_eot: bool = setting(True, "end a sample at its first <|endoftext|>; False: go on into new documents, "
                                      "exactly max_new_tokens")
    sampler: str = setting("ddpm", "ddpm (ancestral), first_hitting (one token per step) or confidence (SAMPLERS)")
    schedule: str = setting("linear", "ddpm: the masking schedule of its steps (model.SCHEDULES)")
    steps_per_block: int = setting(16, "ddpm: denoising steps per block (steps that unmask nothing cost nothing)")
    threshold: float = setting(0.9, "confidence: commit every token whose top probability reaches this (>= 1 per step)")
    temperature: float = setting(1.0, "divides the logits before drawing; 0 takes the most likely token")
    top_p: float = setting(1.0, "nucleus: draw from the smallest set of tokens holding this much probability")
    seed: int = setting(0, "seed of the one generator all random draws come from")
    kv_cache: bool = setting(True, "False: recompute the whole context at every step (slow reference)")
    show_denoising: bool = setting(True, f"print how the first {SHOWN_BLOCKS} blocks of sample 0 fill in, step by step")
    device: str = setting("auto", "auto (cuda if available, else cpu), cpu or cuda")


def check_settings(s: Settings) -> None:
    common.check_choice("sampler", s.sampler, tuple(SAMPLERS))
    common.check_choice("schedule", s.schedule, tuple(SCHEDULES))
    if s.schedule != "linear" and s.sampler != "ddpm":
        raise ConfigError(f"--schedule applies to --sampler=ddpm only: {s.sampler} takes no steps of a schedule")
    for name, valid, rule in [("num_samples", s.num_samples >= 1, "be at least 1"),
                              ("max_new_tokens", s.max_new_tokens >= 1, "be at least 1"),
                              ("min_new_tokens", s.min_new_tokens >= 0, "not be negative"),
                              ("steps_per_block", s.steps_per_block >= 1, "be at least 1"),
                              ("context", s.context >= 0, "be 0 (the training seq_len) or positive"),
                              ("threshold", 0 <= s.threshold <= 1, "lie in [0, 1]"),
                              ("top_p", 0 < s.top_p <= 1, "lie in (0, 1]"),
                              ("temperature", s.temperature >= 0, "not be negative"),
                              ("seed", 0 <= s.seed < 2**63, "lie in [0, 2**63)")]:
        if not valid:
            raise ConfigError(f"--{name} must {rule}, got {getattr(s, name)}")
    if s.prompt and s.prompt_file:
        raise ConfigError("give --prompt or --prompt_file, not both")


# -----------------------------------------------------------------------------
# Samplers: each chooses which masked positions [N, n] of a block to commit at step `step` (from 0) given the
# block's logits [N, n, V]; denoise_block draws the committed tokens. A new sampler is a function and an entry.


def ddpm(step: int, masked: Tensor, logits: Tensor, s: Settings, schedule: Schedule, generator) -> Tensor:
    """Ancestral step from time t to the next, s: a masked token is revealed with probability (p(t) - p(s)) / p(t)."""
    t, t_next = 1 - step / s.steps_per_block, 1 - (step + 1) / s.steps_per_block
    u = torch.rand(masked.shape, generator=generator, device=generator.device).to(masked.device)
    return masked & (u < schedule.unmask_prob(t, t_next))


def first_hitting(step: int, masked: Tensor, logits: Tensor, s: Settings, schedule: Schedule, generator) -> Tensor:
    """One uniformly chosen masked token per step (Zheng et al.; our model takes no time, so no hitting times)."""
    scores = torch.rand(masked.shape, generator=generator, device=generator.device).to(masked.device)
    return best_of(scores, masked)


def confidence(step: int, masked: Tensor, logits: Tensor, s: Settings, schedule: Schedule, generator) -> Tensor:
    """Every masked token whose top probability (before temperature and top-p) reaches s.threshold; at least one."""
    scores = (logits.amax(-1) - logits.logsumexp(-1)).exp()
    return best_of(scores, masked) | (masked & (scores >= s.threshold))


def best_of(scores: Tensor, masked: Tensor) -> Tensor:
    """The masked position of highest score in each row."""
    best = scores.masked_fill(~masked, -1).argmax(-1, keepdim=True)
    return torch.zeros_like(masked).scatter_(-1, best, True) & masked


@dataclass(frozen=True)
class Sampler:
    choose: Callable[..., Tensor]
    knob: str = ""  # the Settings field it reads, if any
    sweep: tuple = ()  # the knob's values that tools/sample_quality.py --sweep tries, one token a forward to many


SAMPLERS = {
    "first_hitting": Sampler(first_hitting),
    "ddpm": Sampler(ddpm, "steps_per_block", (16, 8, 4, 2, 1)),
    "confidence": Sampler(confidence, "threshold", (0.9, 0.7, 0.5, 0.3, 0.1)),
}


# -----------------------------------------------------------------------------
# Denoising and generation


def token_distribution(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """Probabilities [..., V] to draw from, in float64 so that this step adds no rounding to the logits'."""
    if temperature == 0:
        return torch.zeros_like(logits, dtype=torch.float64).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    probs = torch.softmax(logits.double() / temperature, -1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        kept = sorted_probs.cumsum(-1) - sorted_probs < top_p  # mass before a token below top_p; keeps the top one
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * kept)
    return probs / probs.sum(-1, keepdim=True)


def draw(cdf: Tensor, generator: torch.Generator) -> Tensor:
    """One token per position by inverting the cumulative distribution with one uniform number each."""
    u = torch.rand(cdf.shape[:-1], generator=generator, dtype=torch.float64, device=generator.device)
    u = (u.to(cdf.device) * cdf[..., -1])[..., None]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.size(-1) - 1)


def denoise_block(block: Tensor, block_logits, s: Settings, mask_id: int, schedule_name: str, generator,
                  on_step=None) -> tuple[Tensor, Tensor]:
    """Fill every [MASK] of `block` [N, n] (`block_logits` runs the model; a step that commits nothing reuses the
    logits). Returns the block and the forwards of its rows one at a time (a row counts one only if it changed)."""
    masked, logits, step = block == mask_id, None, 0
    choose, schedule = SAMPLERS[s.sampler].choose, SCHEDULES[schedule_name]
    changed, row_forwards = masked.any(-1), torch.zeros((), dtype=torch.long, device=block.device)
    while masked.any():
        if logits is None:
            logits = block_logits(block)
            row_forwards += changed.sum()
        commit = choose(step, masked, logits, s, schedule, generator)
        if commit.any():
            cdf = token_distribution(logits[commit], s.temperature, s.top_p).cumsum_(-1)
            block = block.masked_scatter(commit, draw(cdf, generator))
            masked, logits = masked & ~commit, None
            changed = commit.any(-1) & masked.any(-1)
            if on_step:
                on_step(block)
        step += 1
    return block, row_forwards


@dataclass
class Stats:
    new_tokens: int = 0  # generated positions per sample
    forwards: int = 0  # denoising forward passes (NFE), each over the whole batch
    row_forwards: int = 0  # forwards summed over the rows that needed them: the NFE of the rows one at a time
    cache_appends: int = 0  # forward passes that put finished clean tokens into the KV cache
    seconds: float = 0.0


def check_context(context: int, block_size: int) -> None:
    if context < block_size or context % block_size:
        raise ConfigError(f"--context must be a positive multiple of the block size {block_size}, got {context}")


def window_start(begin: int, block_size: int, context: int) -> int:
    """Start of the clean context of the block at `begin`: at most context - block_size back, in steps of half a
    context, so the KV cache is re-encoded once per half window, not per block."""
    stride = max(block_size, context // 2 // block_size * block_size)
    return max(0, -(-(begin + block_size - context) // stride) * stride)


@torch.no_grad()
def generate(model: BD3LM, prompt: list[int], s: Settings, generator: torch.Generator, on_step=None,
             progress: bool = False) -> tuple[Tensor, Stats]:
    """Continue `prompt` (token ids, possibly none) in s.num_samples rows at once: the tokens [N, len(prompt) +
    generated] and stats. `on_step(block_index, block)` sees each block after every step that changed it."""
    cfg, device = model.config, model.head.weight.device
    total = len(prompt) + s.max_new_tokens
    context = s.context or -(-total // cfg.block_size) * cfg.block_size  # 0: the whole text in one window
    check_context(context, cfg.block_size)
    start_time, stats = time.perf_counter(), Stats()
    tokens = torch.full((s.num_samples, total), cfg.mask_id, device=device)
    tokens[:, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
    starts = range(len(prompt) - len(prompt) % cfg.block_size, total, cfg.block_size)  # the first has the prompt's tail
    cache, bar = None, tqdm(total=len(starts), unit="block", disable=not progress)
    for index, begin in enumerate(starts):
        end, window = min(begin + cfg.block_size, total), window_start(begin, cfg.block_size, context)
        if s.kv_cache and (cache is None or cache.start != window):  # (re-)encode the window's clean tokens
            cache = model.new_cache(s.num_samples, context, start=window)
            if begin > window:
                model.cache_append(cache, tokens[:, window:begin])
                stats.cache_appends += 1

        def block_logits(block: Tensor) -> Tensor:
            stats.forwards += 1
            if cache:
                logits = model.cache_logits(cache, block)
            else:
                history = torch.cat([tokens[:, window:begin], block], 1)  # clean context in both halves, noisy in x_t
                logits = model.logits(history, history)[:, begin - window:]
            early = torch.arange(begin, end, device=device) < len(prompt) + s.min_new_tokens
            logits[:, early, cfg.eot_id] = float("-inf")
            return logits

        show = (lambda block: on_step(index, block)) if on_step else None
        tokens[:, begin:end], row_forwards = denoise_block(tokens[:, begin:end], block_logits, s, cfg.mask_id,
                                                           s.schedule, generator, show)
        stats.row_forwards += int(row_forwards)
        bar.update()
        ended = s.stop_at_eot and (tokens[:, len(prompt):end] == cfg.eot_id).any(-1).all()
        if end == total or ended:
            tokens = tokens[:, :end]
            break
        if cache and window_start(end, cfg.block_size, context) == window:
            model.cache_append(cache, tokens[:, begin:end])
            stats.cache_appends += 1
    bar.close()
    common.synchronize(device)
    stats.new_tokens, stats.seconds = tokens.size(1) - len(prompt), time.perf_counter() - start_time
    return tokens, stats


def completions(tokens: Tensor, prompt_length: int, eot: int) -> list[list[int]]:
    """Each row's generated tokens as a reader gets them: cut before its first <|endoftext|>."""
    return [row[: row.index(eot)] if eot in row else row for row in tokens[:, prompt_length:].tolist()]


# -----------------------------------------------------------------------------
# Command line


def describe(row: int, generated: list[int], completion: list[int], s: Settings) -> tuple[str, list[int]]:
    """A sample's header line (length, why it ended) and the tokens to print (its completion if s.stop_at_eot)."""
    if s.stop_at_eot and len(completion) < len(generated):
        return f"---- sample {row}: {len(completion)} tokens, ended at <|endoftext|> ----", completion
    return f"---- sample {row}: {len(generated)} tokens, stopped at --max_new_tokens={s.max_new_tokens} ----", generated


def load(s: Settings) -> tuple[BD3LM, dict, list[int]]:
    """The checkpoint's model on s.device, its run's settings and the prompt's ids; a context of 0 becomes the
    training seq_len."""
    model, hparams = common.load_model(s.checkpoint, common.pick_device(s.device))
    s.context = s.context or hparams["seq_len"]
    check_context(s.context, model.config.block_size)
    return model, hparams, read_prompt(s)


def read_prompt(s: Settings) -> list[int]:
    """The token ids of --prompt or --prompt_file (which then replaces s.prompt)."""
    if s.prompt_file:
        if not os.path.isfile(s.prompt_file):
            raise ConfigError(f"prompt file {s.prompt_file!r} does not exist")
        with open(s.prompt_file) as f:
            s.prompt = f.read()
    return get_tokenizer().encode(s.prompt, allowed_special={"<|endoftext|>"})


class DenoisingDisplay:
    """generate's on_step: the first SHOWN_BLOCKS blocks of sample 0 before any step and after each that changed
    them, wrapped to WIDTH."""

    def __init__(self, tokenizer, prompt: list[int], config):
        self.tokenizer, self.prompt, self.config, self.shown = tokenizer, prompt, config, -1
        self.first_begin = len(prompt) - len(prompt) % config.block_size

    def __call__(self, index: int, block: Tensor) -> None:
        if index >= SHOWN_BLOCKS:
            return
        if index != self.shown:
            if index == 0:
                tqdm.write(f"---- sample 0 denoised block by block ({MASK_GLYPH} = [MASK]), its first "
                           f"{SHOWN_BLOCKS} blocks ----")
            begin = self.first_begin + index * self.config.block_size
            before = [self.prompt[i] if i < len(self.prompt) else self.config.mask_id
                      for i in range(begin, begin + block.size(1))]
            self.shown, self.step = index, 0
            self.write(before)
        if block[0].tolist() != self.last:  # the step may have changed only the other samples
            self.step += 1
            self.write(block[0].tolist())

    def write(self, ids: list[int]) -> None:
        self.last = ids
        text = "".join(MASK_GLYPH if i == self.config.mask_id else self.tokenizer.decode([i]) for i in ids)
        text = text.replace("\n", "⏎").replace("\t", " ")
        label = f"block {self.shown} step {self.step:2d} | "
        width = WIDTH - len(label)
        lines = [text[i:i + width] for i in range(0, len(text), width)] or [""]
        tqdm.write("\n".join(f"{label if n == 0 else ' ' * len(label)}{line}" for n, line in enumerate(lines)))


def main(argv: list[str]) -> None:
    s = common.command_line(argv, Settings, "python sample.py --checkpoint=PATH [--name=value ...]")
    with common.user_errors():
        check_settings(s)
        model, hparams, prompt = load(s)
        device = model.head.weight.device
        if s.context > hparams["seq_len"]:
            print(f"warning: --context={s.context} is longer than the {hparams['seq_len']} tokens this model was "
                  f"trained on; predictions that look further back may degrade", file=sys.stderr)
    tokenizer = get_tokenizer()
    display = DenoisingDisplay(tokenizer, prompt, model.config) if s.show_denoising else None
    tokens, stats = generate(model, prompt, s, torch.Generator(device).manual_seed(s.seed), on_step=display,
                             progress=True)
    documents = completions(tokens, len(prompt), model.config.eot_id)
    for row, (generated, completion) in enumerate(zip(tokens[:, len(prompt):].tolist(), documents)):
        header, shown = describe(row, generated, completion, s)
        print(f"{header}\n{s.prompt}{tokenizer.decode(shown)}")
    total = s.num_samples * stats.new_tokens
    print(f"---- {s.num_samples} x {stats.new_tokens} tokens in {stats.seconds:.2f}s: {total / stats.seconds:.1f} "
          f"tokens/s, NFE/token {stats.forwards / stats.new_tokens:.3f} (one sample at a time "
          f"{stats.row_forwards / total:.3f}; {stats.forwards} forwards + "
          f"{stats.cache_appends} cache appends, sampler {s.sampler}, kv_cache {s.kv_cache}, context {s.context}, "
          f"peak memory {common.peak_memory_mib(device)} MiB)")


if __name__ == "__main__":
    main(sys.argv[1:])
