"""Generate text from a trained BD3-LM checkpoint, block by block: a sampler of SAMPLERS denoises each new block from
[MASK], then the block enters the KV cache (docs/sampling.md). `generate` knows the model and the samplers, not
tokenizers or files; `main` is the CLI: python sample.py --checkpoint=checkpoints/<run_id>/final.pt --prompt="The"
"""

import math, sys, time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

import common
from data.tokenizer import get_tokenizer
from model import BD3LM, ModelConfig, document_layout, mask_rule, setting

MASK_GLYPH = "░"
SHOWN_BLOCKS = 4  # of the denoising display: a screenful
WIDTH = 80  # of the terminal the denoising display fits

@dataclass
class Settings:
    checkpoint: str = setting("", "checkpoint written by train.py (required)")
    prompt: str = setting("", "text to continue (an <|endoftext|> in it ends a document there); empty: a new document")
    prompt_file: str = setting("", "read the prompt from this file instead")
    num_samples: int = setting(3, "samples generated together as one batch")
    max_new_tokens: int = setting(256, "tokens to generate after the prompt (fewer if every sample ends early)")
    min_new_tokens: int = setting(64, "no <|endoftext|> among the first this many new tokens (probability 0)")
    context: int = setting(0, "tokens one forward sees, a multiple of the block size; 0: the training seq_len")
    stop_at_eot: bool = setting(True, "end a sample at its first <|endoftext|>; False: exactly max_new_tokens")
    sampler: str = setting("ddpm", "ddpm (ancestral), first_hitting (one token per step) or confidence (SAMPLERS)")
    schedule: str = setting("linear", "ddpm: the masking schedule of its steps (SCHEDULES)")
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
        raise common.ConfigError(f"--schedule applies to --sampler=ddpm only: {s.sampler} takes no steps of a schedule")
    if s.prompt and s.prompt_file:
        raise common.ConfigError("give --prompt or --prompt_file, not both")
    for name, valid, rule in [("num_samples", s.num_samples >= 1, "be at least 1"),
                              ("max_new_tokens", s.max_new_tokens >= 1, "be at least 1"),
                              ("min_new_tokens", s.min_new_tokens >= 0, "not be negative"),
                              ("steps_per_block", s.steps_per_block >= 1, "be at least 1"),
                              ("context", s.context >= 0, "be 0 (the training seq_len) or positive"),
                              ("threshold", 0 <= s.threshold <= 1, "lie in [0, 1]"),
                              ("top_p", 0 < s.top_p <= 1, "lie in (0, 1]"),
                              ("temperature", s.temperature >= 0, "not be negative"),
                              ("seed", 0 <= s.seed < 2**32, "lie in [0, 2**32)")]:
        if not valid:
            raise common.ConfigError(f"--{name} must {rule}, got {getattr(s, name)}")

# -----------------------------------------------------------------------------
# Masking schedules of the ddpm sampler

class Schedule(NamedTuple):
    """p(t), the chance a token is [MASK] at time t (p(0) = 0, p(1) = 1), and p'(t) / p(t), a masked token's CE weight
    in the t-form NELBO (eval.py --estimator=iid). With t ~ U(0, 1) every schedule has the same expected NELBO."""
    mask_prob: Callable[[Tensor], Tensor]
    weight: Callable[[Tensor], Tensor]

SCHEDULES = {
    "linear": Schedule(lambda t: t, lambda t: 1 / t),
    # alpha_t = cos^2(pi t / 2): nano-dlm's cosine without its offset, so that p(0) = 0 and the NELBO stays exact
    "cosine": Schedule(lambda t: torch.sin(math.pi / 2 * t).square(),
                       lambda t: (math.pi / torch.tan(math.pi / 2 * t)).clamp(min=0)),
    "sqrt": Schedule(lambda t: t.sqrt(), lambda t: 0.5 / t),
}

# Samplers: each chooses which masked positions [N, n] of a block to commit at step `step` (from 0) given the
# block's logits [N, n, V]; denoise_block draws the committed tokens. A new sampler is a function and an entry.

