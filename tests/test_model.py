"""
model.py against slow, obvious versions of itself, and black-box checks of what a prediction may see.
Run: python -m pytest tests/test_model.py
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import EOT, VOCAB, naive_token_losses, random_stream, small_model, tricky_streams

import sample
from model import BD3LM, TILE, ModelConfig, block_diffusion_block_mask, block_diffusion_mask
from eval import iid_noise
from noise import eval_noise, hash_uniform, train_noise
from sample import SCHEDULES

# -----------------------------------------------------------------------------
# 1. the dense mask against a per-pair rule written from its three lines


def document_of(tokens, i):
    """The number of <|endoftext|> strictly before position i."""
    return sum(1 for j in range(i) if tokens[j] == EOT)


def rule_allows(tokens, block_size, q, k):
    """The three lines of the rule, for one pair of positions of [x_t ; x_0] (the first L are noisy)."""
    length = len(tokens)
    q_noisy, k_noisy = q < length, k < length
    q, k = q % length, k % length
    block_q, block_k = q // block_size, k // block_size
    if q_noisy and k_noisy:
        return block_q == block_k
    if q_noisy:  # the key must be in the document where the query's block starts
        return block_k < block_q and document_of(tokens, k) == document_of(tokens, block_q * block_size)
    if not k_noisy:
        return block_k <= block_q and document_of(tokens, k) == document_of(tokens, q)
    return False


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_dense_mask_matches_per_pair_rule(block_size):
    gen = torch.Generator().manual_seed(block_size)
    for length in (1, 7, 45):
        for tokens in tricky_streams(length, block_size, gen):
            ids = tokens.tolist()
            expected = torch.tensor([[rule_allows(ids, block_size, q, k) for k in range(2 * length)]
                                     for q in range(2 * length)])
            mask = block_diffusion_mask(tokens, block_size, EOT)
            assert mask.shape == (2 * length, 2 * length)
            assert torch.equal(mask, expected)
            assert mask.diagonal().all()  # no empty attention row


def test_mask_of_a_batch_is_the_mask_of_each_row():
    gen = torch.Generator().manual_seed(2)
    rows = torch.stack(tricky_streams(40, 4, gen))
    batched = block_diffusion_mask(rows, 4, EOT)
    for row, mask in zip(rows, batched):
        assert torch.equal(mask, block_diffusion_mask(row, 4, EOT))


# -----------------------------------------------------------------------------
# 2. FlexAttention's BlockMask and forward against the dense path


def block_mask_to_dense(block_mask, length, row=0):
    """Element-level mask that FlexAttention computes for batch row `row`: full tiles all true, partial tiles
    through mask_mod."""
    dense = torch.zeros(length, length, dtype=torch.bool)
    q_idx, kv_idx = torch.arange(length)[:, None], torch.arange(length)[None, :]
    partial_tiles = block_mask.mask_mod(torch.tensor(row), 0, q_idx, kv_idx)
    for counts, indices, full in ((block_mask.kv_num_blocks, block_mask.kv_indices, False),
                                  (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, True)):
        for q_tile in range(length // TILE):
            for k_tile in indices[row, 0, q_tile, : counts[row, 0, q_tile]].tolist():
                rows, cols = slice(q_tile * TILE, (q_tile + 1) * TILE), slice(k_tile * TILE, (k_tile + 1) * TILE)
                dense[rows, cols] = True if full else partial_tiles[rows, cols]
    return dense


def tiles_needed(dense):
    """How many TILE x TILE tiles of a dense mask hold at least one allowed pair."""
    n = dense.size(0) // TILE
    return int(dense.view(n, TILE, n, TILE).any(-1).any(1).sum())


@pytest.mark.parametrize("length,block_size", [(256, 16), (384, 16), (256, 4), (128, 1), (256, 128), (256, 256)])
def test_block_mask_equals_dense_mask_and_skips_every_empty_tile(length, block_size):
    gen = torch.Generator().manual_seed(length + block_size)
    for tokens in tricky_streams(length, block_size, gen) + [random_stream(length, gen, mean_doc=100)]:
        block_mask = block_diffusion_block_mask(tokens, block_size, EOT)
        dense = block_diffusion_mask(tokens, block_size, EOT)
        assert torch.equal(block_mask_to_dense(block_mask, 2 * length), dense)
        computed = int(block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum())
        assert computed >= tiles_needed(dense)  # never skips a tile it needs
        if block_size > 1:  # exact on these streams; with documents much shorter than a block the per-tile
            assert computed == tiles_needed(dense)  # summaries may list a tile that turns out empty (harmless)


def test_block_mask_of_a_batch_is_the_mask_of_each_row():
    """Rows of different document layouts in one BlockMask: row r's mask is the dense mask of row r alone."""
    gen = torch.Generator().manual_seed(5)
    rows = torch.stack(tricky_streams(256, 16, gen) + [random_stream(256, gen, mean_doc=100)])
    block_mask = block_diffusion_block_mask(rows, 16, EOT)
    assert block_mask.kv_num_blocks.shape == (len(rows), 1, 4)
    for r, row in enumerate(rows):
        assert torch.equal(block_mask_to_dense(block_mask, 512, row=r), block_diffusion_mask(row, 16, EOT))


