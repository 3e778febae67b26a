"""Gradient noise scale: closed-form check on linear regression with Gaussian noise.

Model ``y = x . w* + eps``, ``x ~ N(0, I_d)``, ``eps ~ N(0, sigma^2)``, loss
``0.5 (x . w - y)^2`` at a fixed ``w = w* + delta`` (SGD with lr=0, so every window
sees the same point). The per-sample gradient is ``g = x (x . delta - eps)``, so

    G = E g = delta,     Sigma = E g g^T - G G^T = |delta|^2 I + delta delta^T + sigma^2 I   (Isserlis)
    B_simple = tr(Sigma) / |G|^2 = ((d + 1) |delta|^2 + d sigma^2) / |delta|^2

in samples. Micro-batch weights are sample counts, so the estimate is in samples too.
"""

from __future__ import annotations

import math

import pytest
import torch

from accumopt import AccumulatingOptimizer
from accumopt.noise import NoiseScaleEstimator, simple_noise_scale_terms

D, SIGMA, DELTA_NORM = 10, 1.0, 1.0
TRUE_B = ((D + 1) * DELTA_NORM ** 2 + D * SIGMA ** 2) / DELTA_NORM ** 2  # 21 samples


def run_regression(mode: str, windows: int, *, k: int = 8, sizes: tuple[int, int] = (4, 4), seed: int = 0,
                   beta: float = 0.99, bad: set[int] = frozenset()) -> AccumulatingOptimizer:
    g = torch.Generator().manual_seed(seed)
    wstar = torch.randn(D, generator=g, dtype=torch.float64)
    delta = torch.randn(D, generator=g, dtype=torch.float64)
    delta *= DELTA_NORM / delta.norm()
    model = torch.nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((wstar + delta)[None])
    policy = "drop" if bad else "ignore"
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), k, mode=mode, nonfinite=policy,
                                noise_scale=NoiseScaleEstimator(beta))
    for i in range(windows * k):
        n = int(torch.randint(sizes[0], sizes[1] + 1, (1,), generator=g))
        x = torch.randn(n, D, generator=g, dtype=torch.float64)
        y = x @ wstar + SIGMA * torch.randn(n, generator=g, dtype=torch.float64)
        loss = 0.5 * ((model(x).squeeze(1) - y) ** 2).mean()
        if mode == "inplace":
            opt.backward(loss, weight=float(n))
            opt.step()
        else:
            loss.backward()
            if i in bad:
                model.weight.grad[0, 0] = math.nan
            opt.step(weight=float(n))
        opt.zero_grad()
    assert torch.equal(model.weight.detach()[0], wstar + delta)  # lr=0: the point never moved
    return opt


@pytest.mark.parametrize("mode, windows, sizes", [
    ("buffered", 300, (4, 4)),   # every micro-batch measured
    ("buffered", 300, (2, 6)),   # uneven micro-batches: harmonic mean of their sizes
    ("inplace", 600, (4, 4)),    # first micro-batch of each window only
])
def test_estimate_within_20_percent_of_closed_form(mode, windows, sizes):
    opt = run_regression(mode, windows, sizes=sizes)
    estimate = opt.noise_scale()
    assert isinstance(estimate, torch.Tensor) and estimate.dim() == 0
    stats = opt.stats()
    assert stats["noise_scale"] == pytest.approx(estimate.item())
    assert stats["noise_windows"] == windows
    rel = estimate.item() / TRUE_B - 1
    print(f"noise scale {mode} sizes={sizes}: estimate {estimate.item():.3f} vs closed form {TRUE_B:.3f} "
          f"({100 * rel:+.1f}%)")
    assert abs(rel) < 0.20
    # The two terms separately: tr(Sigma) and |G|^2 against their closed forms.
    trace_true = (D + 1) * DELTA_NORM ** 2 + D * SIGMA ** 2
    assert stats["noise_trace"] == pytest.approx(trace_true, rel=0.2)
    assert stats["noise_grad_sq"] == pytest.approx(DELTA_NORM ** 2, rel=0.2)


def test_dropped_micro_batches_do_not_poison_the_estimate():
    bad = {3, 17, 40, 41, 42, 43, 44, 45, 46, 47, 100}  # window 5 entirely dropped (skipped)
    opt = run_regression("buffered", 300, bad=bad)
    s = opt.stats()
    assert s["dropped_micro_batches"] == len(bad) and s["skipped_updates"] == 1
    assert s["noise_windows"] == 299  # the skipped window does not count
    assert abs(s["noise_scale"] / TRUE_B - 1) < 0.20


def test_estimators_are_exact_on_expected_norms():
    """McCandlish et al. appendix A: with E|G_B|^2 = |G|^2 + tr/B the estimators return (tr, |G|^2) exactly."""
    for tr, g2, bs, bb in [(21.0, 1.0, 4.0, 32.0), (3.5, 0.25, 1.0, 2.0), (100.0, 7.0, 16.0, 1024.0)]:
        trace, grad_sq = simple_noise_scale_terms(g2 + tr / bs, g2 + tr / bb, bs, bb)
        assert trace == pytest.approx(tr, rel=1e-12) and grad_sq == pytest.approx(g2, rel=1e-12)


def test_off_by_default_and_none_before_first_window():
    model = torch.nn.Linear(3, 1).double()
    off = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2)
    assert off.noise_scale() is None and "noise_scale" not in off.stats()
    on = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, noise_scale=True)
    assert on.noise_scale() is None and on.stats()["noise_scale"] is None
    model(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    on.step()
    assert on.noise_scale() is None  # window still open
    on.discard()


def test_k1_windows_carry_no_information():
    opt = run_regression("buffered", 20, k=1)
    s = opt.stats()
    assert s["noise_windows"] == 0 and s["noise_scale"] is None


def test_estimation_does_not_change_the_training():
    """Bitwise-identical parameters with and without the estimator (it only reads gradients)."""
    def train(noise):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()
        opt = AccumulatingOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), 3, mode="buffered",
                                    noise_scale=noise)
        g = torch.Generator().manual_seed(1)
        for _ in range(12):
            x = torch.randn(5, 4, generator=g, dtype=torch.float64)
            model(x).pow(2).mean().backward()
            opt.step(weight=5.0)
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(train(False), train(True)))


def test_owned_scaler_is_taken_out_of_the_micro_batch_norm():
    """With an owned GradScaler (scale 2^12) the estimate equals the unscaled run's (powers of two: exact)."""
    def estimate(scaler):
        g = torch.Generator().manual_seed(3)
        model = torch.nn.Linear(D, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.randn(1, D, generator=g))
        opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), 4, scaler=scaler, noise_scale=0.5)
        for _ in range(40):
            x = torch.randn(4, D, generator=g)
            opt.backward(0.5 * (model(x).squeeze(1) - x.sum(1)).pow(2).mean())
            opt.step()
            opt.zero_grad()
        return opt.stats()["noise_scale"]

    plain = estimate(None)
    scaled = estimate(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=10 ** 6))
    assert plain is not None and scaled == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("bad", [1.5, "yes", -0.1])
def test_invalid_noise_scale_argument(bad):
    model = torch.nn.Linear(3, 1)
    with pytest.raises((TypeError, ValueError), match="noise_scale"):
        AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, noise_scale=bad)
