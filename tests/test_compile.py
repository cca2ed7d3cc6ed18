"""The compiled loss (BD3LM.compile_loss) and train.py's warm-up before the clock, on CPU.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_compile.py

The GPU compiles the same code with Inductor and FlexAttention. What a CPU can check of it: one graph for training
and one for evaluation, whatever the documents and masks, with no recompile after the first step (the sdpa backend
under aot_eager, which traces forward and backward as Inductor does and runs them eagerly: fast to compile); the
same loss and gradients as eager and as the per-block loop under Inductor; a flex graph that builds its BlockMask
inside (forward only: flex attention has no backward on CPU); and a warm-up that changes nothing in the run.
"""

import copy
import math
import re
import sys

import pytest
import torch
from conftest import (
    EOT,
    REPO,
    SMALL,
    TRAINED,
    VOCAB,
    CountingBackend,
    load_final,
    naive_token_losses,
    read_log,
    run_train,
    tricky_streams,
    val_losses,
)
from torch._dynamo.utils import counters

import train
from data.loader import TokenLoader
from data.shards import read_shard, write_shard
from model import BD3LM, ModelConfig
from noise import Noise, eval_noise, train_noise


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def tiny_model(block_size: int = 4) -> BD3LM:
    """Two layers, every weight random (the zero-initialized head and projections would hide differences)."""
    torch.manual_seed(0)
    model = BD3LM(ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=2, head_dim=16, model_dim=32, mlp_hidden=64,
                              block_size=block_size))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def documents(length: int, gen: torch.Generator) -> torch.Tensor:
    """Random tokens that <|endoftext|> cuts into documents, at a new rate each call (none at all included)."""
    tokens = torch.randint(0, EOT, (length,), generator=gen)
    tokens[torch.rand(length, generator=gen) < 0.3 * torch.rand((), generator=gen)] = EOT
    return tokens


def loss_and_grads(model: BD3LM, tokens, noise) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = model(tokens, noise)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def training_batch(rows: int, length: int, block_size: int, gen: torch.Generator):
    """One sequence [length] (rows 0) or `rows` stacked sequences [rows, length], each with its own documents, and
    their training noise with t from 0 (blocks with no masked token at all)."""
    if not rows:
        return documents(length, gen), train_noise(length, block_size, 0.0, 1.0, gen)
    noises = [train_noise(length, block_size, 0.0, 1.0, gen) for _ in range(rows)]
    return torch.stack([documents(length, gen) for _ in range(rows)]), Noise(*map(torch.stack, zip(*noises)))


@pytest.mark.parametrize("rows", [0, 3])
def test_one_graph_for_training_and_one_for_evaluation_whatever_the_documents_and_masks(rows):
    """20 steps, each with new documents, a new mask and a new noise level per block, an optimizer step between
    them; the compiled loss and its gradients equal eager ones. With rows, training stacks several sequences per
    micro-step (--micro_batch) while validation keeps one."""
    compiled, backend = tiny_model(), CountingBackend()
    eager = copy.deepcopy(compiled)
    compiled.compile_loss(backend)
    gen = torch.Generator().manual_seed(0)
    for step in range(20):
        tokens, noise = training_batch(rows, 64, 4, gen)
        (loss, grads), (eager_loss, eager_grads) = (loss_and_grads(m, tokens, noise) for m in (compiled, eager))
        torch.testing.assert_close(loss, eager_loss)
        for grad, eager_grad in zip(grads, eager_grads):
            torch.testing.assert_close(grad, eager_grad)
        with torch.no_grad():
            for model in (compiled, eager):
                for p, grad in zip(model.parameters(), grads):
                    p -= 0.1 * grad
                model.eval()  # validation as common.val_nelbo runs it
            val_tokens, val_noise = documents(64, gen), eval_noise(64, 4, seed=0, offset=64 * step)
            torch.testing.assert_close(compiled(val_tokens, val_noise), eager(val_tokens, val_noise))
        for model in (compiled, eager):
            model.train()
        assert backend.graphs == 2, f"step {step + 1}: {backend.graphs} graphs"
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]