def test_block_mask_skips_cross_document_tiles():
    """Two 256-token documents: no tile pairs a query of one with a clean key of the other."""
    tokens = torch.randint(0, EOT, (512,), generator=torch.Generator().manual_seed(1))
    tokens[255] = EOT  # the first document ends on the last slot of block 15, tile 1
    block_mask = block_diffusion_block_mask(tokens, 16, EOT)
    dense = block_mask_to_dense(block_mask, 1024)
    second_doc_queries = torch.cat([torch.arange(256, 512), torch.arange(768, 1024)])
    first_doc_clean_keys = torch.arange(512, 768)
    assert not dense[second_doc_queries][:, first_doc_clean_keys].any()
    kv = block_mask.kv_indices[0, 0]
    for q_tile in (2, 3, 6, 7):  # tiles of the second document's queries, noisy and clean
        listed = set(kv[q_tile, : block_mask.kv_num_blocks[0, 0, q_tile]].tolist())
        listed |= set(block_mask.full_kv_indices[0, 0, q_tile, : block_mask.full_kv_num_blocks[0, 0, q_tile]].tolist())
        assert not listed & {4, 5}


@pytest.mark.parametrize("length,mean_doc", [(256, 25), (384, 10**9)])
def test_flex_forward_equals_sdpa_forward(length, mean_doc):
    gen = torch.Generator().manual_seed(length)
    tokens = random_stream(length, gen, mean_doc=mean_doc)
    model = small_model(block_size=16, n_layer=2)
    noise = eval_noise(length, 16, seed=3, offset=0)
    x_t = torch.where(noise.masked, model.config.mask_id, tokens)
    with torch.no_grad():
        dense = model._pass(x_t[None], tokens[None], dense=True)
        dense_losses = model.token_losses(tokens, noise)
        model.compile_loss("aot_eager", flex=True)  # flex runs compiled only: every eager pass takes sdpa
        flex = torch.compile(model._pass, backend="aot_eager", fullgraph=True)(x_t[None], tokens[None])
        flex_losses = model.token_losses(tokens, noise)
    assert model.flex
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex_losses, dense_losses, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_losses_of_a_batch_are_the_losses_of_each_row(backend):
    """N sequences in one pass: each row's losses equal that row run alone, and its documents stay in it."""
    gen = torch.Generator().manual_seed(9)
    rows = torch.stack([random_stream(256, gen, mean_doc=m) for m in (10, 60, 10**9)])
    noise = [train_noise(256, 16, 0.0, 1.0, gen) for _ in rows]
    batch_noise = type(noise[0])(*(torch.stack(parts) for parts in zip(*noise)))
    model = small_model(block_size=16)
    if backend == "flex":  # flex runs compiled only
        model.compile_loss("aot_eager", flex=True)
    with torch.no_grad():
        batched = model.token_losses(rows, batch_noise)
        alone = torch.stack([model.token_losses(row, row_noise) for row, row_noise in zip(rows, noise)])
        mean = model(rows, batch_noise)
    assert batched.shape == rows.shape
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, alone.sum() / rows.numel(), atol=1e-6, rtol=1e-5)


