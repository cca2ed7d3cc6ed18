"""
What a checkpoint is worth: the validation NELBO on data, or the quality of its samples under a judge.

    python eval.py --checkpoint=checkpoints/demo/final.pt                      # what the run's last val line says
    python eval.py --checkpoint=PATH --seeds=8                                 # mean and standard error over noise
    python eval.py --checkpoint=PATH --seeds=8 --estimator=iid                 # the same NELBO, noisier
    python eval.py --checkpoint=PATH --files='data/mine/mine_val_*.bin' --val_tokens=0
    torchrun --standalone --nproc_per_node=8 eval.py --checkpoint=PATH         # the same number, faster
    python eval.py --checkpoint=PATH --judge=checkpoints/ar/final.pt --sampler=confidence --threshold=0.7
    python eval.py --checkpoint=PATH --judge=gpt2-large --sweep=True            # needs `pip install transformers`

NELBO: the protocol of training's validation (common.val_nelbo), whose result does not depend on the world size.
Seed k of `--seeds=K` is train.py's val seed plus k, so `--seeds=1` reproduces the run's last val line.

Sample quality (`--judge`): samples from sample.py's generate (with its flags) under an autoregressive judge, a
checkpoint of this repository trained with --block_size=1 or a Hugging Face causal LM (GPT-2 Large, as in the
BD3-LM paper): generative perplexity, mean unigram entropy (low: degenerate, repetitive samples), lengths, the
share that ended with <|endoftext|>, speed. `--sweep=True` prints a markdown table of samplers and knobs instead.

The last line is the result, `key:value` pairs a script can parse.
"""

import math
import os
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist

import common
import sample
from common import VAL_NOISE_SEED, ConfigError, load_model
from data.loader import find_shards, val_batches
from model import BD3LM, SCHEDULES, VAL_ESTIMATORS, setting

GPT2_VOCAB = 50257


@dataclass
class Settings(sample.Settings):
    """sample.py's settings (they apply to sample quality) and those of the NELBO."""
    files: str = setting("", "NELBO: glob of shards to evaluate on; empty: the run's val shard")
    val_tokens: int = setting(-1, "NELBO: tokens, a multiple of seq_len; -1: the run's number; 0: every whole chunk")
    seq_len: int = setting(0, "NELBO: tokens per chunk; 0: the run's seq_len")
    seeds: int = setting(1, "NELBO: noise seeds; with more than one, the mean and its standard error")
    estimator: str = setting(common.VAL_ESTIMATOR, "NELBO: the val noise, exact_k (k masked tokens a block, k "
                             "uniform on 1..16, weight 16 / k; training's validation) or iid (t ~ U(0, 1) a block "
                             "under --schedule, weight 1 / t); both estimate the same NELBO, with their own variance")
    schedule: str = setting("", "NELBO with --estimator=iid: the schedule of t; empty: the run's")
    autocast: str = setting("auto", "NELBO: auto (bf16 on CUDA and on CPUs with bf16 kernels), bf16 or fp32 "
                                    "(samples are generated in fp32, as sample.py generates them)")
    judge: str = setting("", "score samples instead of data: a checkpoint trained with --block_size=1, or a Hugging "
                             "Face causal LM name or folder (needs transformers)")
    sweep: bool = setting(False, "with --judge: sweep the samplers' knobs and print a markdown table")
    num_samples: int = setting(64, "samples generated together as one batch")
    min_new_tokens: int = setting(0, "no <|endoftext|> among the first this many new tokens; 0: sample quality "
                                     "measures the lengths the model chooses")


# the flags that only sample quality reads
SAMPLE_ONLY = {"sweep", *(f.name for f in fields(sample.Settings))} - {"checkpoint", "device", "num_samples", "seed"}
# the sweep: every sampler of the registry at each value of its knob
SWEEP = [dict(sampler=name, **({entry.knob: value} if entry.knob else {}))
         for name, entry in sample.SAMPLERS.items() for value in entry.sweep or (None,)]


def parse_settings(argv: list[str]) -> Settings:
    flags = common.parse_flags(argv, Settings)
    s = Settings(**flags)
    if "show_denoising" in flags:
        raise ConfigError("--show_denoising is sample.py's: eval.py prints no samples")
    if not s.judge and flags.keys() & SAMPLE_ONLY:
        raise ConfigError(f"--{min(flags.keys() & SAMPLE_ONLY)} applies to sample quality: give --judge too")
    sample.check_settings(s)
    if s.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {s.seeds}")
    common.check_choice("estimator", s.estimator, VAL_ESTIMATORS)
    if s.schedule:
        common.check_choice("schedule", s.schedule, tuple(SCHEDULES))
        if s.estimator != "iid":
            raise ConfigError(f"--schedule applies to --estimator=iid only: {s.estimator} masks a number of "
                              f"tokens, no schedule enters")
    if s.val_tokens < -1 or s.seq_len < 0:
        raise ConfigError(f"--val_tokens must be -1, 0 or positive and --seq_len 0 or positive, got "
                            f"{s.val_tokens} and {s.seq_len}")
    common.check_choice("autocast", s.autocast, ("auto", "bf16", "fp32"))
    return s


