"""K schedules (int, list by epoch, mapping, callable) and the LR rule for a changing K.

Expectations are hand-computed window sizes and LR values; equivalence is against
plain torch stepping once on each window's concatenated batch (float64).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import accumopt
from accumopt.schedule import KSchedule

DT = torch.float64


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def batch(i: int, n: int = 3):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, 1, generator=g, dtype=DT)


def run(opt, net, epochs: list[int], flush: bool):
    """Micro-steps per epoch; returns (window sizes, K seen at each micro-step, pending at each step)."""
    sizes, ks, count, i = [], [], 0, 0
    for epoch, n in enumerate(epochs):
        opt.set_epoch(epoch)
        for _ in range(n):
            x, y = batch(i)
            i += 1
            ks.append((opt.pending, opt.accumulation_steps))
            ((net(x) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
            count += 1
            if opt.stepped:
                sizes.append(count)
                count = 0
        if flush and opt.flush():
            sizes.append(count)
            count = 0
    return sizes, ks, count


def sgd(params, lr=0.1):
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


@pytest.mark.parametrize(
    "spec, kwargs, epochs, flush, expected, pending",
    [
        (3, {}, [7, 7], False, [3, 3, 3, 3], 2),
        (3, {}, [7, 7], True, [3, 3, 1, 3, 3, 1], 0),
        # list by epoch: the window open when the epoch changes keeps its K (2); then K=3.
        ([2, 3], {}, [5, 5], False, [2, 2, 2, 3], 1),
        ([2, 3], {}, [5, 5], True, [2, 2, 1, 3, 2], 0),
        ([1, 2, 4], {}, [2, 4, 8, 4], True, [1, 1, 2, 2, 4, 4, 4], 0),  # last value holds on
        ({0: 1, 2: 4}, {}, [3, 3, 8], True, [1, 1, 1, 1, 1, 1, 4, 4], 0),
        # mapping by update (closed windows): K=1 for windows 0-1, 2 for 2-3, 4 from 4 on.
        ({0: 1, 2: 2, 4: 4}, {"schedule_by": "update"}, [16], False, [1, 1, 2, 2, 4, 4], 2),
        # callable of the update count (optax every_k_schedule style).
        (lambda n: min(2 ** n, 8), {}, [30], False, [1, 2, 4, 8, 8], 7),
        # list by update.
        ([1, 3], {"schedule_by": "update"}, [10], False, [1, 3, 3, 3], 0),
        (np.int64(2), {}, [4], False, [2, 2], 0),
    ],
)
def test_k_sequence(spec, kwargs, epochs, flush, expected, pending):
    net = model()
    opt = accumopt.AccumulatingOptimizer(sgd(net.parameters()), spec, **kwargs)
    sizes, ks, left = run(opt, net, epochs, flush)
    assert sizes == expected
    assert left == pending
    # K never changes mid-window: between two micro-steps of one window it is constant.
    for (p0, k0), (p1, k1) in zip(ks, ks[1:]):
        if p1 > 0:
            assert k1 == k0
    opt.discard()  # the `pending` micro-batches left over stay unapplied on purpose


@pytest.mark.parametrize("spec", [[2, 3, 1], {0: 2, 1: 1, 2: 3}, lambda n: 1 + n % 3])
def test_each_window_equals_the_large_batch(spec):
    """Each real update equals plain SGD on the concatenation of that window's micro-batches."""
    net = model(1)
    ref = copy.deepcopy(net)
    opt = accumopt.AccumulatingOptimizer(sgd(net.parameters()), spec)
    ref_opt = sgd(ref.parameters())
    i, window = 0, []
    for epoch in range(3):
        opt.set_epoch(epoch)
        for _ in range(5):
            x, y = batch(i)
            i += 1
            window.append((x, y))
            ((net(x) - y) ** 2).mean().backward()
            opt.step()
            if opt.stepped or (_ == 4 and opt.flush()):
                X, Y = torch.cat([w[0] for w in window]), torch.cat([w[1] for w in window])
                ref_opt.zero_grad()
                ((ref(X) - Y) ** 2).mean().backward()
                ref_opt.step()
                window = []
                for p, q in zip(net.parameters(), ref.parameters()):
                    torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert not window and opt.num_updates >= 5


def lrs_of_updates(opt, net, epochs: list[int], flush: bool = True, external=None):
    """The LR of group 0 used by each real update (read by a step pre-hook)."""
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    i = 0
    for epoch, n in enumerate(epochs):
        opt.set_epoch(epoch)
        for _ in range(n):
            x, y = batch(i)
            i += 1
            ((net(x) - y) ** 2).mean().backward()
            opt.step()
            if opt.stepped and external is not None:
                external.step()
        if flush and opt.flush() and external is not None:
            external.step()
    return [float(v) for v in seen]


def test_lr_linear_no_scheduler():
    net = model()
    opt = accumopt.AccumulatingOptimizer(sgd(net.parameters(), 0.1), [1, 2, 4], lr_scaling="linear")
    got = lrs_of_updates(opt, net, [2, 4, 8])
    # K: epoch 0 -> 1 (2 updates), epoch 1 -> 2 (2 updates), epoch 2 -> 4 (2 updates); factor K / 1.
    assert got == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.4, 0.4], rel=1e-15)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4)


def test_lr_sqrt_with_a_base_lr_scheduler():
    """LambdaLR sets lr = base_lr * f(u) from base_lrs; the factor must be applied on top, every update."""
    net = model()
    inner = sgd(net.parameters(), 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda u: 1.0 / (1 + u))
    opt = accumopt.AccumulatingOptimizer(inner, [2, 8], scheduler=sched, lr_scaling="sqrt")
    got = lrs_of_updates(opt, net, [4, 16])
    # updates 0,1 at K=2 (factor 1); updates 2,3 at K=8 (factor sqrt(4) = 2); LambdaLR: 0.1 / (1 + u).
    expected = [0.1 / 1, 0.1 / 2, 2 * 0.1 / 3, 2 * 0.1 / 4]
    assert got == pytest.approx(expected, rel=1e-14)
    assert sched.get_last_lr() == pytest.approx([0.1 / 5])  # the scheduler sees the unscaled LR