def ddpm(step: int, masked: Tensor, logits: Tensor, s: Settings, generator) -> Tensor:
    """Ancestral step from time t to the next, r: a masked token is revealed with probability (p(t) - p(r)) / p(t)."""
    times = 1 - torch.tensor([step, step + 1], dtype=torch.float64) / s.steps_per_block
    p_t, p_r = SCHEDULES[s.schedule].mask_prob(times)
    u = torch.rand(masked.shape, generator=generator, device=generator.device).to(masked.device)
    return masked & (u < float((p_t - p_r) / p_t))

def first_hitting(step: int, masked: Tensor, logits: Tensor, s: Settings, generator) -> Tensor:
    """One uniformly chosen masked token per step (Zheng et al.; our model takes no time, so no hitting times)."""
    scores = torch.rand(masked.shape, generator=generator, device=generator.device).to(masked.device)
    return best_of(scores, masked)

def confidence(step: int, masked: Tensor, logits: Tensor, s: Settings, generator) -> Tensor:
    """Every masked token whose top probability (before temperature and top-p) reaches s.threshold; at least one."""
    scores = (logits.amax(-1) - logits.logsumexp(-1)).exp()
    return best_of(scores, masked) | (masked & (scores >= s.threshold))

def best_of(scores: Tensor, masked: Tensor) -> Tensor:
    """The masked position of highest score in each row."""
    best = scores.masked_fill(~masked, -1).argmax(-1, keepdim=True)
    return torch.zeros_like(masked).scatter_(-1, best, True) & masked

class Sampler(NamedTuple):
    choose: Callable[..., Tensor]
    knob: str = ""  # the Settings field it reads, if any
    sweep: tuple = ()  # the knob's values that tools/sample_quality.py --sweep tries, one token a forward to many

SAMPLERS = {
    "first_hitting": Sampler(first_hitting),
    "ddpm": Sampler(ddpm, "steps_per_block", (16, 8, 4, 2, 1)),
    "confidence": Sampler(confidence, "threshold", (0.9, 0.7, 0.5, 0.3, 0.1)),
}

# -----------------------------------------------------------------------------
# The KV cache of clean tokens: a denoising step runs one noisy block after it, under the training mask

@dataclass
class KVCache:
    """Keys and values of clean tokens, per layer [N, H, max_len, D], and the tokens; slot 0 is at position `start`."""
    keys: list[Tensor]
    values: list[Tensor]
    tokens: Tensor  # [N, max_len]
    length: int = 0
    start: int = 0

def new_cache(model: BD3LM, batch_size: int, max_len: int, start: int = 0) -> KVCache:
    """An empty cache for `max_len` clean tokens from sequence position `start` (a multiple of the block size)."""
    cfg, param = model.config, model.head.weight
    if start % cfg.block_size:
        raise ValueError(f"a cache must start on a block boundary, not at {start} (block size {cfg.block_size})")
    shape = (batch_size, cfg.n_head, max_len, cfg.head_dim)
    return KVCache(keys=[param.new_empty(shape) for _ in range(cfg.n_layer)],
                   values=[param.new_empty(shape) for _ in range(cfg.n_layer)],
                   tokens=torch.zeros(batch_size, max_len, dtype=torch.long, device=param.device), start=start)

def cached_pass(model: BD3LM, cache: KVCache, tokens: Tensor, clean: bool):
    """Run `tokens` [N, n] after the cached clean context: as clean tokens if `clean`, else as one noisy block."""
    model.check_tokens(tokens, (2,), allow_mask=True)
    cfg, n, length = model.config, tokens.size(1), cache.length
    if tokens.size(0) != cache.tokens.size(0) or length + n > cache.tokens.size(1):
        raise ValueError(f"{tuple(tokens.shape)} tokens do not fit a cache of shape {tuple(cache.tokens.shape)} "
                         f"holding {length}")
    if not clean and (length % cfg.block_size or n > cfg.block_size):
        raise ValueError(f"a noisy block must start on a block boundary and fit one block of {cfg.block_size}: "
                         f"{n} tokens after {length} cached")
    if clean and (length + n) % cfg.block_size and length + n < cache.tokens.size(1):
        raise ValueError(f"clean tokens must end on a block boundary (a clean token sees its whole block): "
                         f"{n} tokens after {length} cached, block size {cfg.block_size}")
    doc, block, block_doc = document_layout(torch.cat([cache.tokens[:, :length], tokens], 1), cfg.block_size,
                                            cfg.eot_id)
    new, device = slice(length, length + n), tokens.device
    clean_k = (torch.arange(length + n, device=device) < length) | clean
    mask = mask_rule((doc if clean else block_doc)[:, new, None], block[:, new, None],
                     torch.tensor(clean, device=device), doc[:, None, :], block[:, None, :], clean_k)
    past = [(k[:, :, :length], v[:, :, :length]) for k, v in zip(cache.keys, cache.values)]
    pos = torch.arange(cache.start + length, cache.start + length + n, device=device)
    return model.trunk(tokens, pos[None], mask[:, None], past)

