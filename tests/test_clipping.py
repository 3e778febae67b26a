"""Clipping of the accumulated gradient only: by norm, by value, AGC.

References: ``clip_grad_norm_`` / ``clip_grad_value_`` applied once to the
large-batch gradient of a plain torch run, and an independent float64 AGC.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from accumopt import AccumulatingOptimizer

K, W, B = 4, 2, 3


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(K * W * B, 4, generator=g, dtype=torch.float64), torch.randn(K * W * B, 3, generator=g,
                                                                                    dtype=torch.float64) * 3


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).pow(2).mean()


def agc_reference(params: list[torch.Tensor], factor: float, eps: float = 1e-3) -> None:
    """Brock et al. 2021, written out unit by unit in float64 Python arithmetic."""
    for p in params:
        w, g = p.detach().double(), p.grad.double()
        units = [(slice(None),)] if w.ndim <= 1 else [(r,) for r in range(w.shape[0])]
        out = g.clone()
        for u in units:
            w_norm = math.sqrt(sum(v * v for v in w[u].flatten().tolist()))
            g_norm = math.sqrt(sum(v * v for v in g[u].flatten().tolist()))
            bound = factor * max(w_norm, eps)
            if g_norm > bound:
                out[u] = g[u] * (bound / g_norm)
        p.grad.copy_(out)


def run_reference(clip) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xs, ys = data()
    norms = []
    for w in range(W):
        sl = slice(w * K * B, (w + 1) * K * B)
        loss_fn(model, xs[sl], ys[sl]).backward()
        norms.append(clip(list(model.parameters())))
        opt.step()
        opt.zero_grad()
    return model, norms


def run_wrapper(mode: str = "inplace", scaler: torch.amp.GradScaler | None = None, **kwargs):
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), K, mode=mode,
                                scaler=scaler, **kwargs)
    xs, ys = data()
    norms = []
    for i in range(K * W):
        loss = loss_fn(model, xs[i * B:(i + 1) * B], ys[i * B:(i + 1) * B])
        if scaler is not None:
            opt.backward(loss)
        else:
            loss.backward()
        opt.step()
        opt.zero_grad()
        if opt.stepped:
            norms.append(opt.stats()["last_grad_norm"])
    return model, norms


def assert_models_close(m1: torch.nn.Module, m2: torch.nn.Module, tol: float = 1e-10) -> None:
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert ((p - q).norm() / q.norm()).item() <= tol, n


@settings(max_examples=10)
@given(max_norm=st.sampled_from([0.05, 0.3, 1.0, 100.0]), norm_type=st.sampled_from([2.0, 1.0, math.inf, 3.0]),
       mode=st.sampled_from(["inplace", "buffered"]))
def test_norm_clipping_equals_clip_grad_norm_on_large_batch(max_norm: float, norm_type: float, mode: str) -> None:
    ref, ref_norms = run_reference(lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm, norm_type))
    model, norms = run_wrapper(mode, max_grad_norm=max_norm, norm_type=norm_type)
    assert_models_close(model, ref)
    assert len(norms) == W
    for got, want in zip(norms, ref_norms):
        assert got == pytest.approx(want.item(), rel=1e-10)  # the pre-clip norm, kept for statistics


def test_clipping_triggers_and_is_not_per_micro_batch() -> None:
    """The thresholds used really clip, and clip_grad_norm_ runs once per window, never per micro-batch."""
    _, ref_norms = run_reference(lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.05))
    assert all(n.item() > 0.05 for n in ref_norms)
    calls = []
    original = torch.nn.utils.clip_grad_norm_

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = counting
    try:
        run_wrapper(max_grad_norm=0.05)
    finally:
        torch.nn.utils.clip_grad_norm_ = original
    assert len(calls) == W
    # clipping each micro-batch (the hand-written-loop bug) gives a different result
    bad = make_model()
    opt = torch.optim.SGD(bad.parameters(), lr=0.05, momentum=0.9)
    xs, ys = data()
    for w in range(W):
        for j in range(K):
            i = w * K + j
            (loss_fn(bad, xs[i * B:(i + 1) * B], ys[i * B:(i + 1) * B]) / K).backward()
            torch.nn.utils.clip_grad_norm_(bad.parameters(), 0.05)
        opt.step()
        opt.zero_grad()
    ref, _ = run_reference(lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.05))
    assert max(((p - q).norm() / q.norm()).item() for p, q in zip(bad.parameters(), ref.parameters())) > 1e-3


@pytest.mark.parametrize("value", [0.01, 0.1])
@pytest.mark.parametrize("mode", ["inplace", "buffered"])
def test_value_clipping_equals_clip_grad_value_on_large_batch(value: float, mode: str) -> None:
    ref, _ = run_reference(lambda ps: torch.nn.utils.clip_grad_value_(ps, value))
    model, _ = run_wrapper(mode, clip_value=value)
    assert_models_close(model, ref)


@settings(max_examples=8)
@given(factor=st.sampled_from([0.3, 0.6, 1.0, 1.5, 5.0]), mode=st.sampled_from(["inplace", "buffered"]))
def test_agc_equals_float64_reference(factor: float, mode: str) -> None:
    ref, _ = run_reference(lambda ps: agc_reference(ps, factor))
    model, _ = run_wrapper(mode, agc_clip_factor=factor)
    assert_models_close(model, ref)


def test_agc_clips_some_units_only() -> None:
    """The reference is not vacuous: at this factor some rows are clipped and others are not."""
    model = make_model()
    xs, ys = data()
    loss_fn(model, xs, ys).backward()
    before = [p.grad.clone() for p in model.parameters()]
    agc_reference(list(model.parameters()), 1.0)
    w = model[0].weight
    changed = [not torch.equal(a, b) for a, b in zip(before[0], w.grad)]
    assert any(changed) and not all(changed)


def test_clipping_after_owned_scaler_unscale() -> None:
    """With a loss scale, the accumulated gradient is unscaled before it is clipped."""
    ref, ref_norms = run_reference(lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.3))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model, norms = run_wrapper(scaler=scaler, max_grad_norm=0.3)
    assert_models_close(model, ref)
    assert norms[0] == pytest.approx(ref_norms[0].item(), rel=1e-10)


def test_track_grad_norm_without_clipping() -> None:
    ref, ref_norms = run_reference(lambda ps: torch.nn.utils.clip_grad_norm_(ps, math.inf))
    model, norms = run_wrapper(track_grad_norm=True)
    assert_models_close(model, ref)
    assert norms == pytest.approx([n.item() for n in ref_norms], rel=1e-10)


@pytest.mark.parametrize("name", ["max_grad_norm", "clip_value", "agc_clip_factor"])
@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bad_thresholds_rejected(name: str, bad: float) -> None:
    model = make_model()
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, **{name: bad})
    with pytest.raises(TypeError, match=f"Invalid {name}"):
        AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, **{name: "1.0"})