def test_lr_linear_with_a_chainable_scheduler_owned_and_external():
    for owned in (True, False):
        net = model()
        inner = sgd(net.parameters(), 0.1)
        sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)
        opt = accumopt.AccumulatingOptimizer(inner, [1, 4], scheduler=sched if owned else None, lr_scaling="linear")
        got = lrs_of_updates(opt, net, [2, 8], external=None if owned else sched)
        # updates 0,1 at K=1: 0.1, 0.05; updates 2,3 at K=4 (factor 4): 4 * 0.025, 4 * 0.0125.
        assert got == pytest.approx([0.1, 0.05, 0.1, 0.05], rel=1e-14), owned


def test_lr_user_change_is_kept_as_a_scaled_value():
    net = model()
    opt = accumopt.AccumulatingOptimizer(sgd(net.parameters(), 0.1), [2, 4], lr_scaling="linear")
    run(opt, net, [2], flush=True)
    opt.param_groups[0]["lr"] = 0.03  # the user lowers the LR at K=2 (factor 1)
    opt.set_epoch(1)  # K=4: factor 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.06)


def test_lr_tensor_is_kept_in_place():
    net = model()
    lr = torch.tensor(0.1, dtype=DT)
    inner = torch.optim.Adam(net.parameters(), lr=lr)
    opt = accumopt.AccumulatingOptimizer(inner, [1, 4], lr_scaling="sqrt")
    run(opt, net, [1, 4], flush=True)
    assert inner.param_groups[0]["lr"] is lr
    assert lr.item() == pytest.approx(0.2)


def test_state_roundtrip_with_schedule_and_lr_scaling():
    def fresh():
        net = model(3)
        inner = sgd(net.parameters(), 0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda u: 0.9 ** u)
        return net, accumopt.AccumulatingOptimizer(inner, {0: 1, 1: 2, 2: 4}, schedule_by="epoch", scheduler=sched,
                                                   lr_scaling="linear")

    net_a, opt_a = fresh()
    run(opt_a, net_a, [3, 5], flush=False)  # mid-window at the end
    sd = copy.deepcopy(opt_a.state_dict())
    net_b, opt_b = fresh()
    net_b.load_state_dict(net_a.state_dict())
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]
    for opt, net in ((opt_a, net_a), (opt_b, net_b)):
        opt.set_epoch(2)
        for i in range(9):
            x, y = batch(500 + i)
            ((net(x) - y) ** 2).mean().backward()
            opt.step()
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(p, q)
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]


@pytest.mark.parametrize(
    "spec, kwargs, error, match",
    [
        (0, {}, ValueError, r"accumulation_steps: 0 \(expected an int >= 1\)"),
        (2.5, {}, TypeError, "accumulation_steps"),
        (True, {}, TypeError, "accumulation_steps"),
        ("8", {}, TypeError, "accumulation_steps"),
        ([], {}, ValueError, "non-empty"),
        ([2, 0], {}, ValueError, r"accumulation_steps\[1\]: 0"),
        ([2, 1.5], {}, TypeError, r"accumulation_steps\[1\]"),
        ({1: 2}, {}, ValueError, "from 0 on"),
        ({0: 2, -1: 3}, {}, ValueError, "key"),
        ({}, {}, ValueError, "non-empty"),
        (lambda n: 0, {}, ValueError, r"accumulation_steps\(0\): 0"),
        (lambda n: 2.0, {}, TypeError, r"accumulation_steps\(0\)"),
        (2, {"schedule_by": "batch"}, ValueError, "schedule_by"),
        (2, {"lr_scaling": "cubic"}, ValueError, "lr_scaling: 'cubic'"),
    ],
)
def test_invalid_specs(spec, kwargs, error, match):
    net = model()
    inner = sgd(net.parameters())
    lr_before = inner.param_groups[0]["lr"]
    with pytest.raises(error, match=match):
        accumopt.AccumulatingOptimizer(inner, spec, **kwargs)
    assert inner.param_groups[0]["lr"] == lr_before


def test_callable_error_at_a_boundary_names_the_position():
    net = model()
    opt = accumopt.AccumulatingOptimizer(sgd(net.parameters()), lambda n: 1 if n < 2 else -1)
    with pytest.raises(ValueError, match=r"accumulation_steps\(2\): -1"):
        run(opt, net, [3], flush=False)


def test_set_epoch_validation_and_timing():
    net = model()
    opt = accumopt.AccumulatingOptimizer(sgd(net.parameters()), [2, 5])
    with pytest.raises(ValueError, match="epoch: -1"):
        opt.set_epoch(-1)
    x, y = batch(0)
    ((net(x) - y) ** 2).mean().backward()
    opt.step()
    opt.set_epoch(1)  # mid-window: no change yet
    assert opt.accumulation_steps == 2
    ((net(x) - y) ** 2).mean().backward()
    opt.step()
    assert opt.stepped and opt.accumulation_steps == 5


def test_kschedule_lookup_is_direct():
    s = KSchedule({0: 1, 10: 2, 5: 3}, "update")
    assert [s(0, u) for u in (0, 4, 5, 9, 10, 100)] == [1, 1, 3, 3, 2, 2]
    assert KSchedule([4, 2]).schedule_by == "epoch" and KSchedule(lambda n: 1).schedule_by == "update"
    assert math.isfinite(s(0, 0))
