"""``reduction="sum"``, ``accumulated_gradients()``, and the "off" spellings of scaler and clipping.

References are computed by hand in float64: per-micro-batch gradients from
``torch.autograd.grad``, summed (weighted) without accumopt.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from accumopt import AccumulatingOptimizer

DT = torch.float64


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(DT)


def _batches(n: int, sizes: list[int] | None = None, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    sizes = sizes or [3] * n
    return [(torch.randn(s, 4, generator=g, dtype=DT), torch.randn(s, 2, generator=g, dtype=DT)) for s in sizes]


def _hand_sum(model: torch.nn.Module, batches, weights) -> list[torch.Tensor]:
    """sum_i w_i * grad(mean loss of micro-batch i), by hand."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for (x, y), w in zip(batches, weights):
        grads = torch.autograd.grad(F.mse_loss(model(x), y), params)
        for t, g in zip(total, grads):
            t.add_(g * w)
    return total


@pytest.mark.parametrize("route", ["none", "step", "backward"])
@pytest.mark.parametrize("flush_after", [None, 3])
def test_sum_reduction_applies_the_weighted_sum(route: str, flush_after: int | None) -> None:
    k, lr = 4, 0.1
    model = _model()
    ref = copy.deepcopy(model)
    n = flush_after or k
    batches = _batches(n, sizes=[2, 3, 5, 1][:n])
    weights = [1.0] * n if route == "none" else [float(len(x)) for x, _ in batches]
    expected = [p.detach() - lr * g for p, g in zip(ref.parameters(), _hand_sum(ref, batches, weights))]

    mode = "buffered" if route == "step" else "inplace"
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=lr), k, mode=mode, reduction="sum")
    for (x, y), w in zip(batches, weights):
        loss = F.mse_loss(model(x), y)
        if route == "backward":
            opt.backward(loss, weight=w)
            opt.step()
        else:
            loss.backward()
            opt.step(weight=w if route == "step" else None)
        opt.zero_grad()
    if flush_after is not None:
        assert opt.num_updates == 0
        assert opt.flush()
    assert opt.num_updates == 1
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)


def test_sum_is_k_times_mean() -> None:
    k = 3
    batches = _batches(k)
    grads = {}
    for reduction in ("mean", "sum"):
        model = _model()
        opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k, reduction=reduction)
        seen = []
        opt.register_step_pre_hook(lambda o, a, kw: seen.append([p.grad.clone() for p in model.parameters()]))
        for x, y in batches:
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        grads[reduction] = seen[0]
    for m, s in zip(grads["mean"], grads["sum"]):
        torch.testing.assert_close(s, m * k, rtol=1e-12, atol=1e-14)


def test_invalid_reduction() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"Invalid reduction: 'x' \(expected one of 'mean', 'sum'\)"):
        AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, reduction="x")


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
def test_accumulated_gradients_are_the_pending_sums(mode: str) -> None:
    model = _model()
    ref = copy.deepcopy(model)
    batches = _batches(2, sizes=[2, 4])
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 4, mode=mode, model=model)
    assert opt.accumulated_gradients() == {}
    for x, y in batches:
        opt.backward(F.mse_loss(model(x), y), weight=float(len(x)))
        opt.step()
        opt.zero_grad()
    sums = opt.accumulated_gradients()
    expected = _hand_sum(ref, batches, [2.0, 4.0])
    names = [n for n, _ in model.named_parameters()]
    assert list(sums) == names
    for name, e in zip(names, expected):
        assert not sums[name].requires_grad
        torch.testing.assert_close(sums[name], e, rtol=1e-12, atol=1e-14)
    opt.flush()
    assert opt.accumulated_gradients() == {}


def test_accumulated_gradients_names_without_model_and_low_precision_dtype() -> None:
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.randn(2))
    opt = AccumulatingOptimizer(torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1), 3)
    ((a.float() ** 2).sum() + (b ** 2).sum()).backward()
    opt.step()
    sums = opt.accumulated_gradients()
    assert list(sums) == ["param_groups[0]['params'][0]", "param_groups[1]['params'][0]"]
    assert sums["param_groups[0]['params'][0]"].dtype == torch.float32  # the fp32 accumulation buffer
    torch.testing.assert_close(sums["param_groups[1]['params'][0]"], 2 * b.detach())
    opt.discard()  # the window stays open on purpose


def _train(opt_kwargs: dict, steps: int = 8) -> list[torch.Tensor]:
    model = _model()
    opt = AccumulatingOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), 4, **opt_kwargs)
    for x, y in _batches(steps, seed=3):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_disabled_scaler_and_zero_clipping_mean_off() -> None:
    plain = _train({})
    off = _train({"scaler": torch.amp.GradScaler(enabled=False), "max_grad_norm": 0.0})
    for a, b in zip(plain, off):
        assert torch.equal(a, b)  # bitwise
    off = _train({"scaler": torch.amp.GradScaler("cpu", enabled=False), "max_grad_norm": 0,
                  "clip_value": 0.0, "agc_clip_factor": 0})
    for a, b in zip(plain, off):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["max_grad_norm", "clip_value", "agc_clip_factor"])
@pytest.mark.parametrize("value", [-1.0, float("nan")])
def test_negative_or_nan_clipping_still_refused(name: str, value: float) -> None:
    model = _model()
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, **{name: value})


def test_noise_scale_is_the_same_with_sum_reduction() -> None:
    values = {}
    for reduction in ("mean", "sum"):
        model = _model()
        opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), 4, mode="buffered",
                                    noise_scale=True, reduction=reduction)
        for x, y in _batches(12, seed=5):
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        values[reduction] = opt.noise_scale()
    assert torch.isfinite(values["mean"])  # lr=0: both runs see the same gradients
    torch.testing.assert_close(values["sum"], values["mean"], rtol=1e-10, atol=0)
