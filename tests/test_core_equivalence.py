"""Property: accumulated updates equal the large-batch update (float64, 1e-10 relative).

The reference is always the plain torch optimizer on the concatenated batch
(:func:`accumopt.testing.check_equivalence`); parameters AND optimizer state are
compared after every real update.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from accumopt.testing import (
    OptimizerConfig,
    check_equivalence,
    micro_batch_splits,
    optimizer_configs,
    relative_deviation,
    split_batch,
)

RTOL = 1e-10


def mse(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


@st.composite
def small_models(draw):
    """A random MLP factory and its input/output widths."""
    d_in, hidden, d_out = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
    act = draw(st.sampled_from([torch.nn.Tanh, torch.nn.SiLU, torch.nn.Identity]))
    bias = draw(st.booleans())

    def model_fn() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(d_in, hidden, bias=bias), act(), torch.nn.Linear(hidden, d_out))

    return model_fn, d_in, d_out


def _batches(sizes: list[int], d_in: int, d_out: int, updates: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    return [(torch.randn(n, d_in, generator=g, dtype=torch.float64),
             torch.randn(n, d_out, generator=g, dtype=torch.float64)) for _ in range(updates)]


@settings(max_examples=20)
@given(model=small_models(), sizes=micro_batch_splits(max_parts=8, max_size=3, equal=True),
       config=optimizer_configs(), mode=st.sampled_from(["inplace", "buffered"]),
       updates=st.integers(2, 3), seed=st.integers(0, 2**16))
def test_equal_micro_batches_match_large_batch(model, sizes, config, mode, updates, seed):
    model_fn, d_in, d_out = model
    report = check_equivalence(model_fn, mse, lambda m: config.build(m.parameters()),
                               _batches(sizes, d_in, d_out, updates, seed), len(sizes), mode=mode, rtol=RTOL)
    assert report.updates == updates and report.max_deviation <= RTOL


@settings(max_examples=15)
@given(model=small_models(), sizes=micro_batch_splits(max_parts=6, max_size=4, equal=False),
       config=optimizer_configs(), mode=st.sampled_from(["inplace", "buffered"]), seed=st.integers(0, 2**16))
def test_uneven_micro_batches_match_large_batch(model, sizes, config, mode, seed):
    """Uneven splits, each micro-batch weighted by its size (opt.backward(loss, weight=n))."""
    model_fn, d_in, d_out = model
    check_equivalence(model_fn, mse, lambda m: config.build(m.parameters()),
                      _batches(sizes, d_in, d_out, 2, seed), sizes, mode=mode, rtol=RTOL)


def test_state_is_compared_too():
    """The report lists every optimizer-state entry (moments and step), not only parameters."""
    report = check_equivalence(
        lambda: torch.nn.Linear(2, 1), mse, lambda m: torch.optim.Adam(m.parameters(), lr=0.1, amsgrad=True),
        _batches([2, 2], 2, 1, 2, 0), 2)
    assert set(report.state) == {f"{n}.{k}" for n in ("weight", "bias")
                                 for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")}
    assert set(report.parameters) == {"weight", "bias"}


def test_kit_detects_a_wrong_accumulation():
    """The check can fail: a *sum* loss over micro-batches is not the large batch's mean update."""
    def summed(model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y, reduction="sum")

    with pytest.raises(AssertionError, match=r"Equivalence FAILED.*\n.*param"):
        # micro-batches of the *sum* loss, mean-accumulated: 1/K of the large-batch gradient
        check_equivalence(lambda: torch.nn.Linear(3, 2), summed,
                          lambda m: torch.optim.SGD(m.parameters(), lr=0.01), _batches([2] * 4, 3, 2, 1, 0), 4)


