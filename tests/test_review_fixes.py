"""Review fixes: the CPU hand-over follows a parameter's device; an eager-only captured step can recapture."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from accumopt import AccumulatingOptimizer
from accumopt.graphs import CapturedMicroStep

DT = torch.float64


def test_kept_tensor_on_another_device_is_not_reused() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, generator=g, dtype=DT), torch.randn(4, 2, generator=g, dtype=DT)) for _ in range(4)]
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, mode="buffered")
    for x, y in data[:2]:  # one window: the landing tensors are kept
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    group = opt._store.groups[0]
    landing = group.landing
    assert landing is not None
    i = next(j for j, p in enumerate(group.params) if p is model.weight)
    kept = landing.tensors[i]
    assert kept is not None
    # As if the parameter had moved since (same shape, dtype and stride, another device).
    landing.tensors[i] = torch.empty_strided(kept.shape, kept.stride(), dtype=kept.dtype, device="meta")
    x, y = data[2]
    expected = torch.autograd.grad(F.mse_loss(model(x), y), model.weight)[0]
    F.mse_loss(model(x), y).backward()
    grad = model.weight.grad
    assert grad is not None and grad.device == model.weight.device
    assert torch.equal(grad, expected)
    opt.step()
    opt.zero_grad()
    x, y = data[3]
    F.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    assert opt.num_updates == 2
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for w in (0, 2):
        ref_opt.zero_grad()
        sum(F.mse_loss(ref(x), y) for x, y in data[w:w + 2]).div(2).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def test_recapture_of_an_eager_only_step_is_a_no_op() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(4)]
    for capture in (None, False):
        model = nn.Linear(6, 3)
        opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2)
        step = CapturedMicroStep(opt, model, _loss, data[0], capture=capture)
        reason = step.fallback_reason
        assert reason is not None and not step.captured
        step.recapture()
        assert step.fallback_reason == reason
        for b in data:
            step(b)
            step.recapture()
        assert step.eager_steps == 4 and opt.num_updates == 2
