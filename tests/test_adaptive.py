"""AdaptiveK: bounds, convergence to the closed-form noise scale, no oscillation, boundaries only."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import accumopt
from accumopt.adaptive import AdaptiveK

DT = torch.float64


def drive(k: AdaptiveK, windows: int) -> list[int]:
    """K chosen at each boundary, as the window does (schedule called once per close)."""
    return [k(0, u) for u in range(1, windows + 1)]


@settings(max_examples=30)
@given(
    estimates=st.lists(st.one_of(st.none(), st.floats(1e-3, 1e5), st.just(float("nan")), st.just(-1.0)),
                       min_size=1, max_size=60),
    k_min=st.integers(1, 4),
    span=st.integers(0, 6),
    patience=st.integers(1, 4),
)
def test_stays_within_bounds_and_moves_by_powers_of_two(estimates, k_min, span, patience):
    k_max = k_min * 2 ** span + (span % 2)  # not always a power-of-two multiple
    it = iter(estimates)
    ak = AdaptiveK(lambda: next(it), k_min=k_min, k_max=k_max, patience=patience)
    ks = [ak.k] + drive(ak, len(estimates))
    allowed = set(ak.candidates)
    for a, b in zip(ks, ks[1:]):
        assert k_min <= b <= k_max and b in allowed
        if a != b and k_max not in (a, b):
            ratio = max(a, b) / min(a, b)
            assert ratio == 2 ** round(math.log2(ratio))


@settings(max_examples=30)
@given(target=st.floats(0.2, 500.0), jitter=st.lists(st.floats(0.75, 1.33), min_size=40, max_size=40),
       k_init=st.sampled_from([1, 2, 8, 64]))
def test_no_oscillation_under_a_constant_noise_scale(target, jitter, k_init):
    """A constant (±33% noisy) estimate: at most one change, then K stays put, near the target."""
    it = iter(jitter)
    ak = AdaptiveK(lambda: target * next(it), k_min=1, k_max=64, k_init=k_init, patience=2)
    ks = drive(ak, len(jitter))
    assert ak.changes <= 1
    assert sum(a != b for a, b in zip(ks, ks[1:])) <= 1
    final = ks[-1]
    expected = min(max(target, 1), 64)
    assert final / 2 <= expected <= final * 2  # within the hysteresis band of the target


def test_exact_sequence_with_hysteresis():
    seq = iter([10, 10, 10, 10, 3, 3, 100, 100, 100, 0.2, 0.2, 0.2])
    ak = AdaptiveK(lambda: next(seq), k_min=1, k_max=32, patience=3)
    # 10 > 2*1 three times -> nearest power of two to 10 is 8; 3 is inside [8/2, 8*2]? no: 3 < 4, but the
    # streak is broken by 100 (other direction); 100 > 16 x3 -> 32 (k_max); 0.2 < 16 x3 -> 1.
    assert drive(ak, 12) == [1, 1, 8, 8, 8, 8, 8, 8, 32, 32, 32, 1]


def test_decides_once_per_boundary_and_not_during_warmup():
    calls = []
    ak = AdaptiveK(lambda: calls.append(1) or 100.0, k_max=16, patience=1, warmup=3)
    assert ak(0, 0) == 1 and ak(0, 1) == 1 and ak(0, 2) == 1 and not calls
    assert ak(0, 3) == 16 and ak(0, 3) == 16 and ak(1, 3) == 16
    assert len(calls) == 1  # one read (one sync) per boundary


def test_argument_errors():
    with pytest.raises(ValueError, match="k_max: 2"):
        AdaptiveK(lambda: 1.0, k_min=4, k_max=2)
    with pytest.raises(ValueError, match="band"):
        AdaptiveK(lambda: 1.0, k_max=8, band=1.2)
    with pytest.raises(TypeError, match="noise_scale"):
        AdaptiveK(3.0, k_max=8)
    with pytest.raises(ValueError, match="k_init"):
        AdaptiveK(lambda: 1.0, k_max=8, k_init=9)
    with pytest.raises(TypeError, match="k_max"):
        AdaptiveK(lambda: 1.0, k_max=8.0)


class RegressionNoise:
    """Linear regression with Gaussian inputs and label noise, where the noise scale is known.

    Per-sample loss 0.5 (x.w - y)^2, x ~ N(0, I_d), y = x.w* + e, e ~ N(0, s^2). With
    delta = w - w*: G = delta, Sigma = |delta|^2 I + delta delta^T + s^2 I, so
    B_simple = tr(Sigma) / |G|^2 = (d + 1) + d s^2 / |delta|^2.

    The estimate is the unbiased pair of McCandlish et al. 2018 (appendix A) from the
    micro-batch gradients (B_small) and the window's mean gradient (B_big), averaged
    over windows.
    """

    def __init__(self, d: int, sigma: float, delta_norm: float, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.g, self.d, self.sigma = g, d, sigma
        self.w_star = torch.randn(d, generator=g, dtype=DT)
        delta = torch.randn(d, generator=g, dtype=DT)
        self.w0 = self.w_star + delta / delta.norm() * delta_norm
        self.closed_form = (d + 1) + d * sigma**2 / delta_norm**2
        self.g2_sum = self.tr_sum = 0.0
        self.n = 0
        self.micro: list[torch.Tensor] = []

    def sample(self, b: int):
        x = torch.randn(b, self.d, generator=self.g, dtype=DT)
        y = x @ self.w_star + self.sigma * torch.randn(b, generator=self.g, dtype=DT)
        return x, y

    def record_micro(self, grad: torch.Tensor) -> None:
        self.micro.append(grad.detach().clone())

    def close_window(self, b_small: int) -> None:
        k = len(self.micro)
        if k < 2:
            self.micro = []
            return
        big = torch.stack(self.micro).mean(0)
        small_sq = torch.stack([m.pow(2).sum() for m in self.micro]).mean().item()
        big_sq = big.pow(2).sum().item()
        b_big = k * b_small
        self.g2_sum += (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
        self.tr_sum += (small_sq - big_sq) / (1 / b_small - 1 / b_big)
        self.n += 1
        self.micro = []

    def estimate(self):
        return None if self.n == 0 or self.g2_sum <= 0 else self.tr_sum / self.g2_sum


@pytest.mark.parametrize("d, sigma, b", [(4, 1.0, 1), (8, 2.0, 4)])
def test_moves_to_the_closed_form_noise_scale(d, sigma, b):
    """Driving a real wrapper: K converges to the power of two nearest B_simple / b, and stays."""
    prob = RegressionNoise(d, sigma, delta_norm=1.0)
    w = nn.Parameter(prob.w0.clone())
    inner = torch.optim.SGD([w], lr=0.0)  # lr 0: the noise scale stays at its closed form
    ak = AdaptiveK(prob.estimate, k_min=1, k_max=64, micro_batch_size=b, k_init=2, patience=3, warmup=20)
    opt = accumopt.AccumulatingOptimizer(inner, ak, mode="buffered")
    ks = []
    for _ in range(4000):
        x, y = prob.sample(b)
        (0.5 * (x @ w - y) ** 2).mean().backward()
        prob.record_micro(w.grad)
        k_before = opt.accumulation_steps
        opt.step()
        if opt.stepped:
            prob.close_window(b)
            ks.append(k_before)
        else:
            assert opt.accumulation_steps == k_before  # never mid-window
        if len(ks) >= 150:
            break
    target = prob.closed_form / b
    assert abs(prob.estimate() / prob.closed_form - 1) < 0.25  # the estimator is reasonable
    below = 2 ** math.floor(math.log2(target))
    assert ks[0] == 2 and ks[-1] in (below, 2 * below)  # one of the two powers of two around the target
    assert sum(a != c for a, c in zip(ks, ks[1:])) <= 2  # monotone approach, no back-and-forth
    assert all(a <= c for a, c in zip(ks, ks[1:]))


def test_reads_the_wrapper_estimate_when_no_source_is_given():
    ak = AdaptiveK(k_max=64, micro_batch_size=4, patience=1)
    ak.attach(lambda: 40.0)  # what the wrapper gives: its estimator's value
    assert ak(0, 1) == 8  # 40 / 4 = 10 -> nearest power of two is 8


def test_checkpoint_resumes_the_same_k_sequence():
    def build(values):
        it = iter(values)
        net = nn.Linear(2, 1).to(DT)
        torch.nn.init.constant_(net.weight, 0.5)
        ak = AdaptiveK(lambda: next(it), k_max=16, patience=2)
        return net, accumopt.AccumulatingOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), ak)

    values = [9.0, 9.0, 30.0, 30.0, 30.0, 2.0, 2.0, 2.0] * 4
    net_a, opt_a = build(values)
    x = torch.ones(3, 2, dtype=DT)
    log_a = []
    for i in range(25):
        net_a(x).sum().backward()
        opt_a.step()
        log_a.append(opt_a.accumulation_steps)
        if i == 11:
            sd = copy.deepcopy(opt_a.state_dict())
            consumed = opt_a.num_updates
            state = copy.deepcopy(net_a.state_dict())
    net_b, opt_b = build(values[consumed:])
    net_b.load_state_dict(state)
    opt_b.load_state_dict(sd)
    log_b = []
    for i in range(12, 25):
        net_b(x).sum().backward()
        opt_b.step()
        log_b.append(opt_b.accumulation_steps)
    assert log_b == log_a[12:]
    assert len(set(log_a)) > 1
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(p, q)
    opt_a.discard()  # both stopped mid-window on purpose
    opt_b.discard()


def test_with_the_wrappers_own_noise_scale_estimator():
    """noise_scale=None reads opt.noise_scale() (accumopt.noise, weights in samples)."""
    d, sigma, b = 4, 1.0, 2
    prob = RegressionNoise(d, sigma, delta_norm=1.0, seed=1)
    w = nn.Parameter(prob.w0.clone())
    ak = AdaptiveK(k_min=2, k_max=64, micro_batch_size=b, patience=3, warmup=20)
    opt = accumopt.AccumulatingOptimizer(torch.optim.SGD([w], lr=0.0), ak, mode="buffered", noise_scale=0.9)
    ks = []
    for _ in range(6000):
        x, y = prob.sample(b)
        (0.5 * (x @ w - y) ** 2).mean().backward()
        k_before = opt.accumulation_steps
        opt.step(weight=b)
        if opt.stepped:
            ks.append(k_before)
        if len(ks) >= 120:
            break
    target = prob.closed_form / b  # 9 samples / 2 = 4.5 micro-batches
    assert abs(opt.noise_scale().item() / prob.closed_form - 1) < 0.35
    assert ks[0] == 2 and ks[-1] in (4, 8) and 4 <= target <= 8
    runs = [k for i, k in enumerate(ks) if i == 0 or ks[i - 1] != k]
    assert len(runs) <= 3 and len(set(runs)) == len(runs)  # at most two moves, never back to a left value


@pytest.mark.parametrize("mode", ["buffered", "inplace"])
def test_k_min_1_with_the_wrappers_estimator_still_adapts(mode):
    """A window of one micro-batch gives the estimator nothing; with k_min=1 (the documented example)
    K must not get stuck at 1: the built-in estimator's floor is 2, and K moves to the noise scale."""
    d, sigma, b = 4, 1.0, 2
    prob = RegressionNoise(d, sigma, delta_norm=1.0, seed=1)
    w = nn.Parameter(prob.w0.clone())
    ak = AdaptiveK(k_min=1, k_max=64, micro_batch_size=b, patience=3, warmup=20)
    opt = accumopt.AccumulatingOptimizer(torch.optim.SGD([w], lr=0.0), ak, mode=mode, noise_scale=0.9)
    assert opt.accumulation_steps == 2
    ks = []
    for _ in range(6000):
        x, y = prob.sample(b)
        opt.backward((0.5 * (x @ w - y) ** 2).mean(), weight=b)
        opt.step()
        if opt.stepped:
            ks.append(opt.accumulation_steps)
        if len(ks) >= 150:
            break
    assert min(ks) >= 2 and ks[-1] in (4, 8)  # 9 samples / 2 per micro-batch = 4.5 micro-batches


def test_adaptive_k_without_an_estimate_is_refused():
    net = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="AdaptiveK has no noise-scale estimate"):
        accumopt.AccumulatingOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), AdaptiveK(k_max=8))


def test_a_users_estimate_is_read_after_the_update_it_follows():
    """A callable noise_scale is sampled when the window closes, after the inner step (it may read state
    the update changed), not ahead with the update's host read."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    seen: list[int] = []
    opt: accumopt.AccumulatingOptimizer | None = None

    def estimate() -> torch.Tensor:
        assert opt is not None
        seen.append(opt.num_updates)
        return torch.tensor(4.0, dtype=torch.float64)

    ak = AdaptiveK(noise_scale=estimate, k_min=1, k_max=8, micro_batch_size=1, patience=1, warmup=0)
    opt = accumopt.AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), ak)
    x = torch.randn(40, 4, dtype=torch.float64)
    for i in range(20):
        model(x[2 * i:2 * i + 2]).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    opt.discard()
    assert seen and seen == list(range(1, len(seen) + 1))  # read once per closed window, after its update
