"""train.py's distributed pieces on 2 gloo ranks on CPU: the Muon that shares its Newton-Schulz work over the ranks
and all_reduce_grads, which sums the gradients after the backward. One spawn of 2 processes serves the file.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_distributed.py

The end-to-end check, train.py on 2 ranks against 1 process (and both presets), is
tests/test_train.py::test_presets_and_world_sizes_train_the_same_model.
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train

WORLD_SIZE = 2
# tall, wide and square; three of 2048 elements leave rank 1 without a matrix in their last turn
SHAPES = [(64, 32), (32, 64), (48, 48), (16, 128), (48, 48)]
NO_GRAD = (2, 1)  # (step, matrix) without a gradient: the optimizers skip it and the turns change


def muon_run(make_optimizer) -> list[torch.Tensor]:
    """Four steps with changing LR and momentum from one seed, with the same random gradients on every rank (as
    after all_reduce_grads); returns the matrices."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    optimizer = make_optimizer(params)
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=generator)
            p.grad = None if (step, i) == NO_GRAD else grad
        for group in optimizer.param_groups:
            group["lr"], group["momentum"] = 0.05 / (step + 1), 0.85 + 0.03 * step
        optimizer.step()
    return [p.detach() for p in params]


def our_muon(ns_dtype):
    return lambda params: train.Muon(params, lr=0.05, momentum=0.9, weight_decay=0.01, ns_dtype=ns_dtype)


class Toy(torch.nn.Module):
    """Layers used everywhere, and parameters without a gradient: one on every rank, one on rank 0, one in the last
    micro-step."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(16, 64)
        self.unused = torch.nn.Parameter(torch.ones(5))
        self.first_micro_step_only = torch.nn.Parameter(torch.full((64,), 1.5))
        self.rank_one_only = torch.nn.Parameter(torch.full((64,), 0.5))
        self.middle = torch.nn.Linear(64, 64)
        self.last = torch.nn.Linear(64, 8)

    def forward(self, x, rank: int, micro_step: int):
        x = torch.tanh(self.first(x))
        if rank == 1:
            x = x * self.rank_one_only
        if micro_step == 0:
            x = x * self.first_micro_step_only
        return self.last(torch.tanh(self.middle(x))).square().sum()


def reducer_run(rank: int, steps: int = 2, grad_accum: int = 3) -> dict:
    """Each step's gradients summed by all_reduce_grads, and this rank's own gradients from a twin model."""
    torch.manual_seed(0)
    model = Toy()
    twin = copy.deepcopy(model)
    result = dict(summed=[], local=[])
    for step in range(steps):
        for micro_step in range(grad_accum):
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(100 * step + 10 * micro_step + rank))
            model(x, rank, micro_step).backward()
            twin(x, rank, micro_step).backward()
        train.all_reduce_grads(list(model.parameters()))
        for name, module in (("summed", model), ("local", twin)):
            result[name].append({n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()})
            module.zero_grad(set_to_none=True)
    return result


def worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD_SIZE)
    results = dict(muon_bf16=muon_run(our_muon(torch.bfloat16)), muon_fp32=muon_run(our_muon(torch.float32)),
                   reducer=reducer_run(rank))
    torch.save(results, f"{folder}/rank{rank}.pt")
    dist.barrier()  # neither rank tears its connections down while the other may still use them
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_ranks")
    try:
        mp.spawn(worker, args=(str(folder),), nprocs=WORLD_SIZE)
    except mp.ProcessExitedException:  # gloo can abort in its own teardown, after both ranks saved their results
        if not all(os.path.exists(f"{folder}/rank{rank}.pt") for rank in range(WORLD_SIZE)):
            raise
    return [torch.load(f"{folder}/rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def test_shared_muon_equals_torch_muon_and_one_process(ranks):
    """Bit for bit: the Newton-Schulz of a matrix is the same computation on whichever rank runs it."""
    torch.set_num_threads(1)
    reference = muon_run(lambda params: torch.optim.Muon(params, lr=0.05, momentum=0.9, weight_decay=0.01))
    for ns_dtype, name in ((torch.bfloat16, "muon_bf16"), (torch.float32, "muon_fp32")):
        one_process = muon_run(our_muon(ns_dtype))
        for rank in ranks:
            for i, (ours, alone) in enumerate(zip(rank[name], one_process)):
                assert torch.equal(ours, alone), (name, SHAPES[i])
    for i, (ours, theirs) in enumerate(zip(ranks[0]["muon_bf16"], reference)):
        assert torch.equal(ours, theirs), SHAPES[i]


def test_all_reduce_grads_sums_like_one_process(ranks):
    """Summed gradients equal the sum of every rank's own; None only where no rank has one."""
    for step in range(2):
        for name in ranks[0]["reducer"]["local"][step]:
            local = [rank["reducer"]["local"][step][name] for rank in ranks]
            present = [grad for grad in local if grad is not None]
            expected = sum(present[1:], present[0]) if present else None
            for rank in ranks:
                summed = rank["reducer"]["summed"][step][name]
                assert (summed is None) == (expected is None), name
                assert expected is None or torch.equal(summed, expected), name
    assert ranks[0]["reducer"]["summed"][0]["unused"] is None
    assert ranks[0]["reducer"]["local"][0]["rank_one_only"] is None  # a gradient only the other rank has
    assert ranks[0]["reducer"]["summed"][0]["rank_one_only"] is not None
