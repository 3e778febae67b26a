"""Buffered mode keeps a zeroed ``.grad`` between micro-steps as the next backward's landing area.

It must behave exactly as releasing ``.grad`` did: a gradient discarded with ``zero_grad()``
never reaches the window, a parameter without a gradient in the window gets none, and
every update equals the plain large-batch step (float64 reference).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from accumopt import AccumulatingOptimizer

DT = torch.float64


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(3, 4)
        self.a = torch.nn.Linear(4, 1)
        self.b = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, head: str) -> torch.Tensor:
        return getattr(self, head)(torch.tanh(self.body(x)))


def _data(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, generator=g, dtype=DT), torch.randn(2, 1, generator=g, dtype=DT)) for _ in range(n)]


def test_grad_tensor_is_reused_across_micro_steps() -> None:
    torch.manual_seed(0)
    model = TwoHeads().to(DT)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 4, mode="buffered")
    ptrs = []
    for x, y in _data(3):
        F.mse_loss(model(x, "a"), y).backward()
        ptrs.append(model.body.weight.grad.data_ptr())
        opt.step()
        opt.zero_grad()
        assert not model.body.weight.grad.any()  # a zeroed landing area, not part of the window
    assert ptrs[1] == ptrs[2]  # no fresh gradient allocated per micro-batch
    opt.discard()  # 3 of 4 micro-batches: the window stays open on purpose


def test_discarded_gradient_and_unused_head_match_the_large_batch() -> None:
    torch.manual_seed(0)
    model = TwoHeads().to(DT)
    ref = copy.deepcopy(model)
    data = _data(4)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 3, mode="buffered")
    # micro-batch 0, then a gradient thrown away with zero_grad(), then micro-batches 2 and 3 (head "a" only)
    for i, (x, y) in enumerate(data):
        F.mse_loss(model(x, "a" if i != 1 else "b"), y).backward()
        if i == 1:
            opt.zero_grad()  # discard: neither its gradient nor head "b" may count
            continue
        opt.step()
        opt.zero_grad()
    assert opt.num_updates == 1
    assert model.b.weight.grad is None  # head "b" got no gradient in the window: never stepped
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    sum(F.mse_loss(ref(x, "a"), y) for i, (x, y) in enumerate(data) if i != 1).div(3).backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert torch.equal(model.b.weight, ref.b.weight)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_between_backward_and_step_discards_in_buffered_mode(set_to_none: bool) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).to(DT)
    ref = copy.deepcopy(model)
    (x0, y0), (x1, y1), (x2, y2) = _data(3, seed=1)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, mode="buffered")
    F.mse_loss(model(x0), y0).backward()
    opt.step()
    F.mse_loss(model(x1), y1).backward()  # lands on the kept .grad
    opt.zero_grad(set_to_none=set_to_none)  # and is thrown away
    F.mse_loss(model(x2), y2).backward()
    opt.step()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ((F.mse_loss(ref(x0), y0) + F.mse_loss(ref(x2), y2)) / 2).backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
