"""MicroBatcher: memory-aware splitting with OOM recovery, by fault injection on CPU.

The reference is always an independent large-batch run: a deep copy of the model
and the plain torch optimizer stepping once on the whole batch.
"""

from __future__ import annotations

import copy
from collections import namedtuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import accumopt
from accumopt.splitting import batch_size_of, is_oom_error, slice_batch

DT = torch.float64


class Faults:
    """Shared fault-injection switchboard: which micro-batch sizes fail, where."""

    def __init__(self, forward_limit: int = 10**9, backward_limit: int = 10**9, transient: frozenset = frozenset()):
        self.forward_limit = forward_limit  # largest size whose forward fits
        self.backward_limit = backward_limit  # largest size whose backward fits
        self.transient = transient  # attempt numbers that fail in the backward whatever their size (if > 1)
        self.attempt = -1
        self.forward_failures = 0
        self.backward_failures = 0
        self.grads_present_at_failure: list[bool] = []
        self.watch: nn.Parameter | None = None  # a parameter after the failing layer

    def off(self) -> None:
        self.forward_limit = self.backward_limit = 10**9
        self.transient = frozenset()


class FailForward(nn.Module):
    def __init__(self, faults: Faults) -> None:
        super().__init__()
        self.faults = faults

    def forward(self, x):
        if x.shape[0] > self.faults.forward_limit:
            self.faults.forward_failures += 1
            raise torch.OutOfMemoryError(f"injected: forward of {x.shape[0]} samples")
        return x


class _FailBackwardFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, faults):
        ctx.faults = faults
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        f = ctx.faults
        n = grad.shape[0]
        if n > f.backward_limit or (n > 1 and f.attempt in f.transient):
            f.backward_failures += 1
            f.grads_present_at_failure.append(f.watch is not None and f.watch.grad is not None)
            raise torch.OutOfMemoryError(f"injected: backward of {n} samples")
        return grad, None


class FailBackward(nn.Module):
    def __init__(self, faults: Faults) -> None:
        super().__init__()
        self.faults = faults

    def forward(self, x):
        return _FailBackwardFn.apply(x, self.faults)


class Net(nn.Module):
    """Linear -> tanh -> [forward fault] -> Linear -> [backward fault] -> tanh -> Linear."""

    def __init__(self, faults: Faults) -> None:
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.ff = FailForward(faults)
        self.b = nn.Linear(6, 5)
        self.fb = FailBackward(faults)
        self.c = nn.Linear(5, 2)
        faults.watch = self.c.weight

    def forward(self, x):
        return self.c(torch.tanh(self.fb(self.b(self.ff(torch.tanh(self.a(x)))))))


def make(seed: int = 0, faults: Faults | None = None):
    torch.manual_seed(seed)
    faults = faults or Faults()
    model = Net(faults).to(DT)
    return model, faults


def data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    y = torch.randn(n, 2, generator=g, dtype=DT)
    return x, y, torch.arange(n)


def sgd(params):
    return torch.optim.SGD(params, lr=0.3, momentum=0.9)


