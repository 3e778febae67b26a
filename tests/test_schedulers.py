"""LR schedulers: the LR at every real update equals the large-batch run's, with no warning.

Three ways to drive a scheduler, each compared against the plain large-batch loop
(``opt.step(); sched.step()`` once per large batch):

* ``owned``: built on the wrapped optimizer and given as ``scheduler=``; the
  wrapper steps it once after each real update (``ReduceLROnPlateau`` gets the
  window's mean ``loss=``);
* ``on_wrapper``: built by the user on the wrapper, stepped after ``if opt.stepped:``;
* ``on_inner``: built by the user on the wrapped optimizer, stepped the same way.

Every test runs with ``warnings.simplefilter("error")``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as lrs

from accumopt import AccumulatingOptimizer

K, MICRO, UPDATES = 3, 2, 7

SCHEDULERS = {
    "StepLR": lambda o: lrs.StepLR(o, step_size=2, gamma=0.5),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=0.2, total_steps=UPDATES + 1),
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2, eta_min=1e-3),
    "LambdaLR": lambda o: lrs.LambdaLR(o, lambda e: 0.8 ** e),
    "SequentialLR": lambda o: lrs.SequentialLR(
        o, [lrs.LinearLR(o, start_factor=0.1, total_iters=2), lrs.ExponentialLR(o, gamma=0.9)], milestones=[2]),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o, mode="max", patience=0, factor=0.5),  # 'max' of a falling loss: reduces
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(K * MICRO, 3, generator=g, dtype=torch.float64),
             torch.randn(K * MICRO, 1, generator=g, dtype=torch.float64)) for _ in range(UPDATES)]


def _optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # OneCycleLR also cycles momentum


def _hypers(opt) -> tuple[float, ...]:
    return tuple(float(v) for g in opt.param_groups for v in (g["lr"], g.get("momentum", 0.0)))


def _reference(name, model, data):
    opt = _optimizer(model)
    sched = SCHEDULERS[name](opt)
    trace = []
    for x, y in data:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sched.step(loss.item()) if name == "ReduceLROnPlateau" else sched.step()
        trace.append(_hypers(opt))
    return trace


def _accumulated(name, how, model, data):
    inner = _optimizer(model)
    owned = SCHEDULERS[name](inner) if how == "owned" else None
    opt = AccumulatingOptimizer(inner, K, scheduler=owned)
    user = None
    if how == "on_wrapper":
        user = SCHEDULERS[name](opt)
    elif how == "on_inner":
        user = SCHEDULERS[name](inner)
    trace, window_losses = [], []
    for x, y in data:
        for xm, ym in zip(x.split(MICRO), y.split(MICRO)):
            loss = torch.nn.functional.mse_loss(model(xm), ym)
            loss.backward()
            window_losses.append(loss.detach())
            opt.step(loss=loss)
            opt.zero_grad()
            if opt.stepped:
                if user is not None:
                    mean = torch.stack(window_losses).mean().item()
                    user.step(mean) if name == "ReduceLROnPlateau" else user.step()
                trace.append(_hypers(opt))
                window_losses.clear()
    return trace, opt


@pytest.mark.parametrize("how", ["owned", "on_wrapper", "on_inner"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_follows_large_batch_run(name, how):
    model, data = _model(), _data()
    ref_model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = _reference(name, ref_model, data)
        got, opt = _accumulated(name, how, model, data)
    assert len(got) == UPDATES and opt.num_updates == UPDATES
    assert [v for t in got for v in t] == pytest.approx([v for t in expected for v in t], rel=1e-12, abs=0.0)
    assert len({t[0] for t in expected}) > 1, "the schedule must actually change the LR in this test"
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_owned_scheduler_is_not_stepped_on_micro_steps():
    model = _model()
    inner = _optimizer(model)
    sched = lrs.StepLR(inner, step_size=1, gamma=0.5)
    opt = AccumulatingOptimizer(inner, 4, scheduler=sched)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(1, 9):
            model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
            opt.step()
            assert sched.last_epoch == i // 4
    assert inner.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)


def test_owned_scheduler_skips_skipped_windows():
    """nonfinite='skip': a window with a NaN gradient is not applied, and the scheduler does not step."""
    model = _model()
    inner = _optimizer(model)
    opt = AccumulatingOptimizer(inner, 2, scheduler=lrs.StepLR(inner, step_size=1, gamma=0.5), nonfinite="skip")
    x = torch.ones(1, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).sum().backward()
        opt.step()
        (model(x).sum() * float("nan")).backward()
        opt.step()
        assert not opt.stepped and opt.num_updates == 0
        assert inner.param_groups[0]["lr"] == 0.1
        for _ in range(2):
            model(x).sum().backward()
            opt.step()
    assert opt.stepped and opt.num_updates == 1
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)


def test_reduce_on_plateau_without_loss_is_refused_before_any_change():
    model = _model()
    inner = _optimizer(model)
    opt = AccumulatingOptimizer(inner, 2, scheduler=lrs.ReduceLROnPlateau(inner))
    model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    with pytest.raises(ValueError, match=r"^ReduceLROnPlateau needs the loss: pass it as opt\.step\(loss=loss\)$"):
        opt.step()
    assert opt.pending == 0


def test_closure_result_feeds_reduce_on_plateau():
    model = _model()
    inner = _optimizer(model)
    sched = lrs.ReduceLROnPlateau(inner, mode="max", patience=0, factor=0.5)
    opt = AccumulatingOptimizer(inner, 2, scheduler=sched)
    x = torch.ones(2, 3, dtype=torch.float64)

    def closure():
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(6):
        opt.step(closure)
    assert opt.num_updates == 3
    assert inner.param_groups[0]["lr"] < 0.1  # the loss fell while mode='max' waited for a rise
