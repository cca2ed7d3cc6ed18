"""
model.py against slow, obvious versions of itself. Run: python -m pytest tests/test_model.py
"""

import math

import pytest
import torch
import torch.nn.functional as F

from model import (
    BD3LM,
    TILE,
    ModelConfig,
    block_diffusion_block_mask,
    block_diffusion_mask,
    document_layout,
    eval_noise,
    train_noise,
)

VOCAB, BOS = 97, 96


def small_model(block_size=4, vocab_size=VOCAB, bos_id=BOS, seed=0, **overrides) -> BD3LM:
    """A tiny model with every weight random (zero-initialized projections would hide bugs)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, n_layer=4, n_head=2, head_dim=16, model_dim=32, mlp_hidden=64,
                      block_size=block_size, bos_id=bos_id, attn_backend="sdpa", **overrides)
    model = BD3LM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def random_stream(length, gen, bos_id=BOS, vocab=VOCAB, mean_doc=20, start_mid_doc=False) -> torch.Tensor:
    """Random tokens split into documents of random length (some shorter than a block), each opening with BOS."""
    tokens = torch.randint(0, vocab - 1, (length,), generator=gen)
    tokens[tokens == bos_id] = 0
    starts = torch.rand(length, generator=gen) < 1 / mean_doc
    starts[0] = not start_mid_doc
    tokens[starts] = bos_id
    return tokens


def naive_layout(tokens, block_size, bos_id):
    """For each position: (document start index, block index inside the document), by walking back to a BOS."""
    layout = []
    for i in range(len(tokens)):
        start = i
        while start > 0 and tokens[start] != bos_id:
            start -= 1
        layout.append((start, (i - start) // block_size))
    return layout


# -----------------------------------------------------------------------------
# 1. the dense mask against a per-pair rule


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
@pytest.mark.parametrize("start_mid_doc", [False, True])
def test_dense_mask_matches_per_pair_rule(block_size, start_mid_doc):
    gen = torch.Generator().manual_seed(block_size + 10 * start_mid_doc)
    for length in (1, 7, 45):
        tokens = random_stream(length, gen, mean_doc=6, start_mid_doc=start_mid_doc)
        layout = naive_layout(tokens.tolist(), block_size, BOS)
        expected = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
        for q in range(2 * length):
            for k in range(2 * length):
                (doc_q, blk_q), (doc_k, blk_k) = layout[q % length], layout[k % length]
                q_noisy, k_noisy = q < length, k < length
                if doc_q != doc_k:
                    continue
                if q_noisy and k_noisy:
                    expected[q, k] = blk_q == blk_k
                elif q_noisy:
                    expected[q, k] = blk_k < blk_q
                elif not k_noisy:
                    expected[q, k] = blk_k <= blk_q
        mask = block_diffusion_mask(tokens, block_size, BOS)
        assert mask.shape == (2 * length, 2 * length)
        assert torch.equal(mask, expected)
        assert mask.diagonal().all()


# -----------------------------------------------------------------------------
# 2. FlexAttention's BlockMask and forward against the dense path


def block_mask_to_dense(block_mask, length):
    """Element-level mask that FlexAttention computes: full tiles all true, partial tiles through mask_mod."""
    dense = torch.zeros(length, length, dtype=torch.bool)
    q_idx, kv_idx = torch.arange(length)[:, None], torch.arange(length)[None, :]
    partial_tiles = block_mask.mask_mod(0, 0, q_idx, kv_idx)
    for counts, indices, full in ((block_mask.kv_num_blocks, block_mask.kv_indices, False),
                                  (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, True)):
        for q_tile in range(length // TILE):
            for k_tile in indices[0, 0, q_tile, : counts[0, 0, q_tile]].tolist():
                rows, cols = slice(q_tile * TILE, (q_tile + 1) * TILE), slice(k_tile * TILE, (k_tile + 1) * TILE)
                dense[rows, cols] = True if full else partial_tiles[rows, cols]
    return dense


@pytest.mark.parametrize("length,mean_doc,block_size", [(256, 30, 16), (384, 1000, 16), (256, 9, 4), (128, 50, 1)])
def test_block_mask_equals_dense_mask(length, mean_doc, block_size):
    gen = torch.Generator().manual_seed(length + mean_doc)
    tokens = random_stream(length, gen, mean_doc=mean_doc)
    block_mask = block_diffusion_block_mask(tokens, block_size, BOS)
    assert torch.equal(block_mask_to_dense(block_mask, 2 * length), block_diffusion_mask(tokens, block_size, BOS))


@pytest.mark.parametrize("length,mean_doc", [(256, 25), (384, 1000)])
def test_flex_forward_equals_sdpa_forward(length, mean_doc):
    gen = torch.Generator().manual_seed(length)
    tokens = random_stream(length, gen, mean_doc=mean_doc)
    model = small_model(block_size=16)
    noise = eval_noise(tokens, 16, BOS, seed=3, offset=0)
    x_t = torch.where(noise.masked, model.config.mask_id, tokens)
    model.config.attn_backend = "flex"
    with torch.no_grad():
        dense = model._pass(x_t[None], tokens[None], dense=True)
        flex = model._pass(x_t[None], tokens[None])
        flex_losses = model.token_losses(tokens, noise)
        model.config.attn_backend = "sdpa"
        dense_losses = model.token_losses(tokens, noise)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex_losses, dense_losses, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# 3. the vectorized [x_t ; x_0] pass against a loop over blocks


def naive_token_losses(model, tokens, noise):
    """For each block: run the clean prefix of its document followed by the noisy block, block-causally."""
    cfg = model.config
    losses = torch.zeros(len(tokens))
    layout = naive_layout(tokens.tolist(), cfg.block_size, cfg.bos_id)
    x_t = torch.where(noise.masked, cfg.mask_id, tokens)
    i = 0
    while i < len(tokens):
        doc_start, block = layout[i]
        end = i
        while end < len(tokens) and layout[end] == (doc_start, block):
            end += 1
        sequence = torch.cat([tokens[doc_start:i], x_t[i:end]])
        pos = torch.arange(len(sequence))
        block_of = pos // cfg.block_size
        mask = (block_of[None, :] <= block_of[:, None])[None, None]
        hidden, _ = model.trunk(sequence[None], pos[None], mask)
        logits = model.logits_of(hidden[0, i - doc_start:]).float()
        ce = F.cross_entropy(logits, tokens[i:end], reduction="none")
        losses[i:end] = torch.where(noise.masked[i:end], ce / noise.t[i:end], 0.0)
        i = end
    return losses


@pytest.mark.parametrize("block_size", [1, 4, 16, 128])
def test_vectorized_loss_equals_per_block_loop(block_size):
    gen = torch.Generator().manual_seed(100 + block_size)
    model = small_model(block_size=block_size)
    for start_mid_doc in (False, True):
        tokens = random_stream(96, gen, mean_doc=30, start_mid_doc=start_mid_doc)
        noise = train_noise(tokens, block_size, BOS, 0.0, 1.0, gen)
        with torch.no_grad():
            vectorized = model.token_losses(tokens, noise)
            naive = naive_token_losses(model, tokens, noise)
        assert noise.masked.any() and (vectorized > 0).sum() == noise.masked.sum()
        torch.testing.assert_close(vectorized, naive, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(tokens, noise), naive.sum() / len(tokens), rtol=1e-4, atol=1e-6)


# -----------------------------------------------------------------------------
# 4. the KV-cache path against the full pass


def test_cache_logits_equal_full_pass():
    """A batch of rows (same document boundaries, different text): prompt blocks cached at once, then
    each noisy block's cached logits against the full pass, then the block enters the cache."""
    gen = torch.Generator().manual_seed(8)
    block_size, rows, length = 4, 3, 70
    model = small_model(block_size=block_size)
    for _ in range(3):
        layout_row = random_stream(length, gen, mean_doc=15)
        x_0 = torch.stack([random_stream(length, gen, mean_doc=10**9) for _ in range(rows)])
        x_0[:, layout_row == BOS] = BOS
        masked = torch.stack([train_noise(x, block_size, BOS, 0.2, 0.9, gen).masked for x in x_0])
        masked &= x_0 != BOS  # a sampler never masks a BOS: the prompt gives it, or it ends the sample
        x_t = torch.where(masked, model.config.mask_id, x_0)
        with torch.no_grad():
            full = model.logits(x_t, x_0)
        _, _, block = document_layout(layout_row, block_size, BOS)
        cache = model.new_cache(rows, length)
        prompt_end = int((block == 2).nonzero()[0])
        model.cache_append(cache, x_0[:, :prompt_end])
        for b in range(2, int(block.max()) + 1):
            where = (block == b).nonzero().squeeze(1)
            start, end = int(where[0]), int(where[-1]) + 1
            logits = model.cache_logits(cache, x_t[:, start:end])
            torch.testing.assert_close(logits, full[:, start:end], rtol=1e-4, atol=1e-4)
            model.cache_append(cache, x_0[:, start:end])
        assert cache.length == length