def reference(model: Net, faults: Faults, batches) -> Net:
    """Plain torch: one SGD step per whole batch, no faults."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, (FailForward, FailBackward)):
            m.faults = Faults()
    opt = sgd(ref.parameters())
    for x, y, _ in batches:
        opt.zero_grad()
        ((ref(x) - y) ** 2).mean().backward()
        opt.step()
    return ref


class Recorder:
    """Counts the samples whose gradient reached the window: ids of attempts followed by opt.step."""

    def __init__(self, model: Net, faults: Faults, opt) -> None:
        self.model, self.faults = model, faults
        self.last_ids: torch.Tensor | None = None
        self.committed: list[int] = []
        self.weight_sum = 0.0
        step = opt.step

        def counting_step(*args, **kwargs):
            self.committed.extend(self.last_ids.tolist())
            self.weight_sum += kwargs.get("weight", 1.0)
            return step(*args, **kwargs)

        opt.step = counting_step

    def loss_fn(self, batch):
        x, y, ids = batch
        self.faults.attempt += 1
        self.last_ids = ids
        return ((self.model(x) - y) ** 2).mean()


def assert_close(model: nn.Module, ref: nn.Module, tol: float = 1e-10) -> None:
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        err = (p - q).abs().max().item() / max(q.abs().max().item(), 1e-30)
        assert err <= tol, f"{name}: relative error {err:.3e}"


# ---------------------------------------------------------------- the bar
@settings(max_examples=15)
@given(
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=2),
    forward_limit=st.integers(1, 30),
    backward_limit=st.integers(1, 30),
    transient=st.frozensets(st.integers(0, 40), max_size=4),
    micro=st.one_of(st.none(), st.integers(1, 30)),
    grow_after=st.integers(0, 3),
    seed=st.integers(0, 3),
)
def test_injected_oom_is_exact_and_uses_every_sample_once(sizes, forward_limit, backward_limit, transient, micro,
                                                          grow_after, seed):
    model, faults = make(seed, Faults(forward_limit, backward_limit, transient))
    batches = [data(n, seed * 10 + i) for i, n in enumerate(sizes)]
    ref = reference(model, faults, batches)
    opt = accumopt.AccumulatingOptimizer(sgd(model.parameters()), mode="buffered")
    mb = accumopt.MicroBatcher(opt, micro_batch_size=micro, grow_after=grow_after)
    rec = Recorder(model, faults, opt)
    for x, y, ids in batches:
        rec.committed, rec.weight_sum = [], 0.0
        loss = mb.step((x, y, ids), rec.loss_fn)
        assert sorted(rec.committed) == ids.tolist()  # every sample exactly once
        assert rec.weight_sum == len(ids)
        assert sum(mb.last.sizes) == len(ids)
        assert loss.dim() == 0 and not loss.requires_grad
    assert opt.num_updates == len(batches)
    assert opt.pending == 0
    assert_close(model, ref)
    assert mb.ooms == faults.forward_failures + faults.backward_failures
    if faults.backward_failures:
        assert all(p.grad is None for p in model.parameters())  # nothing of a failed micro-batch remains


def test_forward_oom_recovers_and_remembers_the_size():
    model, faults = make(1, Faults(forward_limit=5))
    batches = [data(16, 1), data(16, 2)]
    ref = reference(model, faults, batches)
    opt = accumopt.AccumulatingOptimizer(sgd(model.parameters()), mode="buffered")
    mb = accumopt.MicroBatcher(opt, grow_after=0)
    rec = Recorder(model, faults, opt)
    mb.step(batches[0], rec.loss_fn)
    assert mb.last.sizes == [4, 4, 4, 4] and faults.forward_failures == 2  # 16 -> 8 -> 4
    mb.step(batches[1], rec.loss_fn)
    assert mb.last.sizes == [4, 4, 4, 4] and mb.last.ooms == 0  # remembered
    assert_close(model, ref)


def test_backward_oom_after_later_layers_got_gradients():
    model, faults = make(2, Faults(backward_limit=3))
    batches = [data(10, 3)]
    ref = reference(model, faults, batches)
    opt = accumopt.AccumulatingOptimizer(sgd(model.parameters()), mode="buffered")
    mb = accumopt.MicroBatcher(opt, micro_batch_size=8)
    rec = Recorder(model, faults, opt)
    mb.step(batches[0], rec.loss_fn)
    assert faults.backward_failures >= 1
    assert all(faults.grads_present_at_failure)  # the last layer's .grad was written before the failure
    assert mb.last.sizes == [2, 2, 2, 2, 2]  # 8 -> 4 -> 2, then 2 fits
    assert_close(model, ref)


def test_loss_is_the_weighted_batch_mean():
    model, faults = make(3)
    x, y, ids = data(11, 4)
    expected = ((model(x) - y) ** 2).mean().detach()
    faults.forward_limit = 3
    opt = accumopt.AccumulatingOptimizer(sgd(model.parameters()), mode="buffered")
    loss = accumopt.MicroBatcher(opt, micro_batch_size=4).step((x, y, ids), Recorder(model, faults, opt).loss_fn)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_grows_again_after_successes_and_backs_off():
    model, faults = make(4, Faults(transient=frozenset({0})))  # only the very first attempt fails
    opt = accumopt.AccumulatingOptimizer(sgd(model.parameters()), mode="buffered")
    mb = accumopt.MicroBatcher(opt, micro_batch_size=8, grow_after=2)
    rec = Recorder(model, faults, opt)
    mb.step(data(16, 5), rec.loss_fn)
    assert mb.last.sizes[0] == 4 and mb.last.ooms == 1  # 8 failed once, transiently
    for i in range(3):
        mb.step(data(16, 6 + i), rec.loss_fn)
    assert mb.micro_batch_size == 8  # tried again after enough successes, and it fits now
    # A size that keeps failing is retried less and less often.
    model, faults = make(4, Faults(forward_limit=4))
    opt = accumopt.AccumulatingOptimizer(sgd(model.parameters()), mode="buffered")
    mb = accumopt.MicroBatcher(opt, micro_batch_size=8, grow_after=2)
    rec = Recorder(model, faults, opt)
    for i in range(12):
        mb.step(data(16, 20 + i), rec.loss_fn)
    retries = faults.forward_failures
    assert 2 <= retries <= 5  # 8 samples retried with doubling waits (2, 4, 8, 16 micro-batches), not every 2


def test_unrecoverable_oom_discards_the_batch_and_changes_nothing():
    model, faults = make(5, Faults(backward_limit=0))
    before = [p.detach().clone() for p in model.parameters()]
    opt = accumopt.AccumulatingOptimizer(sgd(model.parameters()), mode="buffered")
    mb = accumopt.MicroBatcher(opt, micro_batch_size=4)
    with pytest.raises(torch.OutOfMemoryError, match="does not fit in memory"):
        mb.step(data(9, 7), Recorder(model, faults, opt).loss_fn)
    assert opt.pending == 0 and opt.num_updates == 0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    # The optimizer is still usable, and the next batch's update is exact.
    faults.off()
    batch = data(9, 8)
    ref = reference(model, faults, [batch])
    mb.step(batch, Recorder(model, faults, opt).loss_fn)
    assert_close(model, ref)


def test_other_errors_propagate_and_discard_the_partial_window():
    model, faults = make(6)
    opt = accumopt.AccumulatingOptimizer(sgd(model.parameters()), mode="buffered")
    mb = accumopt.MicroBatcher(opt, micro_batch_size=3)
    calls = []

    def loss_fn(b):
        calls.append(1)
        if len(calls) == 3:
            raise KeyError("user bug")
        return ((model(b[0]) - b[1]) ** 2).mean()

    with pytest.raises(KeyError):
        mb.step(data(10, 9), loss_fn)
    assert opt.pending == 0 and opt.num_updates == 0 and mb.ooms == 0
    batch = data(10, 10)
    ref = reference(model, faults, [batch])
    mb.step(batch, Recorder(model, faults, opt).loss_fn)
    assert_close(model, ref)


def test_memory_budget_shrinks_and_caps_growth():
    """A fake monitor: the forward of m samples 'uses' 100 + 10 m bytes of a 1000-byte device."""
    model, faults = make(7)
    opt = accumopt.AccumulatingOptimizer(sgd(model.parameters()), mode="buffered")
    mb = accumopt.MicroBatcher(opt, micro_batch_size=64, memory_fraction=0.5, grow_after=1)

    class FakeMonitor:
        forward_size = 0  # set by the forward, consumed by the reading right after it

        def used(self):
            used, self.forward_size = 100 + 10 * self.forward_size, 0
            return used

        def total(self):
            return 1000

        def free_cache(self):
            pass

    fake = FakeMonitor()
    mb.monitor = fake
    mb._grad_bytes = 0

    def loss_fn(b):
        fake.forward_size = b[0].shape[0]
        out = ((model(b[0]) - b[1]) ** 2).mean()
        return out

    batches = [data(64, 11), data(64, 12), data(64, 13)]
    ref = reference(model, faults, batches)
    for b in batches:
        mb.step(b, loss_fn)
    # 500 bytes budget: 100 + 10 m <= 500 -> m <= 40; sizes halve from 64 to 32 and never grow back to 64.
    assert mb.last.sizes == [32, 32]
    assert mb.micro_batch_size == 32
    assert_close(model, ref)


# ---------------------------------------------------------------- batches and errors
def test_batch_structures():
    Pair = namedtuple("Pair", "x y")
    x = torch.arange(12.0).reshape(6, 2)
    batch = {"pair": Pair(x, x[:, 0]), "captions": ["a", "b", "c", "d", "e", "f"], "scale": 2.0,
             "t0": torch.tensor(3.0), "list": [x, x]}
    assert batch_size_of(batch) == 6
    part = slice_batch(batch, 2, 5)
    assert isinstance(part["pair"], Pair) and torch.equal(part["pair"].x, x[2:5])
    assert part["captions"] == ["c", "d", "e"] and part["scale"] == 2.0 and part["t0"].item() == 3.0
    assert torch.equal(part["list"][1], x[2:5])
    with pytest.raises(ValueError, match="different leading sizes"):
        batch_size_of((torch.zeros(3), torch.zeros(4)))
    with pytest.raises(ValueError, match="no tensor"):
        batch_size_of({"a": 1})


def test_dict_batch_end_to_end():
    model, faults = make(8, Faults(forward_limit=2))
    x, y, ids = data(7, 14)
    ref = reference(model, faults, [(x, y, ids)])
    opt = accumopt.AccumulatingOptimizer(sgd(model.parameters()), mode="buffered")
    accumopt.MicroBatcher(opt).step({"x": x, "y": y}, lambda b: ((model(b["x"]) - b["y"]) ** 2).mean())
    assert_close(model, ref)


def test_argument_errors():
    model, _ = make(9)
    inplace = accumopt.AccumulatingOptimizer(sgd(model.parameters()))
    with pytest.raises(ValueError, match="mode='buffered'"):
        accumopt.MicroBatcher(inplace)
    with pytest.raises(TypeError, match="AccumulatingOptimizer"):
        accumopt.MicroBatcher(sgd(model.parameters()))
    opt = accumopt.AccumulatingOptimizer(sgd(model.parameters()), mode="buffered")
    with pytest.raises(ValueError, match="micro_batch_size: 0"):
        accumopt.MicroBatcher(opt, micro_batch_size=0)
    with pytest.raises(ValueError, match="memory_fraction"):
        accumopt.MicroBatcher(opt, memory_fraction=1.5)
    with pytest.raises(ValueError, match=r"^Invalid micro_batch_size: 2 \(expected an int >= min_micro_batch_size=4\)$"):
        accumopt.MicroBatcher(opt, micro_batch_size=2, min_micro_batch_size=4)
    with pytest.raises(TypeError, match="grow_after"):
        accumopt.MicroBatcher(opt, grow_after=1.5)
    mb = accumopt.MicroBatcher(opt)
    with pytest.raises(TypeError, match="scalar loss"):
        mb.step(data(4, 0)[:2], lambda b: model(b[0]))  # not a scalar
    assert opt.pending == 0
    x, y, _ = data(4, 0)
    opt4 = accumopt.AccumulatingOptimizer(sgd(model.parameters()), 4, mode="buffered")
    ((model(x) - y) ** 2).mean().backward()
    opt4.step()
    with pytest.raises(RuntimeError, match="pending"):
        accumopt.MicroBatcher(opt4).step((x, y), lambda b: ((model(b[0]) - b[1]) ** 2).mean())
    opt4.discard()  # the pending window that made MicroBatcher refuse


def test_is_oom_error():
    assert is_oom_error(torch.OutOfMemoryError("x"))
    assert is_oom_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    assert is_oom_error(RuntimeError("CUDA error: out of memory"))
    assert not is_oom_error(RuntimeError("shape mismatch"))
    assert not is_oom_error(ValueError("out of memory"))


def test_memory_monitor_reads_cpu():
    mon = accumopt.MemoryMonitor("cpu")
    snap = mon.snapshot()
    assert 0 < snap["used"] <= snap["total"] and snap["peak"] > 0
