"""What a checkpoint's samples are worth under an autoregressive judge (a checkpoint trained with --block_size=1, or
a Hugging Face causal LM such as the paper's GPT-2 Large): generative perplexity, mean unigram entropy (low:
repetitive samples), lengths, the share that ended with <|endoftext|>, speed; the last line is `key:value` pairs.
`--sweep=True` prints a markdown table of the samplers and their knobs instead.

    python tools/sample_quality.py --checkpoint=PATH --judge=checkpoints/ar/final.pt --sampler=confidence
    python tools/sample_quality.py --checkpoint=PATH --judge=gpt2-large --sweep=True  # needs transformers
"""

import math, os, statistics, sys
from collections import Counter
from dataclasses import dataclass, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import common
import sample
from common import ConfigError
from data.shards import VOCAB_SIZE
from model import BD3LM, setting

@dataclass
class Settings(sample.Settings):
    """sample.py's settings, and the judge's."""
    judge: str = setting("", "an autoregressive judge: a checkpoint trained with --block_size=1, or a Hugging Face "
                             "causal LM name or folder (needs transformers); required")
    sweep: bool = setting(False, "sweep the samplers' knobs and print a markdown table")
    num_samples: int = setting(64, "samples generated together as one batch")
    min_new_tokens: int = setting(0, "no <|endoftext|> among the first this many new tokens; 0: measure the "
                                     "lengths the model chooses")

# the sweep: every sampler of the registry at each value of its knob
SWEEP = [dict(sampler=name, **({entry.knob: value} if entry.knob else {}))
         for name, entry in sample.SAMPLERS.items() for value in entry.sweep or (None,)]

def repository_judge(judge: BD3LM, max_len: int):
    """A checkpoint trained with --block_size=1: with every x_t position masked, position i sees the clean tokens
    before it in its document, so its logits are the autoregressive p(x_i | x_<i)."""
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
    if lm.config.vocab_size != VOCAB_SIZE:
        raise ConfigError(f"the judge {name!r} has a vocabulary of {lm.config.vocab_size} tokens, not GPT-2's "
                            f"{VOCAB_SIZE}: it cannot read our token ids")

    def nll(context: list[int], continuation: list[int]) -> float:
        ids = torch.tensor([[VOCAB_SIZE - 1, *context, *continuation]], device=device)
        with torch.no_grad():
            logits = lm(ids).logits[0, len(context):-1].float()  # position i predicts token i + 1
        return -float(logits.log_softmax(-1).gather(-1, ids[0, len(context) + 1:, None]).sum())
    return nll, (getattr(lm.config, "n_positions", None) or lm.config.max_position_embeddings) - 1

def load_judge(name: str, model: BD3LM, device: torch.device):
    """(nll function, longest context + continuation it can score) of a judge given by --judge."""
    if not os.path.isfile(name):
        return hugging_face_judge(name, device)
    judge, hparams = sample.load_model(name, device)
    if judge.config.block_size != 1:
        raise ConfigError(f"the judge {name} was trained with --block_size={judge.config.block_size}; a judge "
                            f"must be autoregressive: --block_size=1")
    if (judge.config.vocab_size, judge.config.eot_id) != (model.config.vocab_size, model.config.eot_id):
        raise ConfigError(f"the judge {name} has a vocabulary of {judge.config.vocab_size} tokens, the model "
                            f"{model.config.vocab_size}: it cannot read the model's token ids")
    return repository_judge(judge, hparams["seq_len"])

def unigram_entropy(tokens: list[int]) -> float:
    """Entropy in nats of the token frequencies of one sample (0 for a sample of one repeated token)."""
    counts = Counter(tokens).values()
    return -sum(c / len(tokens) * math.log(c / len(tokens)) for c in counts) if tokens else 0.0

def sample_quality(model: BD3LM, judge, prompt: list[int], s: Settings) -> dict:
    """Generate s.num_samples samples after `prompt` and score what a reader gets: each sample up to and with its
    first <|endoftext|> (with --stop_at_eot=False: everything generated)."""
    (nll, judge_len), eot = judge, model.config.eot_id
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

def main(argv: list[str]) -> None:
    s = common.command_line(argv, Settings, "python tools/sample_quality.py --checkpoint=PATH --judge=JUDGE "
                            "[--name=value ...]")
    setup = f"samples:{s.num_samples} max_new_tokens:{s.max_new_tokens} judge:{s.judge} seed:{s.seed}"
    with common.user_errors():
        if any(arg.startswith("--show_denoising") for arg in argv):
            raise ConfigError("--show_denoising is sample.py's: this tool prints no samples")
        sample.check_settings(s)
        if not s.judge:
            raise ConfigError("--judge=JUDGE is required (see --help)")
        model, _, prompt = sample.load(s)
        judge = load_judge(s.judge, model, model.head.weight.device)
        if s.sweep:
            print(f"{sweep_table(model, judge, prompt, s)}\n\n{setup} temperature:{s.temperature} top_p:{s.top_p}")
            return
        q = sample_quality(model, judge, prompt, s)
    print(f"gen_ppl:{q['gen_ppl']:.2f} log_ppl_stderr:{q['log_ppl_stderr']:.4f} entropy:{q['entropy']:.3f} "
          f"median_length:{q['median_length']:g} max_length:{q['max_length']} ended_with_eot:{q['ended']:.3f} "
          f"tokens_per_s:{q['tokens_per_s']:.1f} tokens_per_forward:{q['tokens_per_forward']:.3f} "
          f"batch_tokens_per_forward:{q['batch_tokens_per_forward']:.3f} "
          f"sampler:{s.sampler} {knobs(s) or 'knob:none'} {setup}")

if __name__ == "__main__":
    main(sys.argv[1:])