# -----------------------------------------------------------------------------
# 5. uniform logits give ln(vocab) per token on average


def test_uniform_logits_average_log_vocab():
    """Uniform logits cost ln(vocab) per masked token, so the loss is ln(vocab) * sum(masked / t) / L: checked
    exactly through the model on a few windows, then its average over 4M val positions within 1%."""
    cfg = ModelConfig(n_layer=2, n_head=1, head_dim=16, model_dim=16, mlp_hidden=32, attn_backend="sdpa")
    model = BD3LM(cfg)
    with torch.no_grad():
        model.head.weight.zero_()
    gen = torch.Generator().manual_seed(5)
    chunk, chunks = 2048, 2048
    stream = random_stream(chunk * chunks, gen, bos_id=cfg.bos_id, vocab=cfg.vocab_size, mean_doc=500)
    weights = []
    for i in range(chunks):
        tokens = stream[i * chunk:(i + 1) * chunk]
        noise = eval_noise(tokens, cfg.block_size, cfg.bos_id, seed=0, offset=i * chunk)
        weights.append((noise.masked / noise.t).sum().item() / chunk)
        if i < 3:
            with torch.no_grad():
                loss = model(tokens, noise).item()
            assert loss == pytest.approx(math.log(cfg.vocab_size) * weights[-1], rel=1e-5)
    assert abs(sum(weights) / chunks - 1) < 0.01


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
    cfg = ModelConfig(n_layer=2, n_head=2, head_dim=32, model_dim=64, mlp_hidden=128, attn_backend="sdpa")
    torch.manual_seed(0)
    model = BD3LM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    window = stream[:512]
    noise = eval_noise(window, cfg.block_size, cfg.bos_id, seed=0, offset=0)
    with torch.no_grad():
        before = model(window, noise).item()
    for step in range(12):
        loss = model(window, train_noise(window, cfg.block_size, cfg.bos_id, 0.3, 0.8, gen))
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
    model = small_model(block_size=16)
    model.config.attn_backend = "flex"
    noise = eval_noise(tokens, 16, BOS, seed=0, offset=0)
    with torch.no_grad():
        eager = model.token_losses(tokens, noise)
        model.trunk.compile()
        compiled = model.token_losses(tokens, noise)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_matches_fp32():
    gen = torch.Generator().manual_seed(12)
    tokens = random_stream(256, gen, mean_doc=40)
    model = small_model(block_size=16)
    noise = eval_noise(tokens, 16, BOS, seed=0, offset=0)
    with torch.no_grad():
        fp32 = model(tokens, noise)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(tokens, noise)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=3e-2, atol=0)


