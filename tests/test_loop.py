"""The plain training loop: zero_grad anywhere, flush, counters, closures, add_param_group, resume.

Every comparison is against the plain torch optimizer on the large batch.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from accumopt import AccumulatingOptimizer

MODES = ["inplace", "buffered"]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()


def _data(n_micro: int, micro: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(micro, 3, generator=g, dtype=torch.float64),
             torch.randn(micro, 2, generator=g, dtype=torch.float64)) for _ in range(n_micro)]


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _adam(model):
    return torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.01)


def _reference(model, micro_batches, windows: list[int], make=_adam):
    """Plain optimizer: one step per window of ``windows[i]`` consecutive micro-batches (equal sizes)."""
    opt = make(model)
    it = iter(micro_batches)
    for size in windows:
        chunk = [next(it) for _ in range(size)]
        x, y = torch.cat([c[0] for c in chunk]), torch.cat([c[1] for c in chunk])
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    return opt


def _assert_same(model, ref_model, rtol=1e-10):
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=0.0, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------ zero_grad
POSITIONS = ["before_forward", "before_backward", "after_step", "twice", "never", "set_to_none_false"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("position", POSITIONS)
def test_zero_grad_in_every_position(position, mode):
    K, data = 4, _data(12)
    model = _model()
    ref_model = copy.deepcopy(model)
    opt = AccumulatingOptimizer(_adam(model), K, mode=mode)
    for x, y in data:
        if position in ("before_forward", "twice"):
            opt.zero_grad()
        if position == "set_to_none_false":
            opt.zero_grad(set_to_none=False)
        out = model(x)
        if position == "before_backward":
            opt.zero_grad()
        torch.nn.functional.mse_loss(out, y).backward()
        opt.step()
        if position in ("after_step", "twice"):
            opt.zero_grad()
    _reference(ref_model, data, [K] * 3)
    assert opt.num_updates == 3
    _assert_same(model, ref_model)


# ---------------------------------------------------------------------- flush
@pytest.mark.parametrize("mode", MODES)
def test_flush_averages_partial_window_and_leaks_nothing(mode):
    """2 full windows, a partial one of 3 (flushed, averaged over 3), then 2 more full windows."""
    K, data = 4, _data(4 + 4 + 3 + 4 + 4)
    model = _model()
    ref_model = copy.deepcopy(model)
    opt = AccumulatingOptimizer(_adam(model), K, mode=mode)
    for i, (x, y) in enumerate(data):
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        if i == 10:  # end of "epoch": 3 micro-batches pending
            assert opt.pending == 3 and not opt.stepped
            assert opt.flush() is True
            assert opt.stepped and opt.pending == 0
    _reference(ref_model, data, [4, 4, 3, 4, 4])
    assert opt.num_updates == 5
    _assert_same(model, ref_model)


def test_flush_on_empty_window_is_a_no_op():
    model = _model()
    opt = AccumulatingOptimizer(_adam(model), 2)
    before = copy.deepcopy(model.state_dict())
    assert opt.flush() is False
    assert opt.num_updates == 0 and not opt.state
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_flush_with_weights_normalises_by_their_sum():
    """Buffered mode, step(weight=n) after backward: the partial window is sum(n_i g_i) / sum(n_i)."""
    sizes = [3, 1]
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64)
    model = _model()
    ref_model = copy.deepcopy(model)
    opt = AccumulatingOptimizer(_adam(model), 8, mode="buffered")
    for xm, ym in zip(x.split(sizes), y.split(sizes)):
        _loss(model, xm, ym).backward()
        opt.step(weight=len(xm))
    assert opt.flush()
    ref = _adam(ref_model)
    _loss(ref_model, x, y).backward()
    ref.step()
    _assert_same(model, ref_model)


# ------------------------------------------------------------------- counters
@pytest.mark.parametrize("mode", MODES)
def test_counters_and_bitwise_unchanged_between_boundaries(mode):
    K = 3
    model = _model()
    opt = AccumulatingOptimizer(_adam(model), K, mode=mode)
    for n, (x, y) in enumerate(_data(10), start=1):
        params = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(opt.optimizer.state_dict())
        assert opt.sync_gradients == ((n - 1) % K == K - 1)
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        boundary = n % K == 0
        assert opt.stepped == boundary
        assert opt.pending == n % K
        assert opt.num_updates == n // K
        if not boundary:
            assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
            assert repr(state) == repr(opt.optimizer.state_dict())
    assert opt.accumulation_steps == K
    opt.discard()  # 10 micro-batches, K=3: the last window stays open on purpose


# ------------------------------------------------------------------- closures
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("zero_grad_inside", [False, True])
def test_closure_is_one_micro_batch_called_once(mode, zero_grad_inside):
    """step(closure): the closure computes ONE micro-batch's loss and backward; it is called exactly once."""
    K, data = 2, _data(6)
    model = _model()
    ref_model = copy.deepcopy(model)
    opt = AccumulatingOptimizer(_adam(model), K, mode=mode)
    calls = []
    for x, y in data:
        def closure(x=x, y=y):
            calls.append(1)
            if zero_grad_inside:
                opt.zero_grad()  # the usual torch closure: safe, pending sums are kept
            loss = _loss(model, x, y)
            loss.backward()
            return loss
        result = opt.step(closure)
        assert isinstance(result, torch.Tensor) and result.requires_grad
    assert len(calls) == len(data)
    _reference(ref_model, data, [K] * 3)
    _assert_same(model, ref_model)