def test_kit_reports_early_update(monkeypatch):
    """A structural problem (an update before the window closes) fails the check."""
    import accumopt.testing as kit

    class Early(kit.AccumulatingOptimizer):  # a broken wrapper: closes windows after K/2 micro-batches
        def __init__(self, optimizer, accumulation_steps, **kw):
            super().__init__(optimizer, max(1, accumulation_steps // 2), **kw)

    monkeypatch.setattr(kit, "AccumulatingOptimizer", Early)
    with pytest.raises(AssertionError, match=r"micro-batch 1: stepped=True \(expected False\)"):
        kit.check_equivalence(lambda: torch.nn.Linear(3, 2), mse, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                              _batches([2] * 4, 3, 2, 1, 0), 4)


def test_relative_deviation():
    a = torch.tensor([1.0, 2.0, -4.0], dtype=torch.float64)
    assert relative_deviation(a, a) == 0.0
    assert relative_deviation(a + torch.tensor([0.0, 0.0, 4e-3], dtype=torch.float64), a) == pytest.approx(1e-3)
    assert relative_deviation(torch.zeros(2), torch.zeros(2)) == 0.0
    assert relative_deviation(torch.zeros(2), torch.zeros(3)) == float("inf")
    assert relative_deviation(torch.tensor([float("nan")]), torch.tensor([1.0])) == float("inf")


def test_split_batch_uneven_and_checks():
    x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    parts = split_batch((x, y), [2, 3])
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and [len(p[1]) for p in parts] == [2, 3]
    with pytest.raises(ValueError, match=r"Invalid micro_batches: \[2, 2\] \(expected sizes >= 1 adding up to the batch size 5\)"):
        split_batch((x, y), [2, 2])


def test_namedtuple_and_text_batches_split_and_check():
    from collections import namedtuple

    Batch = namedtuple("Batch", "x y tags")
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(6, 3, generator=g), torch.randn(6, 1, generator=g), [f"s{i}" for i in range(6)])
    parts = split_batch(batch, [2, 4])
    assert [type(p) for p in parts] == [Batch, Batch] and [p.tags for p in parts] == [batch.tags[:2], batch.tags[2:]]
    assert torch.equal(parts[1].x, batch.x[2:])

    def loss_fn(model, b):
        assert len(b.tags) == len(b.x)  # the per-sample strings travel with their rows
        return torch.nn.functional.mse_loss(model(b.x), b.y)

    report = check_equivalence(lambda: torch.nn.Linear(3, 1), loss_fn,
                               lambda m: torch.optim.SGD(m.parameters(), lr=0.1), [batch], micro_batches=[2, 4])
    assert report.passed, report


@settings(max_examples=30)
@given(sizes=micro_batch_splits(max_parts=5, max_size=3, equal=False))
def test_uneven_strategy_draws_uneven(sizes):
    assert 2 <= len(sizes) <= 5 and len(set(sizes)) > 1 and all(1 <= s <= 3 for s in sizes)


@settings(max_examples=30)
@given(config=optimizer_configs(["SGD", "AdamW"]))
def test_optimizer_configs_build(config):
    assert isinstance(config, OptimizerConfig)
    opt = config.build([torch.nn.Parameter(torch.zeros(2))])
    assert type(opt) in (torch.optim.SGD, torch.optim.AdamW)
    assert config.cls.__name__ in repr(config)


def test_optimizer_configs_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"Invalid names: \['LBFGS'\]"):
        optimizer_configs(["SGD", "LBFGS"])


# ---------------------------------------------------------------- model shapes
class Branchy(torch.nn.Module):
    """A branch used only by the samples whose first feature is positive."""

    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(3, 2)
        self.branch = torch.nn.Linear(3, 2)

    def forward(self, x):
        out = self.base(x)
        mask = x[:, 0] > 0
        if bool(mask.any()):
            out = out.index_add(0, mask.nonzero().flatten(), self.branch(x[mask]))
        return out


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
@pytest.mark.parametrize("opt", ["SGD", "AdamW"])
def test_unused_branch_in_some_micro_batches(mode, opt):
    """The branch gets no gradient in some micro-batches (and none at all in one window)."""
    x = torch.randn(3, 8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x[:, :, 0] = -1.0
    x[0, 1, 0] = x[0, 6, 0] = 1.0  # window 0: the branch only in micro-batches 0 and 3
    x[2, 5, 0] = 1.0  # window 2: only micro-batch 2; window 1: never (torch skips it there)
    batches = [(xi, torch.randn(8, 2, dtype=torch.float64)) for xi in x]
    factory = {"SGD": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1),
               "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=0.1)}[opt]
    report = check_equivalence(Branchy, mse, factory, batches, 4, mode=mode)
    assert report.parameters["branch.weight"] <= RTOL


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
def test_mixed_float32_and_float64_parameters(mode):
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 4).double()
            self.b = torch.nn.Linear(4, 2).float()

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)).float()).double()

    batches = _batches([2, 2, 2], 3, 2, 3, 1)
    report = check_equivalence(Mixed, mse, lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
                               batches, 3, dtype=None, mode=mode, rtol=1e-5)
    assert report.parameters["a.weight"] <= 1e-5  # the float64 part is affected by float32 rounding only


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
def test_multiple_param_groups(mode):
    def factory(m):
        return torch.optim.AdamW([{"params": m[0].parameters(), "lr": 0.1, "weight_decay": 0.0},
                                  {"params": m[2].parameters()}], lr=1e-2, weight_decay=0.1)

    check_equivalence(lambda: torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)),
                      mse, factory, _batches([3, 1, 2], 3, 2, 3, 2), [3, 1, 2], mode=mode)