@torch.no_grad()
def cache_logits(model: BD3LM, cache: KVCache, noisy_block: Tensor) -> Tensor:
    """Logits [N, n, vocab_size] of a noisy block [N, n] given the cached clean context."""
    return model.logits_of(cached_pass(model, cache, noisy_block, clean=False)[0])

@torch.no_grad()
def cache_append(model: BD3LM, cache: KVCache, clean_tokens: Tensor) -> None:
    """Add finished clean tokens [N, n] (a denoised block, or a prompt prefix) to the cache."""
    _, new_kvs = cached_pass(model, cache, clean_tokens, clean=True)
    end = cache.length + clean_tokens.size(1)
    for layer, (k, v) in enumerate(new_kvs):
        cache.keys[layer][:, :, cache.length:end], cache.values[layer][:, :, cache.length:end] = k, v
    cache.tokens[:, cache.length:end], cache.length = clean_tokens, end

# -----------------------------------------------------------------------------
# Denoising and generation

def draw(logits: Tensor, s: Settings, generator: torch.Generator) -> Tensor:
    """One token per row of `logits` [M, V] from one uniform each, in float64 to add no rounding to the logits'."""
    if s.temperature == 0:
        probs = torch.zeros_like(logits, dtype=torch.float64).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    else:
        probs = torch.softmax(logits.double() / s.temperature, -1)
    if s.top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        kept = sorted_probs.cumsum(-1) - sorted_probs < s.top_p  # mass before a token below top_p; keeps the top one
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * kept)
    cdf = (probs / probs.sum(-1, keepdim=True)).cumsum_(-1)
    u = torch.rand(cdf.shape[:-1], generator=generator, dtype=torch.float64, device=generator.device)
    u = (u.to(cdf.device) * cdf[..., -1])[..., None]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.size(-1) - 1)

def denoise_block(block: Tensor, block_logits, s: Settings, mask_id: int, generator, on_step=None):
    """Fill every [MASK] of `block` [N, n]; returns it and the forwards of its rows one at a time (of changed rows)."""
    masked, logits, step, choose = block == mask_id, None, 0, SAMPLERS[s.sampler].choose
    changed, row_forwards = masked.any(-1), torch.zeros((), dtype=torch.long, device=block.device)
    while masked.any():
        if logits is None:
            logits = block_logits(block)
            row_forwards += changed.sum()
        commit = choose(step, masked, logits, s, generator)
        if commit.any():
            block = block.masked_scatter(commit, draw(logits[commit], s, generator))
            masked, logits = masked & ~commit, None
            changed = commit.any(-1) & masked.any(-1)
            if on_step:
                on_step(block)
        step += 1
    return block, int(row_forwards)

@dataclass
class Stats:
    new_tokens: int = 0  # generated positions per sample
    forwards: int = 0  # denoising forward passes (NFE), each over the whole batch
    row_forwards: int = 0  # forwards summed over the rows that needed them: the NFE of the rows one at a time
    cache_appends: int = 0  # forward passes that put finished clean tokens into the KV cache
    seconds: float = 0.0

def check_context(context: int, block_size: int) -> None:
    if context < block_size or context % block_size:
        raise common.ConfigError(f"--context must be a positive multiple of the block size {block_size}, got {context}")