def test_closure_runs_with_grad_enabled():
    model = _model()
    opt = AccumulatingOptimizer(_adam(model), 1)
    with torch.no_grad():
        loss = opt.step(lambda: _loss(model, *_data(1)[0]).backward() or 1.0)
    assert loss == 1.0 and opt.num_updates == 1


# ------------------------------------------------------------ add_param_group
@pytest.mark.parametrize("mode", MODES)
def test_add_param_group_after_wrapping(mode):
    """A layer frozen at first joins after the first update, with its own lr; buffers are created."""
    K, data = 2, _data(6)

    def run(accumulate: bool):
        model = _model()
        model[2].requires_grad_(False)
        opt = torch.optim.AdamW(model[0].parameters(), lr=0.05)
        if accumulate:
            opt = AccumulatingOptimizer(opt, K, mode=mode)
        it = iter(data)
        for window in range(3):
            if window == 1:
                model[2].requires_grad_(True)
                opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.01})
            chunk = [next(it) for _ in range(K)]
            if accumulate:
                for x, y in chunk:
                    _loss(model, x, y).backward()
                    opt.step()
                    opt.zero_grad()
            else:
                opt.zero_grad()
                _loss(model, torch.cat([c[0] for c in chunk]), torch.cat([c[1] for c in chunk])).backward()
                opt.step()
        return model, opt

    model, opt = run(True)
    ref_model, ref = run(False)
    assert opt.param_groups is opt.optimizer.param_groups and len(opt.param_groups) == 2
    assert len(list(opt._store.params)) == 4  # the new parameters are accumulated
    if mode == "buffered":
        assert opt.stats()["buffer_bytes"] == sum(p.numel() * 8 for p in model.parameters())
    _assert_same(model, ref_model)
    assert model[2].weight.detach().ne(_model()[2].weight.detach()).any()


# ---------------------------------------------------------------- mid-window resume
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("j", [1, 2])
def test_state_dict_mid_window_resumes_bitwise(mode, j):
    """Save at micro-step j of window 2 (through torch.save / torch.load(weights_only=True)),
    load into fresh objects, continue: bitwise identical to the uninterrupted run."""
    K, data = 3, _data(12)

    def fresh():
        model = _model()
        return model, AccumulatingOptimizer(_adam(model), K, mode=mode)

    def train(model, opt, batches):
        for x, y in batches:
            _loss(model, x, y).backward()
            opt.step()
            opt.zero_grad()

    cut = K + j
    model, opt = fresh()
    train(model, opt, data)  # uninterrupted

    first, first_opt = fresh()
    train(first, first_opt, data[:cut])
    assert first_opt.pending == j
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    snapshot = copy.deepcopy(loaded)

    resumed, resumed_opt = fresh()
    resumed.load_state_dict(loaded["model"])
    resumed_opt.load_state_dict(loaded["opt"])
    assert resumed_opt.pending == j and resumed_opt.num_updates == 1
    assert repr(snapshot) == repr(loaded), "load_state_dict must not mutate the dict passed in"
    train(resumed, resumed_opt, data[cut:])

    assert resumed_opt.num_updates == opt.num_updates == 4
    for p, q in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(p, q)
    a, b = resumed_opt.state_dict(), opt.state_dict()
    for pid in b["state"]:
        for key, value in b["state"][pid].items():
            assert torch.equal(a["state"][pid][key], value), (pid, key)


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_with_unused_parameter_mid_window(mode):
    """A parameter without gradient so far in the window stays without one after a resume."""
    model = _model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 2, mode=mode)
    x = torch.ones(1, 3, dtype=torch.float64)
    model[0](x).sum().backward()  # only the first layer gets a gradient
    opt.step()
    sd = opt.state_dict()
    other = _model()
    opt2 = AccumulatingOptimizer(torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9), 2, mode=mode)
    opt2.load_state_dict(sd)
    for m, o in ((model, opt), (other, opt2)):
        m[0](x).sum().backward()
        o.step()
        assert o.stepped
    assert other[2].weight.grad is None and "momentum_buffer" not in opt2.state.get(other[2].weight, {})
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
@pytest.mark.parametrize("mode", ["inplace", "buffered"])
def test_zero_grad_set_to_none_false_keeps_torch_semantics_for_unused_parameters(mode, optim, k):
    """With zero_grad(set_to_none=False), torch keeps a zero .grad on a parameter once used, so momentum
    and weight decay still move it in a window where it gets no gradient: the wrapper does the same,
    whichever side of the boundary zero_grad is called on."""
    def make(params):
        if optim == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9)
        return torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)

    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 1).double(), torch.nn.Linear(3, 1).double()
    a_ref, b_ref = copy.deepcopy(a), copy.deepcopy(b)
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = make([*a_ref.parameters(), *b_ref.parameters()])
    opt = AccumulatingOptimizer(make([*a.parameters(), *b.parameters()]), k, mode=mode)
    windows = [(True, True), (True, False), (True, False)]  # branch B unused after the first window
    for w, (use_a, use_b) in enumerate(windows):
        xs = x[4 * (w % 2):4 * (w % 2) + 4]
        (a_ref(xs).pow(2).mean() + (b_ref(xs).pow(2).mean() if use_b else 0)).backward()
        ref.step()
        ref.zero_grad(set_to_none=False)
        for j in range(k):
            part = xs[4 // k * j:4 // k * (j + 1)]
            (a(part).pow(2).mean() + (b(part).pow(2).mean() if use_b else 0)).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
    for p, q in zip([*a.parameters(), *b.parameters()], [*a_ref.parameters(), *b_ref.parameters()]):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