# -----------------------------------------------------------------------------
# Judges: sum of -log p(continuation | context) under an autoregressive model


def repository_judge(judge: BD3LM, max_len: int):
    """A checkpoint of this repository trained with --block_size=1: with every x_t position masked, position i
    sees the clean tokens before it in its document, so its logits are the autoregressive p(x_i | x_<i)."""
    def nll(context: list[int], continuation: list[int]) -> float:
        x_0 = torch.tensor([context + continuation], device=judge.head.weight.device)
        with torch.no_grad():
            logits = judge.logits(torch.full_like(x_0, judge.config.mask_id), x_0)[0, len(context):]
        return -float(logits.log_softmax(-1).gather(-1, x_0[0, len(context):, None]).sum())
    return nll, max_len


def hugging_face_judge(name: str, device: torch.device):
    """A Hugging Face causal LM with GPT-2's vocabulary; the text is preceded by <|endoftext|>, GPT-2's start."""
    try:
        from transformers import AutoModelForCausalLM, logging
    except ImportError:
        raise ConfigError(f"--judge={name} is no checkpoint file here, and a Hugging Face judge needs "
                            f"`pip install transformers`") from None
    logging.set_verbosity_error()  # errors reach the user as one line; progress bars and notices would bury it
    logging.disable_progress_bar()
    try:
        lm = AutoModelForCausalLM.from_pretrained(name).to(device).eval()
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load the Hugging Face judge {name!r}: {str(error).splitlines()[0]}") from None
    if lm.config.vocab_size != GPT2_VOCAB:
        raise ConfigError(f"the judge {name!r} has a vocabulary of {lm.config.vocab_size} tokens, not GPT-2's "
                            f"{GPT2_VOCAB}: it cannot read our token ids")

    def nll(context: list[int], continuation: list[int]) -> float:
        ids = torch.tensor([[GPT2_VOCAB - 1, *context, *continuation]], device=device)
        with torch.no_grad():
            logits = lm(ids).logits[0, len(context):-1].float()  # position i predicts token i + 1
        return -float(logits.log_softmax(-1).gather(-1, ids[0, len(context) + 1:, None]).sum())
    return nll, (getattr(lm.config, "n_positions", None) or lm.config.max_position_embeddings) - 1


def load_judge(name: str, model: BD3LM, device: torch.device):
    """(nll function, longest context + continuation it can score) of a judge given by --judge."""
    if not os.path.isfile(name):
        return hugging_face_judge(name, device)
    judge, hparams = load_model(name, device)
    if judge.config.block_size != 1:
        raise ConfigError(f"the judge {name} was trained with --block_size={judge.config.block_size}; a judge "
                            f"must be autoregressive: --block_size=1")
    if (judge.config.vocab_size, judge.config.eot_id) != (model.config.vocab_size, model.config.eot_id):
        raise ConfigError(f"the judge {name} has a vocabulary of {judge.config.vocab_size} tokens, the model "
                            f"{model.config.vocab_size}: it cannot read the model's token ids")
    return repository_judge(judge, hparams["seq_len"])


# -----------------------------------------------------------------------------
# Sample quality


def unigram_entropy(tokens: list[int]) -> float:
    """Entropy in nats of the token frequencies of one sample (0 for a sample of one repeated token)."""
    counts = Counter(tokens).values()
    return -sum(c / len(tokens) * math.log(c / len(tokens)) for c in counts) if tokens else 0.0


def sample_quality(model: BD3LM, judge, prompt: list[int], s: Settings) -> dict:
    """Generate s.num_samples samples after `prompt` and score them. The judge scores what a reader gets: each
    sample up to and with its first <|endoftext|> (with --stop_at_eot=False: everything generated)."""
    nll, judge_len = judge
    eot = model.config.eot_id
    tokens, stats = sample.generate(model, prompt, s, torch.Generator(model.head.weight.device).manual_seed(s.seed))
    rows = tokens[:, len(prompt):].tolist()
    documents = sample.completions(tokens, len(prompt), eot)
    scored = [row[: len(doc) + 1] if s.stop_at_eot else row for doc, row in zip(documents, rows)]
    if len(prompt) + max(map(len, scored)) > judge_len:
        raise ConfigError(f"the judge reads at most {judge_len} tokens: lower --max_new_tokens (prompt "
                            f"{len(prompt)} + samples up to {max(map(len, scored))})")
    losses = [nll(prompt, row) for row in scored]
    per_token = [loss / len(row) for loss, row in zip(losses, scored)]
    lengths = [len(doc) for doc in documents]
    return dict(gen_ppl=math.exp(sum(losses) / sum(map(len, scored))),
                log_ppl_stderr=statistics.stdev(per_token) / math.sqrt(len(per_token)) if len(scored) > 1 else 0.0,
                entropy=statistics.fmean(unigram_entropy(doc) for doc in documents),
                median_length=statistics.median(lengths), max_length=max(lengths),
                ended=sum(eot in row for row in rows) / len(rows),
                tokens_per_s=s.num_samples * stats.new_tokens / stats.seconds,
                tokens_per_forward=s.num_samples * stats.new_tokens / stats.row_forwards,
                batch_tokens_per_forward=stats.new_tokens / stats.forwards, samples=len(documents))


