"""The GPU's training graph, traced on CPU: FlexAttention forward and backward inside the compiled loss.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_gpu_graph.py

FlexAttention refuses a backward on CPU through one private guard, which gpu_check.flex_backward_on_cpu lifts. Then
compile_loss under aot_eager with fullgraph=True runs the Dynamo/AOTAutograd graph a GPU gets (flex forward and
backward, the BlockMask built inside, on stacked rows [N, L]); only Inductor's Triton lowering is unseen. And whatever
compile_loss chose, no eager call reaches flex_attention, whose eager fallback materializes every score.
"""

import copy
import re
import sys

import pytest
import torch
from conftest import EOT, REPO, SMALL, VOCAB, CountingBackend, read_log, run_train
from torch._dynamo.utils import counters

import common
import model as model_module
import sample
from model import BD3LM, ModelConfig
from noise import Noise, eval_noise, train_noise
from tools import gpu_check


@pytest.fixture
def flex_backward_on_cpu():
    torch._dynamo.reset()
    counters.clear()
    with gpu_check.flex_backward_on_cpu():
        yield
    torch._dynamo.reset()


def tiny_model() -> BD3LM:
    """Two layers in 16-token blocks, every weight random (zero-initialized projections would hide differences)."""
    torch.manual_seed(0)
    model = BD3LM(ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=2, head_dim=16, model_dim=32, mlp_hidden=64,
                              block_size=16))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def stacked_batch(rows: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, Noise]:
    """`rows` sequences, each cut into documents at its own rate (none at all included), and training noise with
    t from 0 (blocks with nothing masked)."""
    tokens = torch.randint(0, EOT, (rows, length), generator=gen)
    tokens[torch.rand(rows, length, generator=gen) < 0.2 * torch.rand(rows, 1, generator=gen)] = EOT
    noises = [train_noise(length, 16, 0.0, 1.0, gen) for _ in range(rows)]
    return tokens, Noise(*map(torch.stack, zip(*noises)))


def loss_and_grads(model: BD3LM, tokens, noise, bf16: bool = False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(tokens, noise)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x - reference).norm() / reference.norm())


@pytest.mark.parametrize("flex", [None, True, False])
def test_flex_attention_runs_only_compiled_and_where_compile_loss_chose_it(flex, monkeypatch):
    """Training, validation and the cache, all eager, never call flex_attention, even where the model chose flex;
    the compiled loss calls it in every layer exactly where compile_loss chose it (by default on a GPU only, and
    this model is on the CPU)."""
    calls, flex_attention = [], model_module.flex_attention

    def recording(*args, **kwargs):
        calls.append(torch.compiler.is_compiling())
        return flex_attention(*args, **kwargs)

    monkeypatch.setattr(model_module, "flex_attention", recording)
    tokens, noise = stacked_batch(2, 128, torch.Generator().manual_seed(1))
    val_noise = eval_noise(128, 16, seed=0, offset=0)
    eager, compiled = tiny_model(), tiny_model()
    eager.flex = True  # as compile_loss(flex=True) chooses, without compiling
    eager(tokens, noise).backward()
    compiled.compile_loss("aot_eager", flex=flex)
    assert compiled.compiled and compiled.flex == bool(flex)
    with torch.no_grad():
        eager.eval()
        eager(tokens[0], val_noise)
        for model in (eager, compiled):  # the paths that compile_loss leaves eager
            model.logits(tokens, tokens)
            cache = sample.new_cache(model, 2, 48)
            sample.cache_append(model, cache, tokens[:, :32])
            sample.cache_logits(model, cache, torch.full((2, 16), model.config.mask_id))
        assert not calls
        compiled.eval()
        compiled(tokens[0], val_noise)
    assert calls == [True] * compiled.config.n_layer * compiled.flex


