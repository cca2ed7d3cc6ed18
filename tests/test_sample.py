"""sample.py on a small random model: the samplers, the KV cache against the slow reference, seeds, thresholds,
stopping at <|endoftext|>, and the command line's errors (about a minute on 2 CPU cores).

    python -m pytest -q tests/test_sample.py

Every weight is random (the zero-initialized head and projections of a fresh model would make every token
equally likely and every sampler trivial). Command-line tests run `python sample.py` on checkpoints in tmp_path.
"""

import os
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
from conftest import REPO, peaked_model, save_checkpoint

import common
import sample
from model import BD3LM, ModelConfig
from sample import SAMPLERS, SCHEDULES, Settings, completions, generate, window_start

VOCAB = 256  # a small vocabulary keeps the float64 sampling cheap; the command line uses GPT-2's
EOT = VOCAB - 1  # <|endoftext|>, which ends a document
BLOCK = 4
# 7 tokens: the prompt ends mid-block (3 tokens into its second block), so its tail is fixed in a noisy block
PROMPT = [11, 22, 33, 44, 55, 66, 77]
SAMPLER_SETTINGS = {"ddpm": dict(steps_per_block=4, temperature=0.8, top_p=0.95), "first_hitting": {},
                    "confidence": dict(threshold=0.2)}


def random_model(seed: int = 0, vocab_size: int = VOCAB) -> BD3LM:
    return peaked_model(BLOCK, seed, vocab_size)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run many times faster on one thread, more so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return random_model()