def test_inductor_loss_and_gradients_equal_eager_and_the_per_block_loop():
    """Inductor is the GPU's compiler; on CPU it generates C++, which takes a minute or two."""
    gen = torch.Generator().manual_seed(3)
    compiled = tiny_model()
    eager = copy.deepcopy(compiled)
    compiled.compile_loss()
    for tokens in tricky_streams(96, 4, gen)[:2]:
        noise = train_noise(96, 4, 0.3, 0.8, gen)
        loss, grads = loss_and_grads(compiled, tokens, noise)
        eager_loss, eager_grads = loss_and_grads(eager, tokens, noise)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        for grad, eager_grad in zip(grads, eager_grads):
            torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            naive = naive_token_losses(eager, tokens, noise).sum() / len(tokens)
        torch.testing.assert_close(loss, naive, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("rows", [0, 2])
def test_flex_graph_builds_its_block_mask_inside(rows):
    """The GPU path's BlockMask comes from the tokens inside the graph (one mask per row): new documents need no
    new graph."""
    compiled, backend = tiny_model(block_size=16), CountingBackend()
    eager = copy.deepcopy(compiled)
    compiled.compile_loss(backend, flex=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(4):
            tokens, noise = training_batch(rows, 256, 16, gen)
            torch.testing.assert_close(compiled(tokens, noise), eager(tokens, noise))
    assert backend.graphs == 1


def test_padded_logits_give_the_softmax_of_the_real_vocabulary():
    model = tiny_model()
    hidden = torch.randn(5, 32)
    padded = model.logits_of(hidden, padded=True)
    assert padded.shape[-1] == model.config.padded_vocab == 128
    assert (padded[:, VOCAB:] == float("-inf")).all()  # [MASK] and the padding can never be predicted
    torch.testing.assert_close(padded.log_softmax(-1)[:, :VOCAB], model.logits_of(hidden).log_softmax(-1))


# -----------------------------------------------------------------------------
# train.py


# train.py with its eager loss flagged as compiled, so that it warms the model up as it does a compiled one
WARM_DRIVER = f"""
import sys
sys.path.insert(0, {REPO!r})
import train

build_model = train.build_model

def build_flagged_model(*args):
    model = build_model(*args)
    model.compiled = True
    return model

train.build_model = build_flagged_model
train.main(sys.argv[1:])
"""


def test_warm_up_changes_nothing_in_the_run(tmp_path, trained_run):
    """The shared trained run (eager on a CPU: no warm-up) and the same run warmed up end with the same weights.
    The warm run's loss is eager too, only flagged as compiled, so the warm-up is their one difference."""
    driver = tmp_path / "warm.py"
    driver.write_text(WARM_DRIVER)
    run_train(tmp_path, *TRAINED, "--run_id=warm", launcher=(sys.executable, str(driver)))
    warm, cold = read_log(tmp_path, "warm"), trained_run.text
    compile_time = re.compile(r"^compile_time:\d+ms$", re.M)
    assert compile_time.search(warm) and not compile_time.search(cold)
    assert val_losses(warm) == val_losses(cold)
    weights_warm = load_final(tmp_path, "warm")["model"]
    weights_cold = torch.load(trained_run.final, weights_only=True)["model"]
    for name, tensor in weights_cold.items():
        assert torch.equal(weights_warm[name], tensor), name


def test_warm_up_compiles_every_graph_that_training_and_validation_run(tmp_path, demo_corpus):
    """After warm_up, steps of stacked sequences (--micro_batch=2, two forwards a step) and a validation compile
    nothing more: the compile happens before the clock (a batch with other strides than the warm-up's would not)."""
    hp = train.parse_args([*SMALL, "--micro_batch=2", "--batch_size=4"])
    cpu, autocast = torch.device("cpu"), torch.autocast("cpu", enabled=False)
    model, backend = train.build_model(train.model_config(hp), hp.seed, cpu), CountingBackend()
    model.compile_loss(backend)
    train.warm_up(model, hp.val_file, hp.seq_len, hp.micro_batch, autocast, cpu)
    assert backend.graphs == 2
    loader = TokenLoader(demo_corpus[0], hp.seq_len, sequences=hp.micro_batch)
    optimizers, log = train.make_optimizers(model, hp, fast_bf16=False), train.RunLog(tmp_path, "graphs", 0)
    run = train.Run(hp, 0, 1, cpu, autocast, model, optimizers, loader, log, checkpoint_folder=str(tmp_path))
    for step in range(3):
        assert math.isfinite(run.train_step(step))
    run.validate(3, 0.0)
    assert backend.graphs == 2 and not counters["graph_break"]


def test_bad_token_ids_are_caught_on_the_cpu(tmp_path, monkeypatch, capsys, demo_corpus):
    """The compiled loss cannot check ids; train.py does before the copy, and stops with one line. Ids the model
    cannot take: a 1000-token vocabulary, val ids below 1000, training text in GPT-2 ids (they pass the unigram
    count, which knows the data's vocabulary, not the model's)."""
    train_path, val_path = demo_corpus
    train_shard = tmp_path / "small_train_000000.bin"
    write_shard(train_shard, read_shard(train_path)[:4096])
    write_shard(tmp_path / "small_val_000000.bin", read_shard(val_path)[:1024] % 1000)
    flags = [*SMALL, "--vocab_size=1000", f"--data={tmp_path}/small"]
    hp = train.parse_args(flags)
    first = TokenLoader(str(train_shard), hp.seq_len, sequences=hp.micro_batch).next_batch()  # step 1's first forward
    monkeypatch.chdir(tmp_path)  # train.py writes logs/ and checkpoints/ here
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 1 and stderr.count("\n") == 1 and int(first.max()) >= 1000
    assert stderr.startswith("error: step 1 of ") and "token ids must lie in [0, 1000)" in stderr
    assert f"got ids in [{int(first.min())}, {int(first.max())}]" in stderr

    write_shard(tmp_path / "gpt2_train_000000.bin", read_shard(train_path)[:4096] % 1000)  # now val is the bad one
    write_shard(tmp_path / "gpt2_val_000000.bin", read_shard(val_path)[:1024])
    with pytest.raises(SystemExit) as exit_info:
        train.main([*SMALL, "--vocab_size=1000", f"--data={tmp_path}/gpt2"])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 1 and stderr.count("\n") == 1
    assert stderr.startswith("error: validation at step 0: token ids must lie in [0, 1000)")