def test_flex_training_graph_equals_sdpa_in_fp32_and_bf16_and_stays_two_graphs(flex_backward_on_cpu):
    """Over new document layouts and noise draws, with an optimizer step between them: the compiled flex loss and
    gradients equal eager SDPA's in fp32 (1e-5 relative); under bf16 autocast flex is no further from the fp32
    gradients than SDPA in bf16 is (each run in bf16 errs by ~1e-3 here); one graph trains and one validates (a
    run has one precision: the bf16 twin has its own training graph)."""
    flex, backend, bf16_backend = tiny_model(), CountingBackend(), CountingBackend()
    sdpa, flex_bf16 = copy.deepcopy(flex), copy.deepcopy(flex)
    flex.compile_loss(backend, flex=True)
    flex_bf16.compile_loss(bf16_backend, flex=True)
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        tokens, noise = stacked_batch(3, 256, gen)
        (loss, grads), (sdpa_loss, sdpa_grads) = (loss_and_grads(m, tokens, noise) for m in (flex, sdpa))
        torch.testing.assert_close(loss, sdpa_loss, rtol=1e-5, atol=0)
        assert relative_error(grads, sdpa_grads) < 1e-5
        (_, flex_bf16_grads), (_, sdpa_bf16_grads) = (loss_and_grads(m, tokens, noise, bf16=True)
                                                      for m in (flex_bf16, sdpa))
        assert relative_error(flex_bf16_grads, sdpa_grads) <= 1.25 * relative_error(sdpa_bf16_grads, sdpa_grads)
        with torch.no_grad():
            for model in (flex, sdpa, flex_bf16):
                start = 0
                for p in model.parameters():
                    p -= 0.05 * sdpa_grads[start: start + p.numel()].view_as(p)
                    start += p.numel()
                model.eval()
            val_tokens, val_noise = stacked_batch(1, 256, gen)[0][0], eval_noise(256, 16, seed=0, offset=256 * step)
            torch.testing.assert_close(flex(val_tokens, val_noise), sdpa(val_tokens, val_noise), rtol=1e-5, atol=0)
        for model in (flex, sdpa, flex_bf16):
            model.train()
    assert backend.graphs == 2 and bf16_backend.graphs == 1 and not counters["graph_break"]


# train.py itself, with the guard lifted and the loss compiled under aot_eager with flex, as train.py compiles it on
# CUDA
DRIVER = f"""
import sys
sys.path.insert(0, {REPO!r})
import common
sys.path.insert(0, {REPO + '/tests'!r})
from conftest import CountingBackend
import train
from tools import gpu_check

backend, build_model = CountingBackend(), train.build_model

def build_compiled_model(*args):
    model = build_model(*args)
    model.compile_loss(backend, flex=True)
    return model

train.build_model = build_compiled_model
with gpu_check.flex_backward_on_cpu():
    train.main(sys.argv[1:])
print(f"graphs:{{backend.graphs}}")
"""


def test_train_py_on_the_flex_graph_one_process_and_two_gloo_ranks(tmp_path, demo_corpus):
    """train.py's real sequence (warm-up, steps of stacked rows, validations) on the flex graph: one graph for
    training and one for validation, all compiled in the warm-up, and 2 gloo ranks train what 1 process does."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    flags = [*SMALL, "--batch_size=4", "--micro_batch=2", "--steps=3", "--val_every=2"]
    one = run_train(tmp_path, *flags, "--run_id=one", launcher=(sys.executable, str(driver)))
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver))
    two = run_train(tmp_path, *flags, "--run_id=two", launcher=torchrun)
    assert re.findall(r"^graphs:(\d+)$", one.stdout, re.M) == ["2"]
    assert re.findall(r"^graphs:(\d+)$", two.stdout, re.M) == ["2", "2"]
    losses = [re.findall(r"^step:\d+/3 (?:train|val)_loss:(\S+)", read_log(tmp_path, run_id), re.M)
              for run_id in ("one", "two")]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
    assert re.search(r"^compile_time:\d+ms$", read_log(tmp_path, "one"), re.M)


@pytest.mark.skipif(not common.inductor_sorts_fall_back(), reason="this torch's Inductor ignores the annotation "
                    "(torch 2.11: common.torch_limitations reports it)")
def test_every_sort_of_the_block_mask_falls_back_to_eager():
    """Inductor would compile an argsort to a Triton sort, with a compile-time cliff; annotated, it runs eagerly
    (as in torch's own BlockMask code)."""
    from torch._functorch.aot_autograd import aot_module_simplified

    sorts = []

    def inspect_forward(graph_module, example_inputs):
        sorts.extend(node.meta.get("custom") for node in graph_module.graph.nodes if "sort" in str(node.target))
        return graph_module

    def backend(graph_module, example_inputs):
        return aot_module_simplified(graph_module, example_inputs, fw_compiler=inspect_forward)

    block_mask = torch.compile(lambda tokens: model_module.block_diffusion_block_mask(tokens, 16, EOT).as_tuple(),
                               backend=backend, fullgraph=True)
    block_mask(torch.randint(0, VOCAB, (2, 256)))
    assert sorts and all(custom == {"fallback_to_eager": True} for custom in sorts)