def run(model, seed=0, **settings):
    settings = Settings(**{"num_samples": 3, "max_new_tokens": 14, "min_new_tokens": 0, **settings})
    return generate(model, PROMPT, settings, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cached_and_reference_paths_give_the_same_tokens(model, sampler):
    cached, cached_stats = run(model, sampler=sampler, **SAMPLER_SETTINGS[sampler])
    reference, reference_stats = run(model, sampler=sampler, kv_cache=False, **SAMPLER_SETTINGS[sampler])
    assert torch.equal(cached, reference)
    assert cached.shape == (3, len(PROMPT) + 14)
    assert (cached[:, : len(PROMPT)] == torch.tensor(PROMPT)).all()  # the prompt's tail is kept verbatim
    assert (cached < model.config.vocab_size).all()  # no [MASK] left
    assert cached_stats.forwards == reference_stats.forwards
    # blocks start at 4 (the prompt's tail 3 tokens in), 8, 12, 16 and 20 (the last one is cut at 21 tokens)
    assert cached_stats.cache_appends == 1 + 4 and reference_stats.cache_appends == 0
    assert not torch.equal(cached[0], cached[1])  # rows are drawn independently


@pytest.mark.parametrize("prompt", [[], PROMPT[:1], PROMPT + [88], PROMPT[:3] + [EOT] + PROMPT[3:],
                                    PROMPT[:2] + [EOT, EOT] + PROMPT[2:6] + [EOT], PROMPT[:3] + [EOT]])
def test_cached_and_reference_paths_agree_for_any_prompt_layout(model, prompt):
    """Empty (a new document), one token, ending on a block boundary, holding several documents (two ends in
    one block), ending with <|endoftext|> mid-block and on a block's last slot."""
    settings = Settings(num_samples=2, max_new_tokens=9, sampler="confidence", threshold=0.2)
    cached, _ = generate(model, prompt, settings, torch.Generator().manual_seed(0))
    reference, _ = generate(model, prompt, replace(settings, kv_cache=False), torch.Generator().manual_seed(0))
    assert torch.equal(cached, reference) and (cached[:, : len(prompt)] == torch.tensor(prompt)).all()


def test_ddpm_skips_the_forward_when_a_step_changes_nothing(model):
    tokens, stats = run(model, sampler="ddpm", steps_per_block=64, num_samples=1)
    # 64 steps for each of 5 blocks, but a block changes at most once per masked token, 14 in all
    assert stats.forwards <= 14
    assert (tokens < model.config.vocab_size).all()


@pytest.mark.parametrize("schedule", [name for name in SCHEDULES if name != "linear"])
def test_ddpm_steps_follow_the_schedule_on_both_paths(model, schedule):
    """--schedule changes which tokens each ddpm step reveals, so the draws; the cache still equals the reference."""
    linear, _ = run(model, sampler="ddpm", steps_per_block=4)
    cached, _ = run(model, sampler="ddpm", steps_per_block=4, schedule=schedule)
    reference, _ = run(model, sampler="ddpm", steps_per_block=4, schedule=schedule, kv_cache=False)
    assert torch.equal(cached, reference) and not torch.equal(cached, linear)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_same_output_different_seed_different_output(model, sampler):
    first, _ = run(model, seed=1, sampler=sampler)
    again, _ = run(model, seed=1, sampler=sampler)
    other, _ = run(model, seed=2, sampler=sampler)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def committed_per_step(model, **settings) -> list[int]:
    """Tokens newly committed by each step that changed a block (the steps on_step sees)."""
    counts, filled_before = [], {0: 3}  # the first block holds the prompt's last 3 tokens

    def on_step(index, block):
        filled = int((block[0] != model.config.mask_id).sum())
        counts.append(filled - filled_before.get(index, 0))
        filled_before[index] = filled

    settings = Settings(num_samples=1, max_new_tokens=14, sampler="confidence", **settings)
    generate(model, PROMPT, settings, torch.Generator().manual_seed(0), on_step=on_step)
    return counts


def test_confidence_threshold_one_commits_one_token_per_step(model):
    counts = committed_per_step(model, threshold=1.0)
    assert counts == [1] * 14
    _, stats = run(model, sampler="confidence", threshold=1.0)
    assert stats.forwards == 14  # one forward per generated token


def test_confidence_threshold_zero_commits_a_block_per_step(model):
    assert committed_per_step(model, threshold=0.0) == [1, 4, 4, 4, 1]  # the first block holds 3 prompt tokens
    _, stats = run(model, sampler="confidence", threshold=0.0)
    assert stats.forwards == 5


def test_first_hitting_commits_one_token_per_step(model):
    _, stats = run(model, sampler="first_hitting")
    assert stats.forwards == 14


def test_a_new_sampler_is_one_function_and_one_registry_entry(model, monkeypatch):
    """A left-to-right sampler (the leftmost masked token each step), registered and nothing else: the settings
    check accepts it and generation uses it, with the cached path still equal to the reference."""
    def left_to_right(step, masked, logits, s, generator):
        return masked & (masked.cumsum(-1) == 1)

    monkeypatch.setitem(SAMPLERS, "left_to_right", sample.Sampler(left_to_right))
    settings = Settings(num_samples=2, max_new_tokens=14, sampler="left_to_right")
    sample.check_settings(settings)
    still_masked = []
    generate(model, PROMPT, settings, torch.Generator().manual_seed(0),
             on_step=lambda index, block: still_masked.append((index, (block[0] == model.config.mask_id).tolist())))
    # the prompt's tail fills 3 slots of block 0; blocks 1-3 fill from the left, one token a step; block 4 has one
    assert still_masked == [(0, [False] * 4)] + [(index, [False] * filled + [True] * (4 - filled))
                                                 for index in range(1, 4) for filled in (1, 2, 3, 4)] + [(4, [False])]
    cached, stats = generate(model, PROMPT, settings, torch.Generator().manual_seed(0))
    reference, _ = generate(model, PROMPT, replace(settings, kv_cache=False), torch.Generator().manual_seed(0))
    assert torch.equal(cached, reference) and stats.forwards == 14


@pytest.mark.parametrize("sampler, settings", [("ddpm", dict(steps_per_block=16)), ("confidence", dict(threshold=0.3))])
def test_row_forwards_count_what_each_row_would_need_alone(model, sampler, settings):
    """Counted from what on_step sees: a row needs a forward at the start of each block (every block starts with
    a [MASK] in every row), then one after each step that changed it and left it a [MASK]; rows that did not
    change would reuse their logits alone. Rows finish at different steps, so this is less than rows x forwards."""
    states = {}
    settings = Settings(num_samples=5, max_new_tokens=14, sampler=sampler, stop_at_eot=False, **settings)
    _, stats = generate(model, PROMPT, settings, torch.Generator().manual_seed(0),
                        on_step=lambda index, block: states.setdefault(index, []).append(block.clone()))
    expected = 0
    for index, blocks in states.items():
        initial = torch.full((5,), [1, 4, 4, 4, 1][index])  # [MASK]s per row: blocks of 4 from 4 to 21, 3 prompted
        masks = [initial, *((block == model.config.mask_id).sum(-1) for block in blocks)]
        expected += 5 + sum(int(((now < before) & (now > 0)).sum()) for before, now in zip(masks, masks[1:]))
    assert stats.row_forwards < 5 * stats.forwards
    assert stats.row_forwards == expected


def test_one_row_needs_the_forwards_of_the_batch(model):
    _, stats = run(model, sampler="ddpm", steps_per_block=16, num_samples=1)
    assert stats.row_forwards == stats.forwards


def test_completions_cut_each_row_at_its_first_end_of_text():
    tokens = torch.tensor([[EOT, 5, 6, 7, 8, 9], [EOT, 5, EOT, 7, EOT, 9], [EOT, 5, 6, 7, 8, EOT]])
    assert completions(tokens, 2, EOT) == [[6, 7, 8, 9], [], [6, 7, 8]]


def test_generation_stops_once_every_sample_has_ended():
    model = random_model(seed=1)
    model.head.register_forward_hook(favour_end_of_text)
    tokens, stats = run(model, sampler="first_hitting", num_samples=4, max_new_tokens=400)
    generated = tokens[:, len(PROMPT):]
    first_end = [row.index(EOT) for row in generated.tolist()]  # every row has ended
    assert len(set(first_end)) > 1  # at different places
    # the batch stops with the block in which the last row ends: blocks start 1 token into the generation
    last_block_end = 1 + BLOCK * ((max(first_end) - 1) // BLOCK + 1)
    assert stats.new_tokens == generated.size(1) == min(last_block_end, 400) < 400
    for row, completion in zip(generated.tolist(), completions(tokens, len(PROMPT), EOT)):
        assert completion == row[: row.index(EOT)] and EOT not in completion
    # rows that ended mid-block went on into new documents while the others finished: the same tokens either way
    assert any(end % BLOCK != 0 and end < max(first_end) - BLOCK for end in first_end)
    reference, _ = run(model, sampler="first_hitting", num_samples=4, max_new_tokens=400, kv_cache=False)
    assert torch.equal(tokens, reference)


def favour_end_of_text(head, inputs, logits):
    """A forward hook on the head: rows end within a few blocks, at different places."""
    return logits + 2.0 * (torch.arange(logits.size(-1)) == EOT)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_min_new_tokens_keeps_end_of_text_out_of_the_first_tokens_only(sampler):
    """With <|endoftext|> favoured, it comes early in every sample unless min_new_tokens holds it back; the hold
    stops at exactly min_new_tokens new tokens, on the cached and the reference path alike."""
    model = random_model(seed=int(torch.randint(0, 1000, ())))
    model.head.register_forward_hook(lambda head, inputs, logits: logits / 4 + 4.0 * (torch.arange(logits.size(-1))
                                                                                      == EOT))
    minimum = int(torch.randint(6, 12, ()))
    settings = dict(sampler=sampler, num_samples=6, max_new_tokens=40, stop_at_eot=False,
                    **SAMPLER_SETTINGS[sampler])
    free, _ = run(model, **settings)
    assert (free[:, len(PROMPT):len(PROMPT) + minimum] == EOT).any()
    for kv_cache in (True, False):
        held, _ = run(model, min_new_tokens=minimum, kv_cache=kv_cache, **settings)
        assert not (held[:, len(PROMPT):len(PROMPT) + minimum] == EOT).any()
        assert (held[:, len(PROMPT) + minimum:] == EOT).any()  # from there on it is allowed again


def test_each_header_gives_the_length_and_the_end():
    s = Settings(max_new_tokens=6)
    rows = torch.tensor([[5, 6, EOT, 7, EOT, 8], [EOT, 6, 7, 7, 9, 8], [5, 6, 7, 7, 9, 8]])
    first, second, third = zip(rows.tolist(), completions(rows, 0, EOT))
    assert sample.describe(0, *first, s) == ("---- sample 0: 2 tokens, ended at <|endoftext|> ----", [5, 6])
    assert sample.describe(2, *third, s) == (
        "---- sample 2: 6 tokens, stopped at --max_new_tokens=6 ----", [5, 6, 7, 7, 9, 8])
    assert sample.describe(1, *second, replace(s, stop_at_eot=False)) == (
        "---- sample 1: 6 tokens, stopped at --max_new_tokens=6 ----", [EOT, 6, 7, 7, 9, 8])


def test_window_start_keeps_the_context_within_bounds():
    for context in (BLOCK, 2 * BLOCK, 3 * BLOCK, 8 * BLOCK):
        starts = [window_start(begin, BLOCK, context) for begin in range(0, 40 * BLOCK, BLOCK)]
        for begin, start in zip(range(0, 40 * BLOCK, BLOCK), starts):
            assert start % BLOCK == 0 and 0 <= begin - start <= context - BLOCK
        assert starts == sorted(starts)
        stride = max(BLOCK, context // 2 // BLOCK * BLOCK)
        assert len(set(starts)) == len(set(range(0, max(starts) + 1, stride)))  # moves once per stride
        if context >= 2 * BLOCK:  # then the window never shrinks below half the context
            assert min(begin - start for begin, start in zip(range(0, 40 * BLOCK, BLOCK), starts)
                       if begin + BLOCK >= context) >= context // 2 - BLOCK


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("context", [BLOCK, 3 * BLOCK, 4 * BLOCK])
def test_windowed_cache_gives_the_tokens_of_a_recompute_over_the_window(model, sampler, context):
    """Ten and more times the context: the cache, re-encoded when the window moves, against a full pass over
    the window at every step; rows go on past <|endoftext|> into new documents inside the window."""
    model = random_model(seed=1)
    model.head.register_forward_hook(favour_end_of_text)
    settings = Settings(num_samples=3, max_new_tokens=12 * context + 3, min_new_tokens=0, context=context,
                        stop_at_eot=False, sampler=sampler, **SAMPLER_SETTINGS[sampler])
    cached, stats = generate(model, PROMPT, settings, torch.Generator().manual_seed(0))
    reference, _ = generate(model, PROMPT, replace(settings, kv_cache=False), torch.Generator().manual_seed(0))
    assert torch.equal(cached, reference)
    assert cached.shape == (3, len(PROMPT) + 12 * context + 3)  # exactly max_new_tokens, past every end
    assert ((cached[:, len(PROMPT):] == EOT).sum(1) >= 2).any()


def test_windowed_generation_ignores_everything_before_the_window(model):
    """Black box: a prompt whose head lies before the first window; rewriting that head (other tokens,
    other document ends) changes nothing, rewriting one token inside the window does."""
    prompt = list(range(100, 120))  # blocks of 4: the first generated block starts at 20, its window at 16
    settings = Settings(num_samples=2, max_new_tokens=30, context=2 * BLOCK, sampler="ddpm", steps_per_block=4)
    assert window_start(20, BLOCK, 2 * BLOCK) == 16

    def sample(prompt):
        return generate(model, prompt, settings, torch.Generator().manual_seed(3))[0][:, 20:]

    base = sample(prompt)
    for head in ([7] * 16, [EOT] * 16, list(range(200, 216)), [1, EOT, 3, 4, EOT] + [9] * 11):
        assert torch.equal(sample(head + prompt[16:]), base)
    assert not torch.equal(sample(prompt[:17] + [7] + prompt[18:]), base)


def test_a_long_generation_keeps_the_cache_at_the_context_size(model, monkeypatch):
    sizes, new_cache = [], sample.new_cache
    monkeypatch.setattr(sample, "new_cache", lambda model, n, max_len, start: sizes.append(max_len) or
                        new_cache(model, n, max_len, start))
    settings = Settings(num_samples=1, max_new_tokens=400, context=4 * BLOCK, stop_at_eot=False,
                        sampler="first_hitting")
    tokens, stats = generate(model, PROMPT, settings, torch.Generator().manual_seed(0))
    assert tokens.size(1) == len(PROMPT) + 400 and set(sizes) == {4 * BLOCK}
    # the window moves every 2 blocks; each move re-encodes 1 or 2 blocks, in between 1 block is appended
    assert len(sizes) == (len(PROMPT) + 400 - 2 * BLOCK) // (2 * BLOCK) + 1
    assert stats.cache_appends <= 2 * len(sizes) + 1 and stats.forwards == 400


@pytest.fixture(scope="module")
def trained_model():
    """A small model trained for a few seconds on real text (the Python reference's topics), so that its
    distributions are as peaked as a real model's, with every way a rounding difference could show."""
    import pydoc_data.topics

    from data.tokenizer import get_tokenizer
    from noise import step_noise

    tokenizer = get_tokenizer()
    text = [t for doc in list(pydoc_data.topics.topics.values())[:40] for t in tokenizer.encode_ordinary(doc) + [50256]]
    torch.manual_seed(0)
    model = BD3LM(ModelConfig(n_layer=2, n_head=2, head_dim=32, model_dim=64, mlp_hidden=128, block_size=BLOCK))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        window = torch.tensor(text[step * 128:(step + 1) * 128])
        loss = model(window, step_noise(128, BLOCK, 0.0, 1.0, seed=0, step=step, chunk=0, chunks=1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item(), tokenizer.encode_ordinary("The with statement")


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_cached_forward_equals_a_full_recompute_on_a_trained_model(trained_model, sampler):
    """What holds on a trained model: each forward of the cached sampler gives the logits that a full pass over
    the same history gives, to float rounding. (Identical token streams do not follow: a draw that lands within
    that rounding of a step of the cumulative distribution can go either way.)"""
    model, final_loss, prompt = trained_model
    assert final_loss < 9.0  # it has learned something: uniform over 50257 tokens costs ln(50257) = 10.8
    cache_logits, differences = sample.cache_logits, []

    def checked_cache_logits(model, cache, block):
        logits = cache_logits(model, cache, block)
        history = torch.cat([cache.tokens[:, :cache.length], block], 1)
        full = model.logits(history, history)[:, cache.length:]
        differences.append(float((logits - full).abs().max()))
        return logits

    sample.cache_logits = checked_cache_logits
    try:
        settings = Settings(num_samples=2, max_new_tokens=60, sampler=sampler, **SAMPLER_SETTINGS[sampler])
        generate(model, prompt, settings, torch.Generator().manual_seed(7))
    finally:
        sample.cache_logits = cache_logits
    assert len(differences) >= 15 and max(differences) < 1e-4, max(differences)


# -----------------------------------------------------------------------------
# Command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(random_model(vocab_size=50257), tmp_path_factory.mktemp("checkpoints") / "final.pt")


def sample_cli(*flags):
    return subprocess.run([sys.executable, "sample.py", *flags], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_cli_prints_samples_and_a_summary(checkpoint):
    result = sample_cli(f"--checkpoint={checkpoint}", "--prompt=The history of the world is",
                        "--num_samples=2", "--max_new_tokens=9", "--show_denoising=False")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("The history of the world is") == 2
    assert "---- sample 1: 9 tokens, stopped at --max_new_tokens=9 ----" in result.stdout
    assert "░" not in result.stdout
    assert "tokens/s, NFE/token" in result.stdout.splitlines()[-1]


def test_cli_shows_sample_0_filling_in_from_mask_in_80_columns(checkpoint, capsys):
    """By default (the README's demo command): the first blocks of sample 0, each from all [MASK] to its final
    tokens one step a line, then the samples, the first of which ends with exactly those tokens' text. Through
    sample.main in-process; test_cli_prints_samples_and_a_summary runs the real command line."""
    sample.main([f"--checkpoint={checkpoint}", "--max_new_tokens=72", "--steps_per_block=4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("---- sample 0 denoised block by block")
    assert max(len(line) for line in lines[:lines.index(next(line for line in lines if "sample 0:" in line))]) <= 80
    firsts = [line for line in lines if " step  0 | " in line]
    assert [line.split(" step")[0] for line in firsts] == [f"block {i}" for i in range(sample.SHOWN_BLOCKS)]
    assert all(line.endswith("| " + "░" * BLOCK) for line in firsts)
    assert "---- sample 2: 72 tokens, stopped at --max_new_tokens=72 ----" in lines
    assert not any(line.startswith("block 4 ") for line in lines)


def test_cli_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--help"])
    assert exit_info.value.code == 0
    stdout = capsys.readouterr().out
    for name, value in asdict(Settings()).items():
        assert f"--{name}={value}" in stdout


def test_cli_bad_checkpoint_gives_one_line_and_status_2():
    result = sample_cli("--checkpoint=/no/such/file.pt")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint=/no/such/file.pt"], "does not exist"),
    (["--checkpoint={text}"], "is not a checkpoint"),
    (["--checkpoint={foreign}"], f"is not a {common.CHECKPOINT_FORMAT} checkpoint"),
    (["--checkpoint={ckpt}", "--context=6"], "--context must be a positive multiple of the block size 4"),
    (["--checkpoint={ckpt}", "--sampler=beam"], "--sampler must be first_hitting, ddpm or confidence"),
    (["--checkpoint={ckpt}", "--schedule=cubic"], "--schedule must be linear, cosine or sqrt"),
    (["--checkpoint={ckpt}", "--sampler=confidence", "--schedule=cosine"], "--schedule applies to --sampler=ddpm"),
    (["--checkpoint={ckpt}", "--threshold=1.5"], "--threshold must lie in [0, 1]"),
    (["--checkpoint={ckpt}", "--steps_per_block=0"], "--steps_per_block must be at least 1"),
    (["--checkpoint={ckpt}", "--top_p=0"], "--top_p must lie in (0, 1]"),
    (["--checkpoint={ckpt}", "--top_p=1.2"], "--top_p must lie in (0, 1]"),
    (["--checkpoint={ckpt}", "--temperature=-1"], "--temperature must not be negative"),
    (["--checkpoint={ckpt}", f"--seed={2**32}"], "--seed must lie in [0, 2**32)"),  # a CPU generator's seed bits
    (["--checkpoint={ckpt}", "--num_samples=many"], "--num_samples takes a value of type int"),
    (["--checkpoint={ckpt}", "--kv_cache=maybe"], "--kv_cache takes True or False"),
    (["--checkpoint={ckpt}", "--beam_width=4"], "unknown flag --beam_width"),
    (["--checkpoint={ckpt}", "--prompt=a", "--prompt_file=b.txt"], "not both"),
    (["--checkpoint={ckpt}", "--prompt_file=/no/such/prompt.txt"], "does not exist"),
])
def test_bad_input_gives_one_line_in_process(tmp_path, capsys, checkpoint, flags, message):
    """The same path as the command line (sample.main), without starting a process per case."""
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    paths = dict(text=tmp_path / "notes.txt", foreign=tmp_path / "foreign.pt", ckpt=checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        sample.main([flag.format(**paths) for flag in flags])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and message in stderr and len(stderr.strip().splitlines()) == 1
    assert "Traceback" not in stderr