def window_start(begin: int, block_size: int, context: int) -> int:
    """The clean context's start for the block at `begin`, moved by half a context: a re-encode per half window."""
    stride = max(block_size, context // 2 // block_size * block_size)
    return max(0, -(-(begin + block_size - context) // stride) * stride)

@torch.no_grad()
def generate(model: BD3LM, prompt: list[int], s: Settings, generator: torch.Generator, on_step=None,
             progress: bool = False) -> tuple[Tensor, Stats]:
    """Continue `prompt` (token ids, possibly none) in s.num_samples rows: the tokens [N, len(prompt) + generated]
    and stats. `on_step(block_index, block)` sees each block after every step that changed it."""
    cfg, device, start_time, stats = model.config, model.head.weight.device, time.perf_counter(), Stats()
    total = len(prompt) + s.max_new_tokens
    context = s.context or -(-total // cfg.block_size) * cfg.block_size  # 0: the whole text in one window
    check_context(context, cfg.block_size)
    tokens = torch.full((s.num_samples, total), cfg.mask_id, device=device)
    tokens[:, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
    starts = range(len(prompt) - len(prompt) % cfg.block_size, total, cfg.block_size)  # the first has the prompt's tail
    cache, bar = None, tqdm(total=len(starts), unit="block", disable=not progress)
    for index, begin in enumerate(starts):
        end, window = min(begin + cfg.block_size, total), window_start(begin, cfg.block_size, context)
        if s.kv_cache and (cache is None or cache.start != window):  # re-encode the moved window's clean tokens
            cache, cached = new_cache(model, s.num_samples, context, start=window), window
        if cache and cached < begin:  # the clean tokens not yet in the cache: the window's or the last block
            cache_append(model, cache, tokens[:, cached:begin])
            stats.cache_appends, cached = stats.cache_appends + 1, begin
        early = torch.arange(begin, end, device=device) < len(prompt) + s.min_new_tokens

        def block_logits(block: Tensor) -> Tensor:
            stats.forwards += 1
            if cache:
                logits = cache_logits(model, cache, block)
            else:
                history = torch.cat([tokens[:, window:begin], block], 1)  # clean context in both halves, noisy in x_t
                logits = model.logits(history, history)[:, begin - window:]
            logits[:, early, cfg.eot_id] = float("-inf")
            return logits

        show = (lambda block: on_step(index, block)) if on_step else None
        tokens[:, begin:end], row_forwards = denoise_block(tokens[:, begin:end], block_logits, s, cfg.mask_id,
                                                           generator, show)
        stats.row_forwards += row_forwards
        bar.update()
        if s.stop_at_eot and (tokens[:, len(prompt):end] == cfg.eot_id).any(-1).all():
            tokens = tokens[:, :end]
            break
    bar.close()
    common.synchronize(device)
    stats.new_tokens, stats.seconds = tokens.size(1) - len(prompt), time.perf_counter() - start_time
    return tokens, stats

def completions(tokens: Tensor, prompt_length: int, eot: int) -> list[list[int]]:
    """Each row's generated tokens as a reader gets them: cut before its first <|endoftext|>."""
    return [row[: row.index(eot)] if eot in row else row for row in tokens[:, prompt_length:].tolist()]

# -----------------------------------------------------------------------------
# Command line

def load_model(path: str, device: torch.device) -> tuple[BD3LM, dict]:
    """The trained model of a checkpoint, in eval mode, and the settings of the run that wrote it."""
    state = common.read_checkpoint(path, device)
    try:
        model = BD3LM(ModelConfig(**state["model_config"])).to(device)
        model.load_state_dict(state["model"])
        return model.eval(), state["hparams"]
    except (KeyError, TypeError, ValueError, RuntimeError) as error:  # a damaged or hand-edited checkpoint
        raise common.ConfigError(f"{path} does not hold a usable model: {str(error).splitlines()[0]}") from None

def load(s: Settings) -> tuple[BD3LM, dict, list[int]]:
    """The checkpoint's model on s.device, its run's settings and the prompt's ids; context 0 becomes seq_len."""
    model, hparams = load_model(s.checkpoint, common.pick_device(s.device))
    s.context = s.context or hparams["seq_len"]
    check_context(s.context, model.config.block_size)
    if s.prompt_file and not Path(s.prompt_file).is_file():
        raise common.ConfigError(f"prompt file {s.prompt_file!r} does not exist")
    s.prompt = Path(s.prompt_file).read_text() if s.prompt_file else s.prompt  # printed before each sample
    return model, hparams, get_tokenizer().encode(s.prompt, allowed_special={"<|endoftext|>"})

def describe(row: int, generated: list[int], completion: list[int], s: Settings) -> tuple[str, list[int]]:
    """A sample's header line (length, why it ended) and the tokens to print (its completion if s.stop_at_eot)."""
    if s.stop_at_eot and len(completion) < len(generated):
        return f"---- sample {row}: {len(completion)} tokens, ended at <|endoftext|> ----", completion
    return f"---- sample {row}: {len(generated)} tokens, stopped at --max_new_tokens={s.max_new_tokens} ----", generated

def denoising_display(tokenizer, prompt: list[int], config) -> Callable[[int, Tensor], None]:
    """Prints a header; returns the on_step that writes the first blocks of sample 0 after each step changing them."""
    print(f"---- sample 0 denoised block by block ({MASK_GLYPH} = [MASK]), its first {SHOWN_BLOCKS} blocks ----")
    shown = {}  # block index -> the states of its row 0 written so far

    def write(index: int, ids: list[int]) -> None:
        shown.setdefault(index, []).append(ids)
        text = "".join(MASK_GLYPH if i == config.mask_id else tokenizer.decode([i]) for i in ids)
        text, label = text.replace("\n", "⏎").replace("\t", " "), f"block {index} step {len(shown[index]) - 1:2d} | "
        tqdm.write("\n".join((label if i == 0 else " " * len(label)) + text[i:i + WIDTH - len(label)]
                             for i in range(0, max(len(text), 1), WIDTH - len(label))))

    def on_step(index: int, block: Tensor) -> None:
        if index < SHOWN_BLOCKS and index not in shown:  # first its state before any step: [MASK] or the prompt's tail
            begin = len(prompt) - len(prompt) % config.block_size + index * config.block_size
            write(index, (prompt[begin:] + [config.mask_id] * block.size(1))[:block.size(1)])
        if index < SHOWN_BLOCKS and block[0].tolist() != shown[index][-1]:  # the step may have changed other rows only
            write(index, block[0].tolist())
    return on_step

def main(argv: list[str]) -> None:
    s = common.command_line(argv, Settings, "python sample.py --checkpoint=PATH [--name=value ...]")
    with common.user_errors():
        check_settings(s)
        model, hparams, prompt = load(s)
        if s.context > hparams["seq_len"]:
            print(f"warning: --context={s.context} is longer than the {hparams['seq_len']} tokens this model was "
                  f"trained on; predictions that look further back may degrade", file=sys.stderr)
    tokenizer, device = get_tokenizer(), model.head.weight.device
    display = denoising_display(tokenizer, prompt, model.config) if s.show_denoising else None
    tokens, stats = generate(model, prompt, s, torch.Generator(device).manual_seed(s.seed), display, progress=True)
    documents = completions(tokens, len(prompt), model.config.eot_id)
    for row, (generated, completion) in enumerate(zip(tokens[:, len(prompt):].tolist(), documents)):
        header, shown = describe(row, generated, completion, s)
        print(f"{header}\n{s.prompt}{tokenizer.decode(shown)}")
    total = s.num_samples * stats.new_tokens
    print(f"---- {s.num_samples} x {stats.new_tokens} tokens in {stats.seconds:.2f}s: {total / stats.seconds:.1f} "
          f"tokens/s, NFE/token {stats.forwards / stats.new_tokens:.3f} (one sample at a time "
          f"{stats.row_forwards / total:.3f}; {stats.forwards} forwards + {stats.cache_appends} cache appends, sampler "
          f"{s.sampler}, kv_cache {s.kv_cache}, context {s.context}, peak memory {common.peak_memory_mib(device)} MiB)")

if __name__ == "__main__":
    main(sys.argv[1:])
