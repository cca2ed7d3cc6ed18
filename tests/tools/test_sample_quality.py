"""tools/sample_quality.py: the judges against direct computations, the statistics, the sweep table and the
command line's errors (about a minute on 2 cores).

    python -m pytest -q tests/tools/test_sample_quality.py

The Hugging Face judge is a small GPT-2 with random weights built here (no download); the tests that need it
are skipped when transformers is not installed.
"""

import math
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, peaked_model, save_checkpoint

import sample
from model import BD3LM
from tools import sample_quality

VOCAB = 50257
RESULT = re.compile(r"gen_ppl:(\S+) log_ppl_stderr:(\S+) entropy:(\S+) median_length:(\S+) max_length:(\d+) "
                    r"ended_with_eot:(\S+) tokens_per_s:(\S+) tokens_per_forward:(\S+) batch_tokens_per_forward:(\S+) "
                    r"sampler:(\S+) (\S+) samples:(\d+) max_new_tokens:(\d+) judge:(\S+) seed:(\d+)")


def random_model(block_size: int, seed: int, vocab_size: int = VOCAB) -> BD3LM:
    return peaked_model(block_size, seed, vocab_size)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    return dict(model=save_checkpoint(random_model(4, seed=0), folder / "bd3lm.pt"),
                judge=save_checkpoint(random_model(1, seed=1), folder / "ar.pt"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A two-layer GPT-2 with GPT-2's vocabulary and random weights, saved as a Hugging Face folder."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return str(folder)


def test_repository_judge_equals_a_position_by_position_computation():
    """The judge scores all positions in one pass; the reference runs the judge once per position, on the
    context and the continuation up to that token only, so nothing after a token can reach its score."""
    judge = random_model(1, seed=1)
    nll, _ = sample_quality.repository_judge(judge, 64)
    gen = torch.Generator().manual_seed(0)
    for context_len, continuation_len in ((0, 9), (5, 7), (3, 1)):
        sequence = torch.randint(0, VOCAB, (context_len + continuation_len,), generator=gen)
        sequence[context_len // 2] = judge.config.eot_id  # a document end in the context (or the continuation)
        expected = 0.0
        for i in range(context_len, sequence.numel()):
            prefix = sequence[None, : i + 1]
            with torch.no_grad():
                logits = judge.logits(torch.full_like(prefix, judge.config.mask_id), prefix)[0, -1]
            expected -= float(logits.log_softmax(-1)[sequence[i]])
        got = nll(sequence[:context_len].tolist(), sequence[context_len:].tolist())
        assert got == pytest.approx(expected, rel=1e-5)


def test_hugging_face_judge_equals_the_models_own_loss(gpt2):
    transformers = pytest.importorskip("transformers")
    lm = transformers.AutoModelForCausalLM.from_pretrained(gpt2).eval()
    nll, max_len = sample_quality.hugging_face_judge(gpt2, torch.device("cpu"))
    assert max_len == 63  # n_positions less the <|endoftext|> in front
    gen = torch.Generator().manual_seed(1)
    for context_len, continuation_len in ((0, 12), (6, 10)):
        ids = torch.randint(0, VOCAB, (1, 1 + context_len + continuation_len), generator=gen)
        ids[0, 0] = VOCAB - 1
        labels = ids.clone()
        labels[0, : 1 + context_len] = -100  # HF shifts labels itself and ignores -100
        with torch.no_grad():
            mean_loss = float(lm(ids, labels=labels).loss)
        got = nll(ids[0, 1: 1 + context_len].tolist(), ids[0, 1 + context_len:].tolist())
        assert got == pytest.approx(mean_loss * continuation_len, rel=1e-5)


def test_unigram_entropy():
    assert sample_quality.unigram_entropy([5] * 10) == 0
    assert sample_quality.unigram_entropy([1, 2, 3, 4] * 3) == pytest.approx(math.log(4))
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert sample_quality.unigram_entropy([1, 1, 1, 2]) == pytest.approx(expected)


def test_sample_quality_scores_each_sample_up_to_its_end(checkpoints):
    """Gen PPL is the judge's total NLL over the scored tokens, each sample up to and with its first
    <|endoftext|>, checked against the judge called by hand on generate's own output."""
    model, judge = random_model(4, 0, vocab_size=256), sample_quality.repository_judge(random_model(1, 1, 256), 64)
    eot = model.config.eot_id

    def end_now_and_then(head, inputs, logits):  # <|endoftext|> near the top of every distribution
        return logits.index_fill(-1, torch.tensor([eot]), 8.0)

    model.head.register_forward_hook(end_now_and_then)
    s = sample_quality.Settings(num_samples=6, max_new_tokens=40, sampler="first_hitting", context=64, seed=3)
    quality = sample_quality.sample_quality(model, judge, [], s)
    tokens, _ = sample.generate(model, [], s, torch.Generator().manual_seed(3))
    rows = tokens.tolist()
    scored = [row[: row.index(eot) + 1] if eot in row else row for row in rows]
    assert 0 < sum(eot in row for row in rows) < 6  # some samples end, some do not
    total = sum(judge[0]([], row) for row in scored)
    assert quality["gen_ppl"] == pytest.approx(math.exp(total / sum(map(len, scored))), rel=1e-6)
    assert quality["ended"] == sum(eot in row for row in rows) / 6
    lengths = sorted(len(row) - (eot in row) for row in scored)
    assert quality["max_length"] == lengths[-1] and quality["median_length"] == (lengths[2] + lengths[3]) / 2
    assert quality["tokens_per_forward"] == quality["batch_tokens_per_forward"] == 1.0 and quality["samples"] == 6


def run_tool(*flags):
    return subprocess.run([sys.executable, "tools/sample_quality.py", *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def main_here(capsys, *flags) -> str:
    """sample_quality.main in this process, as the command line runs it: what it printed."""
    sample_quality.main(list(flags))
    return capsys.readouterr().out


def test_cli_reports_sample_quality_under_both_judges(checkpoints, gpt2, capsys, one_thread):
    """The repository judge through the real command line, the Hugging Face one through sample_quality.main."""
    for judge in (checkpoints["judge"], gpt2):
        flags = [f"--checkpoint={checkpoints['model']}", f"--judge={judge}", "--num_samples=3", "--max_new_tokens=20",
                 "--sampler=ddpm", "--steps_per_block=2"]
        if judge == gpt2:
            stdout = main_here(capsys, *flags)
        else:
            completed = run_tool(*flags)
            assert completed.returncode == 0, completed.stderr
            stdout = completed.stdout
        result = RESULT.fullmatch(stdout.strip().splitlines()[-1])
        assert result, stdout
        assert float(result.group(1)) > 1 and 0 <= float(result.group(6)) <= 1 and float(result.group(3)) > 0
        assert result.group(10, 11, 12, 13, 14) == ("ddpm", "steps_per_block=2", "3", "20", judge)
        # 2 steps per block of 4: the batch runs both (2 tokens per forward); a row that the first step left
        # unchanged, or filled, needs one forward for its block alone (4)
        assert 1 < float(result.group(9)) <= 2 and float(result.group(9)) <= float(result.group(8)) <= 4


def test_cli_sweep_prints_a_markdown_table(checkpoints, capsys, one_thread):
    stdout = main_here(capsys, f"--checkpoint={checkpoints['model']}", f"--judge={checkpoints['judge']}",
                       "--sweep=True", "--num_samples=2", "--max_new_tokens=16")
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| sampler | knob | tokens/forward") and len(rows) == 1 + len(sample_quality.SWEEP)
    cells = [row.split(" | ") for row in rows[1:]]
    assert cells[0][0] == "| first_hitting" and cells[0][2] == cells[0][3] == "1.00"
    assert cells[5][1] == "steps_per_block=1" and cells[5][2] == cells[5][3] == "4.00"  # one forward per block of 4


@pytest.mark.parametrize("flags, message", [
    (["--judge={model}"], "must be autoregressive: --block_size=1"),
    (["--judge={judge}", "--max_new_tokens=80"], "the judge reads at most 64 tokens"),
    (["--judge={judge}", "--context=6"], "--context must be a positive multiple of the block size 4"),
    (["--judge=/no/such/judge"], "cannot load the Hugging Face judge"),
    (["--judge={small_vocab}"], "has a vocabulary of 1000 tokens, not GPT-2's 50257"),
    (["--sampler=confidence"], "--judge=JUDGE is required"),
    (["--judge={judge}", "--threshold=2"], "--threshold must lie in [0, 1]"),
    (["--judge={judge}", "--show_denoising=True"], "--show_denoising is sample.py's: this tool prints no samples"),
])
def test_bad_input_gives_one_line_and_status_2(tmp_path, capsys, checkpoints, flags, message):
    """In-process through sample_quality.main, the command line's own entry point."""
    if "{small_vocab}" in flags[0]:
        transformers = pytest.importorskip("transformers")
        config = transformers.GPT2Config(vocab_size=1000, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                            bos_token_id=0, eos_token_id=0)
        transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "small_vocab")
    paths = dict(checkpoints, small_vocab=tmp_path / "small_vocab")
    with pytest.raises(SystemExit) as exit_info:
        sample_quality.main([f"--checkpoint={checkpoints['model']}", *(flag.format(**paths) for flag in flags),
                         "--num_samples=2"])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert stderr.startswith("error: ") and message in stderr
    assert len(stderr.strip().splitlines()) == 1