# -----------------------------------------------------------------------------
# noise and input checks


def test_eval_noise_depends_only_on_global_position():
    gen = torch.Generator().manual_seed(13)
    tokens = random_stream(500, gen, mean_doc=40)
    whole = eval_noise(tokens, 16, BOS, seed=4, offset=1000)
    split = int((tokens == BOS).nonzero()[3])
    for lo, hi in ((0, split), (split, len(tokens))):
        part = eval_noise(tokens[lo:hi], 16, BOS, seed=4, offset=1000 + lo)
        assert torch.equal(part.t, whole.t[lo:hi]) and torch.equal(part.masked, whole.masked[lo:hi])
    assert not torch.equal(eval_noise(tokens, 16, BOS, seed=5, offset=1000).masked, whole.masked)


def test_noise_is_constant_per_block_and_in_range():
    gen = torch.Generator().manual_seed(14)
    tokens = random_stream(4000, gen, mean_doc=40)
    _, _, block = document_layout(tokens, 16, BOS)
    for noise, lo, hi in ((train_noise(tokens, 16, BOS, 0.3, 0.8, gen), 0.3, 0.8),
                          (eval_noise(tokens, 16, BOS, seed=1, offset=0), 0.0, 1.0)):
        assert noise.t.min() >= lo and noise.t.max() <= hi
        same_block = block[1:] == block[:-1]
        assert torch.equal(noise.t[1:][same_block], noise.t[:-1][same_block])
        assert abs(noise.masked.float().mean() - noise.t.mean()) < 0.03


def test_bad_input_raises_value_error():
    model = small_model()
    noise = eval_noise(torch.zeros(8, dtype=torch.long), 4, BOS, 0, 0)
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
    with pytest.raises(ValueError, match="attn_backend"):
        BD3LM(ModelConfig(attn_backend="xformers"))
    with pytest.raises(ValueError, match="divisible by 128"):
        block_diffusion_block_mask(torch.zeros(100, dtype=torch.long), 16, BOS)


def test_record_config_fits_the_rules():
    cfg = ModelConfig()
    with torch.device("meta"):
        model = BD3LM(cfg)
    assert model.num_params() <= 162_000_000
    assert cfg.block_size == 16 and cfg.mask_id == 50257 and cfg.padded_vocab % 128 == 0
    assert model.head.weight.shape[0] == cfg.padded_vocab
