"""CUDA: a real out-of-memory error, under a per-process memory cap, recovered by MicroBatcher.

The reference (plain SGD on the whole batch) runs before the cap is set. Then the
process is capped with ``torch.cuda.set_per_process_memory_fraction`` so that the
whole batch's activations no longer fit: MicroBatcher must hit a genuine
``torch.OutOfMemoryError``, split, and produce the same update (float64, 1e-10).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import accumopt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DT = torch.float64
WIDTH = 4096
N = 8192  # whole batch: 8192 x 4096 x 8 B = 256 MiB per saved activation, 6 of them (~1.5 GiB)


def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(),
        nn.Linear(WIDTH, 4),
    ).to("cuda", DT)


@pytest.fixture
def capped():
    """Yields a function that caps this process at ``extra`` bytes above what is allocated now."""
    total = torch.cuda.get_device_properties(0).total_memory

    def cap(extra: int) -> None:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        fraction = (torch.cuda.memory_allocated() + extra) / total
        torch.cuda.set_per_process_memory_fraction(min(fraction, 1.0))

    yield cap
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


def test_real_cuda_oom_is_recovered_exactly(capped):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(N, 64, device="cuda", dtype=DT, generator=g)
    y = torch.randn(N, 4, device="cuda", dtype=DT, generator=g)
    ids = torch.arange(N, device="cuda")

    model = make()
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    for _ in range(2):
        ref_opt.zero_grad()
        ((ref(x) - y) ** 2).mean().backward()
        ref_opt.step()
    ref_params = [p.detach().cpu() for p in ref.parameters()]
    del ref, ref_opt

    opt = accumopt.AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
                                         mode="buffered")
    mb = accumopt.MicroBatcher(opt, grow_after=0)
    # Params, buffers and inputs are allocated; the cap leaves 1 GiB: the momentum buffers (~0.27 GiB) and
    # a micro-batch (~0.19 GiB of activations per 1024 samples, plus its ~0.27 GiB of .grad) fit; the
    # whole batch (~1.5 GiB of activations) does not.
    capped(2**30)
    last_ids = []
    counts = torch.zeros(N, dtype=torch.int64, device="cuda")
    step = opt.step

    def counting_step(*args, **kwargs):  # only micro-batches that reach opt.step count
        counts.index_add_(0, last_ids[-1], torch.ones_like(last_ids[-1]))
        return step(*args, **kwargs)

    opt.step = counting_step

    def loss_fn(b):
        xb, yb, ib = b
        last_ids.append(ib)
        return ((model(xb) - yb) ** 2).mean()

    for _ in range(2):
        counts.zero_()
        mb.step((x, y, ids), loss_fn)
        assert bool((counts == 1).all()), "a sample was used twice or not at all"
    assert mb.ooms >= 1, "the cap did not cause an out-of-memory error: the test proves nothing"
    assert sum(mb.last.sizes) == N
    for p, q in zip(model.parameters(), ref_params):
        err = (p.detach().cpu() - q).abs().max() / q.abs().max()
        assert err <= 1e-10, float(err)
