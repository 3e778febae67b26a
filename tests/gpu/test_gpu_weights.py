"""Device-tensor micro-batch weights on CUDA: exact, and no host sync on non-updating micro-steps."""

from __future__ import annotations

import copy

import pytest
import torch

from accumopt import AccumulatingOptimizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DT = torch.float64


def _masked_mse(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the valid positions only (a token-level mean)."""
    return (((pred - y) ** 2).sum(-1) * mask).sum() / mask.sum()


def _data(device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 7, 4, generator=g, dtype=DT)
    y = torch.randn(10, 7, 2, generator=g, dtype=DT)
    lengths = torch.tensor([1, 7, 3, 2, 6, 5, 1, 4, 7, 2])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).to(DT)
    return x.to(device), y.to(device), mask.to(device)


@pytest.mark.parametrize("route", ["buffered-step", "inplace-backward"])
def test_device_tensor_weights_exact_and_sync_free(route):
    device = "cuda"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(device, DT)
    x, y, mask = _data(device)
    split = [3, 1, 4, 2]

    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.1)
    _masked_mse(ref(x), y, mask).backward()
    ref_opt.step()

    mode = "buffered" if route == "buffered-step" else "inplace"
    acc = copy.deepcopy(model)
    opt = AccumulatingOptimizer(torch.optim.AdamW(acc.parameters(), lr=0.05, weight_decay=0.1), len(split), mode=mode)
    chunks = list(zip(x.split(split), y.split(split), mask.split(split)))
    torch.cuda.synchronize()
    for i, (xs, ys, ms) in enumerate(chunks):
        last = i == len(chunks) - 1
        torch.cuda.set_sync_debug_mode(0 if last else "error")  # updating steps may sync; the others must not
        try:
            loss = _masked_mse(acc(xs), ys, ms)
            n_tokens = ms.sum()  # a device tensor: never read on the host
            if mode == "buffered":
                loss.backward()
                opt.step(weight=n_tokens)
            else:
                opt.backward(loss, weight=n_tokens)
                opt.step()
            opt.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert opt.num_updates == 1
    for p, q in zip(acc.parameters(), ref.parameters()):
        assert ((p - q).abs().max() / q.abs().max()).item() <= 1e-10


def test_excluded_params_unchanged_on_cuda():
    device = "cuda"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(device)
    frozen = [p.detach().clone() for p in model[2].parameters()]
    opt = AccumulatingOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1), 2,
                                mode="buffered", model=model, exclude=["2.*"])
    for _ in range(4):
        model(torch.randn(5, 4, device=device)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[2].parameters()))
    assert opt.stats()["buffer_bytes"] == sum(p.numel() * 4 for p in model[0].parameters())