def test_a_row_does_not_see_the_other_rows():
    """Black box: rewriting every other row (tokens, document ends, noise) leaves row 0's losses unchanged."""
    gen = torch.Generator().manual_seed(10)
    model = small_model(block_size=4)
    rows = torch.stack([random_stream(64, gen) for _ in range(3)])
    noise = train_noise(3 * 64, 4, 0.0, 1.0, gen)
    noise = type(noise)(*(x.view(3, 64) for x in noise))
    with torch.no_grad():
        before = model.token_losses(rows, noise)[0]
        rows[1:] = torch.stack([random_stream(64, gen, mean_doc=3) for _ in range(2)])
        noise.masked[1:] = ~noise.masked[1:]
        after = model.token_losses(rows, noise)[0]
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_loss_refuses_noise_of_another_shape():
    model = small_model()
    tokens = torch.randint(0, EOT, (2, 8))
    with pytest.raises(ValueError, match="noise of shape"):
        model.token_losses(tokens, train_noise(16, 4, 0.3, 0.8, torch.Generator()))


# -----------------------------------------------------------------------------
# 3. black box: what the logits of a noisy block may depend on


def other_token(token, gen, eot_allowed=True):
    """A different real token, <|endoftext|> included when allowed."""
    choices = [t for t in range(VOCAB) if t != token and (eot_allowed or t != EOT)]
    return choices[int(torch.randint(len(choices), (1,), generator=gen))]


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_noisy_block_sees_only_its_noisy_tokens_and_its_documents_clean_past(block_size):
    """Perturb everything block b must not depend on: x_t outside block b, every clean token of block b and
    after (inserting, moving and deleting <|endoftext|>), and the other documents before it (their text and
    their boundaries). Its logits do not move. Change a clean earlier token of its document: they do."""
    gen = torch.Generator().manual_seed(20 + block_size)
    model = small_model(block_size=block_size)
    length = 48
    for trial in range(12):
        x_0 = random_stream(length, gen, mean_doc=[6, 15, 40][trial % 3])
        masked = torch.rand(length, generator=gen) < 0.5
        x_t = torch.where(masked, model.config.mask_id, x_0)
        b = int(torch.randint(1, length // block_size, (1,), generator=gen))
        start, end = b * block_size, (b + 1) * block_size
        eots_before = (x_0[:start] == EOT).nonzero().squeeze(1)
        doc_start = int(eots_before[-1]) + 1 if len(eots_before) else 0  # first token of block b's document
        with torch.no_grad():
            reference = model.logits(x_t[None], x_0[None])[0, start:end]

        for _ in range(6):
            y_t, y_0 = x_t.clone(), x_0.clone()
            outside = torch.ones(length, dtype=torch.bool)
            outside[start:end] = False
            y_t[outside] = torch.where(torch.rand(length, generator=gen) < 0.5, model.config.mask_id,
                                       torch.randint(0, VOCAB, (length,), generator=gen))[outside]
            y_0[start:] = random_stream(length - start, gen, mean_doc=3)  # EOTs inserted, moved, deleted
            if doc_start > 1:  # other documents: any text, any boundaries, as long as the last one stays
                y_0[: doc_start - 1] = random_stream(doc_start - 1, gen, mean_doc=4)
            with torch.no_grad():
                moved = model.logits(y_t[None], y_0[None])[0, start:end]
            torch.testing.assert_close(moved, reference, rtol=0, atol=1e-5)

        if doc_start < start:  # the block has clean context in its document: a change there must show
            i = int(torch.randint(doc_start, start, (1,), generator=gen))
            y_0 = x_0.clone()
            y_0[i] = other_token(int(x_0[i]), gen, eot_allowed=False)
            with torch.no_grad():
                moved = model.logits(x_t[None], y_0[None])[0, start:end]
            assert (moved - reference).abs().max() > 1e-3
        if doc_start > 0:  # removing the end of the previous document joins it to block b's context
            y_0 = x_0.clone()
            y_0[doc_start - 1] = other_token(EOT, gen, eot_allowed=False)
            with torch.no_grad():
                moved = model.logits(x_t[None], y_0[None])[0, start:end]
            assert (moved - reference).abs().max() > 1e-3


# -----------------------------------------------------------------------------
# 4. the vectorized [x_t ; x_0] pass against a loop over blocks


@pytest.mark.parametrize("block_size", [1, 4, 16, 96, 128])
def test_vectorized_loss_equals_per_block_loop(block_size):
    """Block size 1 is an autoregressive model with document masking; 96 and 128 (>= L) are MDLM."""
    gen = torch.Generator().manual_seed(100 + block_size)
    model = small_model(block_size=block_size)
    eot_losses = []
    for tokens in tricky_streams(96, block_size, gen):
        noise = train_noise(96, block_size, 0.0, 1.0, gen)
        with torch.no_grad():
            vectorized = model.token_losses(tokens, noise)
            naive = naive_token_losses(model, tokens, noise)
        assert noise.masked.any() and (vectorized > 0).sum() == noise.masked.sum()
        torch.testing.assert_close(vectorized, naive, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(tokens, noise), naive.sum() / len(tokens), rtol=1e-4, atol=1e-6)
        eot_losses.append(vectorized[(tokens == EOT) & noise.masked])
    eot_losses = torch.cat(eot_losses)
    assert len(eot_losses) > 0 and (eot_losses > 0).all()  # <|endoftext|> is a target like any token


# -----------------------------------------------------------------------------
# 5. the KV-cache path against the full pass


def test_cache_logits_equal_full_pass():
    """A batch of rows with different documents: a prompt of several blocks cached at once, then each noisy
    block's cached logits against the full pass, then the block enters the cache. <|endoftext|> falls on block
    edges and inside blocks, in the prompt and in the noisy blocks, where it may be masked or not."""
    gen = torch.Generator().manual_seed(8)
    block_size, length = 4, 70
    model = small_model(block_size=block_size)
    for _ in range(3):
        x_0 = torch.stack(tricky_streams(length, block_size, gen))
        masked = torch.stack([train_noise(length, block_size, 0.2, 0.9, gen).masked for _ in x_0])
        x_t = torch.where(masked, model.config.mask_id, x_0)
        with torch.no_grad():
            full = model.logits(x_t, x_0)
        cache = sample.new_cache(model, len(x_0), length)
        sample.cache_append(model, cache, x_0[:, : 3 * block_size])
        for start in range(3 * block_size, length, block_size):
            end = min(start + block_size, length)
            logits = sample.cache_logits(model, cache, x_t[:, start:end])
            torch.testing.assert_close(logits, full[:, start:end], rtol=1e-4, atol=1e-4)
            sample.cache_append(model, cache, x_0[:, start:end])
        assert cache.length == length


def test_cache_refuses_unaligned_blocks():
    model = small_model(block_size=4)
    cache = sample.new_cache(model, 1, 16)
    with pytest.raises(ValueError, match="end on a block boundary"):
        sample.cache_append(model, cache, torch.zeros(1, 3, dtype=torch.long))
    sample.cache_append(model, cache, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="fit one block"):
        sample.cache_logits(model, cache, torch.zeros(1, 5, dtype=torch.long))


# -----------------------------------------------------------------------------
# 6. <|endoftext|> is learnable


def test_end_of_text_is_learned_where_a_document_ends():
    """Documents of random length and random text (ids 1-9) that end with a marker (id 0) and then
    <|endoftext|>. A tiny model trained for a few seconds must predict <|endoftext|> right after the marker and
    nowhere else. Each query sees only the true past: every later clean token is replaced by random text without
    <|endoftext|>, so a rule that read the document's end from x_0 (the old one, under which <|endoftext|> was a
    target only at a document's first position, with no past) is left with its training signal alone. That
    signal pushes <|endoftext|> down at every position with a past, so under the old rule the probability after
    the marker stays near that of any other position: it cannot pass by chance."""
    vocab, marker, block_size, length = 12, 0, 4, 128
    eot = vocab - 1  # <|endoftext|> is the vocabulary's last id
    gen = torch.Generator().manual_seed(0)

    def documents(n_tokens):
        tokens = []
        while len(tokens) < n_tokens:
            size = int(torch.randint(1, 12, (1,), generator=gen))
            tokens += torch.randint(1, 10, (size,), generator=gen).tolist() + [marker, eot]
        return torch.tensor(tokens[:n_tokens])

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, head_dim=16, model_dim=32, mlp_hidden=64,
                      block_size=block_size)
    model = BD3LM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(300):
        tokens = documents(length)
        loss = model(tokens, train_noise(length, block_size, 0.0, 1.0, gen))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    tokens = documents(length)
    positions = torch.arange(block_size, length)
    x_t, x_0 = tokens.repeat(len(positions), 1), tokens.repeat(len(positions), 1)
    for row, i in enumerate(positions.tolist()):  # query i: the tokens before it given, i and later masked
        start = i - i % block_size
        x_t[row, i:start + block_size] = cfg.mask_id
        x_0[row, start:] = torch.randint(1, 10, (length - start,), generator=gen)
    with torch.no_grad():
        probs = torch.softmax(model.logits(x_t, x_0), -1)
    p_eot = probs[torch.arange(len(positions)), positions, eot]
    after_marker = tokens[positions - 1] == marker
    assert after_marker.sum() > 10
    assert p_eot[after_marker].mean() > 0.9 and p_eot[after_marker].min() > 0.5, p_eot[after_marker]
    assert p_eot[~after_marker].mean() < 0.05, p_eot[~after_marker]


# -----------------------------------------------------------------------------
# 5. the noise schedules against their formulas, and uniform logits give ln(vocab) per token on average

# alpha_t (the chance a token is still clean at time t) of each schedule, written from nano-dlm's table
ALPHA = {"linear": lambda t: 1 - t, "cosine": lambda t: math.cos(math.pi / 2 * t) ** 2, "sqrt": lambda t: 1 - t**0.5}


def reference_weight(schedule):
    """-alpha'(t) / (1 - alpha(t)), the continuous-time NELBO's weight, with alpha' by central differences."""
    alpha = ALPHA[schedule]
    return lambda t: -(alpha(t + 1e-6) - alpha(t - 1e-6)) / 2e-6 / (1 - alpha(t))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_matches_its_formula(schedule):
    s, alpha = SCHEDULES[schedule], ALPHA[schedule]
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    torch.testing.assert_close(s.mask_prob(t), torch.tensor([1 - alpha(x) for x in t.tolist()], dtype=torch.float64))
    torch.testing.assert_close(s.weight(t), torch.tensor([reference_weight(schedule)(x) for x in t.tolist()],
                                                         dtype=torch.float64), rtol=1e-6, atol=0)
    ends = s.mask_prob(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ends.tolist() == pytest.approx([0.0, 1.0], abs=1e-12)
    # the integral of the NELBO's weight times the masking probability from a to 1 is 1 - p(a) (quadrature), so
    # from 0 it is 1: under uniform logits every schedule's expected loss is ln(vocab)
    a, u = 0.01, (torch.arange(10**6, dtype=torch.float64) + 0.5) / 10**6
    integral = (1 - a) * float((s.weight(a + (1 - a) * u) * s.mask_prob(a + (1 - a) * u)).mean())
    assert integral == pytest.approx(1 - (1 - alpha(a)), abs=1e-9)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_uniform_logits_average_log_vocab(schedule):
    """Uniform logits cost ln(vocab) per masked token, so the loss is ln(vocab) * sum(masked * weight(t)) / L:
    checked exactly through the model on a few windows, then its average over 4M val positions within 1%."""
    cfg = ModelConfig(n_layer=2, n_head=1, head_dim=16, model_dim=16, mlp_hidden=32)
    model = BD3LM(cfg)
    with torch.no_grad():
        model.head.weight.zero_()
    gen = torch.Generator().manual_seed(5)
    chunk, chunks = 2048, 2048
    stream = random_stream(chunk * chunks, gen, eot_id=cfg.eot_id, vocab=cfg.vocab_size, mean_doc=500)
    weights = []
    for i in range(chunks):
        tokens = stream[i * chunk:(i + 1) * chunk]
        noise = iid_noise(chunk, cfg.block_size, seed=0, offset=i * chunk, schedule=schedule)
        weights.append(noise.weight.sum().item() / chunk)
        if i < 3:
            with torch.no_grad():
                loss = model(tokens, noise).item()
            assert loss == pytest.approx(math.log(cfg.vocab_size) * weights[-1], rel=1e-5)
    assert abs(sum(weights) / chunks - 1) < 0.01


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_training_and_val_losses_equal_the_per_token_reference_of_the_schedule(schedule):
    """The vectorized loss under training and validation noise against the per-block loop; val's iid noise masks
    each block with the schedule's probability at its hashed t and weighs it by the schedule's own formula."""
    gen = torch.Generator().manual_seed(21)
    model = small_model(block_size=4)
    for tokens in tricky_streams(64, 4, gen):
        for noise in (train_noise(64, 4, 0.2, 0.9, gen), iid_noise(64, 4, 3, 64, schedule),
                      eval_noise(64, 4, 3, 64)):
            with torch.no_grad():
                torch.testing.assert_close(model.token_losses(tokens, noise), naive_token_losses(model, tokens, noise),
                                           rtol=1e-4, atol=1e-4)
    noise = iid_noise(400_000, 16, 8, 0, schedule)
    t = hash_uniform(16, torch.arange(0, 400_000, 16)).float()  # each block's level: its t on [0, 1]
    expected = torch.tensor([reference_weight(schedule)(x) for x in t.tolist()]).repeat_interleave(16)
    torch.testing.assert_close(noise.weight[noise.masked], expected[noise.masked].float(), rtol=1e-4, atol=1e-6)
    mask_prob = torch.tensor([1 - ALPHA[schedule](x) for x in t.tolist()])
    assert abs(noise.masked.view(-1, 16).float().mean(1).mean() - mask_prob.mean()) < 0.003


# -----------------------------------------------------------------------------
# 6. training on real text


def real_text_tokens():
    import pydoc_data.topics

    from data.tokenizer import EOT, get_tokenizer
    enc = get_tokenizer()
    docs = list(pydoc_data.topics.topics.values())[:60]
    return torch.tensor([t for doc in docs for t in [EOT] + enc.encode_ordinary(doc)])


def test_optimizer_steps_on_real_text():
    stream = real_text_tokens()
    cfg = ModelConfig(n_layer=2, n_head=2, head_dim=32, model_dim=64, mlp_hidden=128)
    torch.manual_seed(0)
    model = BD3LM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    window = stream[:512]
    noise = eval_noise(len(window), cfg.block_size, seed=0, offset=0)
    with torch.no_grad():
        before = model(window, noise).item()
    for step in range(12):
        loss = model(window, train_noise(len(window), cfg.block_size, 0.3, 0.8, gen))
        optimizer.zero_grad()
        loss.backward()
        if step >= 2:  # the zero-initialized head, then the zero-initialized projections, block gradients at first
            for name, p in model.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(loss)
        optimizer.step()
    with torch.no_grad():
        after = model(window, noise).item()
    assert math.isfinite(after) and after < before - 0.5


# -----------------------------------------------------------------------------
# 7. what the GPU path does, as far as this CPU allows


def test_compiled_flex_eval_matches_eager():
    gen = torch.Generator().manual_seed(11)
    tokens = random_stream(256, gen, mean_doc=40)
    model = small_model(block_size=16, n_layer=2)  # Inductor's C++ compile time grows with the layers
    model.flex = True  # as compile_loss(flex=True) chooses; this test compiles the pass itself, under Inductor
    x_t = torch.where(eval_noise(len(tokens), 16, seed=0, offset=0).masked, model.config.mask_id, tokens)[None]
    with torch.no_grad():
        eager = model._pass(x_t, tokens[None])  # sdpa: flex runs compiled only
        compiled = torch.compile(model._pass, fullgraph=True)(x_t, tokens[None])  # the BlockMask and flex, Inductor
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_matches_fp32():
    gen = torch.Generator().manual_seed(12)
    tokens = random_stream(256, gen, mean_doc=40)
    model = small_model(block_size=16)
    noise = eval_noise(len(tokens), 16, seed=0, offset=0)
    with torch.no_grad():
        fp32 = model(tokens, noise)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(tokens, noise)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=3e-2, atol=0)


# -----------------------------------------------------------------------------
# noise and input checks


@pytest.mark.parametrize("noise_of", [lambda *place: iid_noise(*place, "linear"), eval_noise], ids=["iid", "exact_k"])
def test_eval_noise_depends_only_on_global_position(noise_of):
    whole = noise_of(512, 16, 4, 1024)
    for lo, hi in ((0, 160), (160, 512)):
        part = noise_of(hi - lo, 16, 4, 1024 + lo)
        assert torch.equal(part.weight, whole.weight[lo:hi]) and torch.equal(part.masked, whole.masked[lo:hi])
    assert not torch.equal(noise_of(512, 16, 5, 1024).masked, whole.masked)
    assert not torch.equal(noise_of(512, 16, 4, 1536).masked, whole.masked)


def test_noise_is_constant_per_block_and_in_range():
    """A masked token weighs 1 / t of its block, t in [lo, hi], the same for the whole block, and the masked
    fraction is the mean t; under exact_k (the val default) a block of k masked tokens weighs 16 / k."""
    gen = torch.Generator().manual_seed(14)
    for noise, lo, hi in ((train_noise(4000, 16, 0.3, 0.8, gen), 0.3, 0.8),
                          (iid_noise(4000, 16, seed=1, offset=0, schedule="linear"), 0.0, 1.0)):
        assert (noise.weight[~noise.masked] == 0).all()
        for masked, weight in zip(noise.masked[:3968].view(-1, 16), noise.weight[:3968].view(-1, 16)):
            if masked.any():
                first = weight[masked][0]
                assert (weight[masked] == first).all() and 1 / hi - 1e-6 <= first <= 1 / max(lo, 1e-9) + 1e-3
        assert abs(noise.masked.float().mean() - (lo + hi) / 2) < 0.03
    noise = eval_noise(4000, 16, seed=1, offset=0)
    masked, weight = noise.masked[:3968].view(-1, 16), noise.weight[:3968].view(-1, 16)
    k = masked.sum(1)
    assert k.min() >= 1 and torch.equal(weight, torch.where(masked, 16 / k[:, None].float(), 0.0))


def test_bad_input_raises_value_error():
    model = small_model()
    noise = eval_noise(8, 4, 0, 0)
    with pytest.raises(ValueError, match="token ids must lie"):
        model(torch.full((8,), VOCAB), noise)
    with pytest.raises(ValueError, match="token ids must lie"):
        model(torch.full((8,), -1), noise)
    with pytest.raises(ValueError, match="non-empty"):
        model(torch.zeros(0, dtype=torch.long), noise)
    with pytest.raises(ValueError, match="block_size"):
        BD3LM(ModelConfig(block_size=0))
    with pytest.raises(ValueError, match="n_layer must be even"):
        BD3LM(ModelConfig(n_layer=3))
    with pytest.raises(ValueError, match="divisible by 128"):
        block_diffusion_block_mask(torch.zeros(100, dtype=torch.long), 16, EOT)


def test_record_config_fits_the_rules():
    cfg = ModelConfig()
    with torch.device("meta"):
        model = BD3LM(cfg)
    assert model.num_params() <= 162_000_000
    assert cfg.block_size == 16 and cfg.mask_id == 50257 and cfg.padded_vocab % 128 == 0
    assert model.head.weight.shape[0] == cfg.padded_vocab


def test_attention_gets_one_dtype_when_the_norm_returns_fp32(monkeypatch):
    """What CUDA autocast does to QK-norm (rms_norm in fp32, v in bf16), simulated on CPU: q, k and v reach the
    attention call in v's dtype."""
    import model as model_module

    seen, sdpa = [], F.scaled_dot_product_attention

    def fp32_norm(x):
        return F.rms_norm(x.float(), (x.size(-1),))

    def recording_sdpa(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(model_module, "norm", fp32_norm)
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", recording_sdpa)
    model = small_model(block_size=4)
    noise = eval_noise(32, 4, seed=0, offset=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(random_stream(32, torch.Generator().manual_seed(3)), noise)
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen)


def test_flex_backward_tiles_are_chosen_from_the_gpus_shared_memory(monkeypatch):
    """Faked device properties: 24 GB consumer cards (sm_86, sm_89: 101,376 bytes per block) get backward tiles
    that divide the 128-token tile; an A100 or H100 keeps the autotuned defaults. The options reach the call."""
    from types import SimpleNamespace

    import model as model_module

    rtx_3090 = SimpleNamespace(name="NVIDIA GeForce RTX 3090", major=8, minor=6, shared_memory_per_block=49_152,
                               shared_memory_per_block_optin=101_376)
    rtx_4090 = SimpleNamespace(name="NVIDIA GeForce RTX 4090", major=8, minor=9, shared_memory_per_block=49_152,
                               shared_memory_per_block_optin=101_376)
    a100 = SimpleNamespace(name="NVIDIA A100", major=8, minor=0, shared_memory_per_block=49_152,
                           shared_memory_per_block_optin=166_912)
    h100 = SimpleNamespace(name="NVIDIA H100", major=9, minor=0, shared_memory_per_block=49_152,
                           shared_memory_per_block_optin=232_448)
    for props in (rtx_3090, rtx_4090):
        options = model_module.flex_kernel_options(props)
        tiles = {"fwd_BLOCK_M", "fwd_BLOCK_N", "bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2"}
        assert set(options) == tiles | {"fwd_num_stages"}
        assert all(TILE % options[name] == 0 for name in tiles)
    assert model_module.flex_kernel_options(a100) == model_module.flex_kernel_options(h100) == {}

    seen, flex = [], model_module.flex_attention

    def recording_flex(*args, **kwargs):
        seen.append(kwargs["kernel_options"])
        return flex(*args, **kwargs)

    monkeypatch.setattr(model_module, "flex_attention", recording_flex)
    model = small_model(block_size=16)
    model.set_flex_options(model_module.flex_kernel_options(rtx_3090))
    model.compile_loss("aot_eager", flex=True)  # flex runs compiled only
    with torch.no_grad():
        model(random_stream(128, torch.Generator().manual_seed(4)), eval_noise(128, 16, seed=0, offset=0))
    assert len(seen) == model.config.n_layer and all(options == model_module.flex_kernel_options(rtx_3090)
                                                     for options in seen)