def knobs(s: Settings) -> str:
    knob = sample.SAMPLERS[s.sampler].knob
    return f"{knob}={getattr(s, knob)}" if knob else ""


def sweep_table(model: BD3LM, judge, prompt: list[int], s: Settings) -> str:
    rows = ["| sampler | knob | tokens/forward, per sample | tokens/forward, batch | tokens/s | gen PPL | entropy | "
            "ended with EOT | median length |", "|---|---|---|---|---|---|---|---|---|"]
    for swept in (replace(s, **overrides) for overrides in SWEEP):
        q = sample_quality(model, judge, prompt, swept)
        rows.append(f"| {swept.sampler} | {knobs(swept)} | {q['tokens_per_forward']:.2f} | "
                    f"{q['batch_tokens_per_forward']:.2f} | {q['tokens_per_s']:.0f} | {q['gen_ppl']:.1f} ± "
                    f"{q['gen_ppl'] * q['log_ppl_stderr']:.1f} | {q['entropy']:.2f} | {q['ended']:.0%} | "
                    f"{q['median_length']:.0f} |")
        print(rows[-1], file=sys.stderr, flush=True)  # progress: a sweep takes minutes
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# Command line


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(common.usage("python eval.py --checkpoint=PATH [--judge=JUDGE] [--name=value ...]", Settings))
        return
    rank, world_size = common.ranks()
    try:
        s = parse_settings(argv)
        device = common.pick_device(s.device)
        model, hparams = load_model(s.checkpoint, device)
        if s.judge:
            if world_size > 1:
                raise ConfigError("sample quality runs in one process: start it without torchrun")
            s.context = s.context or hparams["seq_len"]
            sample.check_context(s.context, model.config.block_size)
            prompt = sample.read_prompt(s)
            judge = load_judge(s.judge, model, device)
        else:
            if not s.files and not os.path.isfile(hparams["val_file"]):
                raise ConfigError(f"the run's val shard {hparams['val_file']} is not here; give --files=GLOB")
            files = find_shards(s.files) if s.files else [hparams["val_file"]]
            model.config.schedule = s.schedule or model.config.schedule
            seq_len = s.seq_len or hparams["seq_len"]
            num_tokens = {-1: hparams["val_tokens"], 0: None}.get(s.val_tokens, s.val_tokens)
            val_batches(files, num_tokens, seq_len)  # checks the shards and the token count now
    except (ValueError, FileNotFoundError) as error:  # ConfigError and ShardError are ValueErrors
        common.fail(str(error), status=2)
    if s.judge:
        report_sample_quality(model, judge, prompt, s)
    else:
        report_nelbo(model, files, num_tokens, seq_len, s, device, rank, world_size)


def report_sample_quality(model: BD3LM, judge, prompt: list[int], s: Settings) -> None:
    setup = f"samples:{s.num_samples} max_new_tokens:{s.max_new_tokens} judge:{s.judge} seed:{s.seed}"
    try:
        if s.sweep:
            print(f"{sweep_table(model, judge, prompt, s)}\n\n{setup} temperature:{s.temperature} top_p:{s.top_p}")
            return
        q = sample_quality(model, judge, prompt, s)
    except ConfigError as error:
        common.fail(str(error), status=2)
    print(f"gen_ppl:{q['gen_ppl']:.2f} log_ppl_stderr:{q['log_ppl_stderr']:.4f} entropy:{q['entropy']:.3f} "
          f"median_length:{q['median_length']:g} max_length:{q['max_length']} ended_with_eot:{q['ended']:.3f} "
          f"tokens_per_s:{q['tokens_per_s']:.1f} tokens_per_forward:{q['tokens_per_forward']:.3f} "
          f"batch_tokens_per_forward:{q['batch_tokens_per_forward']:.3f} "
          f"sampler:{s.sampler} {knobs(s) or 'knob:none'} {setup}")


def report_nelbo(model: BD3LM, files, num_tokens, seq_len: int, s: Settings, device, rank: int, world_size: int):
    common.init_process_group(device)
    bf16 = common.uses_bf16(s.autocast, device)
    results = []
    with common.autocast_context(device, bf16):
        for k in range(s.seeds):
            loss, tokens = common.val_nelbo(model, files, num_tokens, seq_len, VAL_NOISE_SEED + k, rank, world_size,
                                            progress=rank == 0, estimator=s.estimator)
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
              f"estimator:{s.estimator} schedule:{model.config.schedule if s.estimator == 'iid' else 'none'} "
              f"files:{','.join(files)}")


if __name__ == "__main__":
    main(sys.argv[1:])
