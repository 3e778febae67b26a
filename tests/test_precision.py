"""Mixed precision: GradScaler both ways, fp32 accumulation for bf16/fp16 parameters, host syncs.

References are independent of the wrapper: a large-batch AMP run with the plain
torch optimizer and its own GradScaler, or float64 sums of per-micro-batch
gradients computed with plain autograd.
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from accumopt import AccumulatingOptimizer
from accumopt import hostread as hostread_module

IN, HID, OUT = 6, 5, 3


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HID), torch.nn.Tanh(), torch.nn.Linear(HID, OUT)).to(dtype)


def make_data(n: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN, generator=g).to(dtype), torch.randn(n, OUT, generator=g).to(dtype)


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).float() - y.float()).pow(2).mean() if x.dtype in (torch.float16, torch.bfloat16) \
        else (model(x) - y).pow(2).mean()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_params_close(m1: torch.nn.Module, m2: torch.nn.Module, tol: float) -> None:
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert rel(p1.detach(), p2.detach()) <= tol, (n, rel(p1.detach(), p2.detach()))


# ------------------------------------------------------------------ GradScaler, exact in float64
# Autocast leaves float64 untouched, so a float64 model under CPU autocast + GradScaler
# exercises the whole scaler plumbing while the comparison can be exact (1e-10).

def _large_batch_amp(model, xs, ys, windows, k, init_scale, growth_interval):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    for w in range(windows):
        sl = slice(w * k * 4, (w + 1) * k * 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, xs[sl], ys[sl])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return scaler


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
@pytest.mark.parametrize("use_helper", [False, True])
def test_owned_scaler_equals_large_batch_amp(mode: str, use_helper: bool) -> None:
    k, windows = 4, 3
    xs, ys = make_data(k * 4 * windows)
    ref = make_model()
    acc = copy.deepcopy(ref)
    ref_scaler = _large_batch_amp(ref, xs, ys, windows, k, 2.0**10, 1)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    opt = AccumulatingOptimizer(torch.optim.Adam(acc.parameters(), lr=1e-2), k, mode=mode, scaler=scaler)
    for i in range(k * windows):
        scale_before = scaler.get_scale() if i % k else None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(acc, xs[i * 4:(i + 1) * 4], ys[i * 4:(i + 1) * 4])
        if use_helper:
            opt.backward(loss)
        else:
            scaler.scale(loss).backward()
        opt.step()
        opt.zero_grad()
        if scale_before is not None and i % k != k - 1:
            assert scaler.get_scale() == scale_before  # constant within a window
    assert opt.num_updates == windows
    assert_params_close(acc, ref, 1e-10)
    assert scaler.get_scale() == ref_scaler.get_scale() == 2.0**10 * 2.0**windows


@pytest.mark.parametrize("growth_interval", [1, 2])
def test_external_scaler_loop_equals_large_batch_amp(growth_interval: int) -> None:
    """The unchanged AMP loop with the wrapper as optimizer: the scale changes mid-window, the sum stays right."""
    k, windows = 3, 3
    xs, ys = make_data(k * 4 * windows)
    ref = make_model()
    acc = copy.deepcopy(ref)
    _large_batch_amp(ref, xs, ys, windows, k, 2.0**4, growth_interval)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=growth_interval)
    opt = AccumulatingOptimizer(torch.optim.Adam(acc.parameters(), lr=1e-2), k, mode="buffered")
    scales = set()
    for i in range(k * windows):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(acc, xs[i * 4:(i + 1) * 4], ys[i * 4:(i + 1) * 4])
        scaler.scale(loss).backward()
        scales.add(scaler.get_scale())
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert len(scales) > k  # the scale really changed inside windows
    assert opt.num_updates == windows
    assert_params_close(acc, ref, 1e-10)


def test_external_scaler_with_user_unscale_equals_large_batch() -> None:
    """``scaler.unscale_(opt)`` before ``scaler.step(opt)`` (GradScaler then passes no grad_scale)."""
    k = 3
    xs, ys = make_data(k * 4)
    ref = make_model()
    acc = copy.deepcopy(ref)
    _large_batch_amp(ref, xs, ys, 1, k, 2.0**6, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=1)
    opt = AccumulatingOptimizer(torch.optim.Adam(acc.parameters(), lr=1e-2), k, mode="buffered")
    for i in range(k):
        scaler.scale(loss_fn(acc, xs[i * 4:(i + 1) * 4], ys[i * 4:(i + 1) * 4])).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert_params_close(acc, ref, 1e-10)


@pytest.mark.parametrize("unscale_first", [False, True])
def test_external_scaler_inplace_mode_raises_clearly(unscale_first: bool) -> None:
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2)
    scaler = torch.amp.GradScaler("cpu")
    x, y = make_data(4)
    scaler.scale(loss_fn(model, x, y)).backward()
    if unscale_first:
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="mode='inplace'.*mode='buffered'"):
        scaler.step(opt)


def test_owned_scaler_refuses_scaler_step_and_closures() -> None:
    model = make_model()
    scaler = torch.amp.GradScaler("cpu")
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, scaler=scaler)
    x, y = make_data(4)
    with pytest.raises(ValueError, match="Closures are not supported with a GradScaler"):
        opt.step(lambda: loss_fn(model, x, y))
    opt.zero_grad()
    scaler.scale(loss_fn(model, x, y)).backward()
    with pytest.raises(RuntimeError, match=r"call opt.step\(\) directly"):
        scaler.step(opt)


def test_disabled_scaler_means_none_and_foreign_scaler_rejected() -> None:
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2,
                                scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert opt.state_dict()["accumulation"]["signature"]["scaler"] is False
    with pytest.raises(TypeError, match="Invalid scaler"):
        AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, scaler=object())


@settings(max_examples=8)
@given(windows=st.integers(1, 6), k=st.integers(1, 4), growth=st.sampled_from([2.0, 4.0]))
def test_owned_scale_grows_once_per_window(windows: int, k: int, growth: float) -> None:
    """Checklist 6 and 7: init * growth^W after W clean windows, never 'unscale_() has already been called'."""
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0, growth_factor=growth, growth_interval=1)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), k, scaler=scaler)
    xs, ys = make_data(2 * k * windows + 2)
    for i in range(k * windows):
        opt.backward(loss_fn(model, xs[2 * i:2 * i + 2], ys[2 * i:2 * i + 2]))
        opt.step()
        opt.zero_grad()
    assert scaler.get_scale() == 2.0 * growth**windows
    # a partial window flushed at the end of an epoch is one more update (and one more growth)
    opt.backward(loss_fn(model, xs[-2:], ys[-2:]))
    opt.step()
    if k > 1:
        assert opt.flush()
    assert scaler.get_scale() == 2.0 * growth ** (windows + 1)


def test_scaler_state_survives_round_trip() -> None:
    """Checklist 15: scale and growth tracker travel in the wrapper's state dict."""
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=3)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), 2, scaler=scaler)
    x, y = make_data(4)
    for _ in range(4):
        opt.backward(loss_fn(model, x, y))
        opt.step()
        opt.zero_grad()
    sd = opt.state_dict()
    scaler2 = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=3)
    opt2 = AccumulatingOptimizer(torch.optim.SGD(copy.deepcopy(model).parameters(), lr=1e-3), 2, scaler=scaler2)
    opt2.load_state_dict(sd)
    assert scaler2.get_scale() == scaler.get_scale() == 8.0
    assert scaler2._get_growth_tracker() == scaler._get_growth_tracker() == 2


# ------------------------------------------------------------------ real autocast (fp32 params)

def _micro_grads_reference(model, xs, ys, k, dtype, scale):
    """Per-micro-batch autocast gradients of the scaled loss, unscaled and averaged in float64."""
    params = list(model.parameters())
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(k):
        with torch.autocast("cpu", dtype=dtype):
            loss = loss_fn(model, xs[i * 4:(i + 1) * 4], ys[i * 4:(i + 1) * 4])
        grads = torch.autograd.grad(loss * scale, params)
        for t, g in zip(total, grads):
            t += g.double() / scale
    return [t / k for t in total]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", ["owned", "external"])
def test_cpu_autocast_scaler_matches_large_batch(dtype: torch.dtype, pattern: str) -> None:
    k, lr = 4, 0.5
    xs, ys = make_data(k * 4, torch.float32)
    base = make_model(torch.float32)
    ref_grad = _micro_grads_reference(base, xs, ys, k, dtype, 2.0**12)

    # the large-batch AMP run (plain SGD, its own scaler, same settings)
    big = copy.deepcopy(base)
    big_opt = torch.optim.SGD(big.parameters(), lr=lr)
    big_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with torch.autocast("cpu", dtype=dtype):
        loss = loss_fn(big, xs, ys)
    big_scaler.scale(loss).backward()
    big_scaler.step(big_opt)
    big_scaler.update()

    acc = copy.deepcopy(base)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = AccumulatingOptimizer(torch.optim.SGD(acc.parameters(), lr=lr), k, mode="buffered",
                                scaler=scaler if pattern == "owned" else None)
    for i in range(k):
        with torch.autocast("cpu", dtype=dtype):
            loss = loss_fn(acc, xs[i * 4:(i + 1) * 4], ys[i * 4:(i + 1) * 4])
        scaler.scale(loss).backward()
        if pattern == "owned":
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    assert opt.num_updates == 1
    for p0, p, pb, g in zip(base.parameters(), acc.parameters(), big.parameters(), ref_grad):
        update = (p0.detach() - p.detach()).double() / lr
        # exact against the same micro-batch gradients summed in float64 (fp32 rounding only)
        assert rel(update, g) < 1e-5
        # against the large-batch AMP run: equal up to the autocast dtype's matmul rounding
        big_update = (p0.detach() - pb.detach()).double() / lr
        assert rel(update, big_update) < (3e-2 if dtype == torch.bfloat16 else 5e-3)


# ------------------------------------------------------------------ bf16 / fp16 parameters

def _mantissa_bits(dtype: torch.dtype) -> int:
    return {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]


def _within_half_ulp(applied: torch.Tensor, exact: torch.Tensor) -> bool:
    info = torch.finfo(applied.dtype)
    e = exact.double()
    exponent = torch.floor(torch.log2(e.abs().clamp_min(info.tiny)))
    ulp = torch.pow(2.0, exponent - _mantissa_bits(applied.dtype))
    err = (applied.double() - e).abs()
    return bool((err <= 0.5 * ulp + 2e-7 * e.abs()).all())  # 2e-7: the fp32 sum's own error may move a tie


def _low_precision_run(dtype: torch.dtype, k: int, mode: str = "inplace"):
    model = make_model(dtype, seed=3)
    params = list(model.parameters())
    xs, ys = make_data(2 * k, dtype, seed=4)
    # float64 reference: sum of the exact same micro-batch gradients (computed in `dtype`)
    ref = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(k):
        grads = torch.autograd.grad(loss_fn(model, xs[2 * i:2 * i + 2], ys[2 * i:2 * i + 2]), params)
        for r, g in zip(ref, grads):
            r += g.double()
    inner = torch.optim.SGD(params, lr=0.0)
    captured: list[torch.Tensor] = []
    inner.register_step_pre_hook(lambda o, a, kw: captured.extend(p.grad.clone() for p in params))
    opt = AccumulatingOptimizer(inner, k + 1, mode=mode)  # K+1: read the sum before the boundary
    for i in range(k):
        loss_fn(model, xs[2 * i:2 * i + 2], ys[2 * i:2 * i + 2]).backward()
        opt.step()
        opt.zero_grad()
    sums = opt.state_dict()["accumulation"]["sums"]
    assert opt.flush()
    return ref, sums, captured


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_accumulate_in_fp32(dtype: torch.dtype) -> None:
    """bf16 K=256: the fp32 sum is within 1e-6 of float64; the applied gradient within one rounding."""
    k = 256
    ref, sums, captured = _low_precision_run(dtype, k)
    assert len(sums) == len(ref) == len(captured)
    for s, r, c in zip(sums, ref, captured):
        assert s.dtype == torch.float32
        assert rel(s, r) <= 1e-6, rel(s, r)
        assert c.dtype == dtype
        assert _within_half_ulp(c, r / k)


@settings(max_examples=6)
@given(k=st.sampled_from([1, 2, 7, 33]), mode=st.sampled_from(["inplace", "buffered"]))
def test_bf16_applied_gradient_one_rounding_whatever_k(k: int, mode: str) -> None:
    ref, _, captured = _low_precision_run(torch.bfloat16, k, mode)
    for r, c in zip(ref, captured):
        assert _within_half_ulp(c, r / k)


def test_bf16_plain_grad_sum_is_worse_than_fp32_buffers() -> None:
    """Checklist 16: 64 micro-gradients of 1e-3 on top of 1.0, in bf16 .grad vs the wrapper."""
    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    inner = torch.optim.SGD([p], lr=0.0)
    got: list[torch.Tensor] = []
    inner.register_step_pre_hook(lambda o, a, kw: got.append(p.grad.clone()))
    opt = AccumulatingOptimizer(inner, 65)
    plain = torch.zeros(8, dtype=torch.bfloat16)
    for i in range(65):
        g = torch.full((8,), 1.0 if i == 0 else 1e-3, dtype=torch.bfloat16)
        plain += g
        p.grad = g.clone()
        opt.step()
    exact = (1.0 + 64 * float(torch.tensor(1e-3, dtype=torch.bfloat16))) / 65
    assert _within_half_ulp(got[0], torch.full((8,), exact, dtype=torch.float64))
    assert abs(plain[0].double().item() / 65 - exact) > 0.04 * exact  # the bf16 sum stalls at 1.0


def test_fp16_params_with_owned_scaler() -> None:
    """GradScaler refuses fp16 gradients; the wrapper's fp32 sum is cast once and unscaled exactly."""
    k = 4
    model = make_model(torch.float16, seed=5)
    params = list(model.parameters())
    xs, ys = make_data(2 * k, torch.float16, seed=6)
    ref = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(k):
        for r, g in zip(ref, torch.autograd.grad(loss_fn(model, xs[2 * i:2 * i + 2], ys[2 * i:2 * i + 2]), params)):
            r += g.double() / k
    inner = torch.optim.SGD(params, lr=0.0)
    got: list[torch.Tensor] = []
    inner.register_step_pre_hook(lambda o, a, kw: got.extend(p.grad.clone() for p in params))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    opt = AccumulatingOptimizer(inner, k, scaler=scaler)
    for i in range(k):
        opt.backward(loss_fn(model, xs[2 * i:2 * i + 2], ys[2 * i:2 * i + 2]))
        opt.step()
        opt.zero_grad()
    assert scaler.get_scale() == 2.0**9
    for c, r in zip(got, ref):
        assert c.dtype == torch.float16
        assert rel(c, r) < 2e-3


def test_accumulate_dtype_float64_for_bf16() -> None:
    model = make_model(torch.bfloat16)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 3, accumulate_dtype=torch.float64)
    x, y = make_data(2, torch.bfloat16)
    loss_fn(model, x, y).backward()
    opt.step()
    assert all(s.dtype == torch.float64 for s in opt.state_dict()["accumulation"]["sums"])
    with pytest.raises(TypeError, match="Invalid accumulate_dtype"):
        AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 3, accumulate_dtype=torch.int32)


# ------------------------------------------------------------------ host synchronisation budget

class _CountSyncs(TorchDispatchMode):
    """Counts device-to-host reads: ``.item()``, ``bool()``, ``float()`` (all dispatch to _local_scalar_dense)
    and the wrapper's own batched read ``accumopt.hostread.host_read`` (a copy to the host: free on CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __enter__(self):  # noqa: ANN204
        self._patch = mock.patch.object(hostread_module, "host_read", side_effect=self._read)
        self._patch.start()
        return super().__enter__()

    def __exit__(self, *exc):  # noqa: ANN002
        self._patch.stop()
        return super().__exit__(*exc)

    def _read(self, t):  # noqa: ANN001, ANN202
        self.count += 1
        with torch.utils._python_dispatch._disable_current_modes():
            return t.cpu().tolist()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


CONFIGS = {  # name: (constructor kwargs, scaler pattern, host reads per update)
    "default": ({}, None, 0),
    "skip": ({"nonfinite": "skip"}, None, 1),
    "raise": ({"nonfinite": "raise"}, None, 1),
    "drop": ({"nonfinite": "drop", "mode": "buffered"}, None, 1),
    "clip": ({"max_grad_norm": 1.0, "clip_value": 1.0, "agc_clip_factor": 0.1, "track_grad_norm": True}, None, 0),
    "owned scaler": ({}, "owned", 1),
    "owned scaler + skip": ({"nonfinite": "skip"}, "owned", 1),
    "owned scaler + raise": ({"nonfinite": "raise"}, "owned", 1),
    "owned scaler + drop": ({"nonfinite": "drop", "mode": "buffered"}, "owned", 1),
    "external scaler + drop": ({"mode": "buffered", "nonfinite": "drop"}, "external", 1),
    "external scaler + raise": ({"mode": "buffered", "nonfinite": "raise"}, "external", 1),
    "external scaler": ({"mode": "buffered"}, "external", 1),
    "external scaler + skip": ({"mode": "buffered", "nonfinite": "skip"}, "external", 1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_host_reads_per_configuration(name: str) -> None:
    """No host read on a non-updating micro-step; at most one per real update (SGD itself reads none)."""
    kwargs, pattern, per_update = CONFIGS[name]
    k = 3
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), k,
                                scaler=scaler if pattern == "owned" else None, **kwargs)
    xs, ys = make_data(4 * k * 2)
    for i in range(2 * k):
        with _CountSyncs() as counter:
            loss = loss_fn(model, xs[4 * i:4 * i + 4], ys[4 * i:4 * i + 4])
            (scaler.scale(loss) if pattern else loss).backward()
            if pattern == "external":
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
        assert counter.count == (per_update if i % k == k - 1 else 0), (i, counter.count)
    assert opt.num_updates == 2


def test_gradscaler_private_members_used_by_the_adapter_still_exist() -> None:
    """accumopt.amp relies on these private GradScaler members: fail loudly if torch renames or removes one."""
    import inspect

    from torch.amp.grad_scaler import OptState

    from accumopt.amp import PRIVATE_MEMBERS

    scaler = torch.amp.GradScaler("cpu")
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_data(4)
    scaler.scale(loss_fn(model, x, y)).backward()  # creates the lazily built members
    for name, kind in PRIVATE_MEMBERS.items():
        assert hasattr(scaler, name), f"torch.amp.GradScaler has no {name!r} any more"
        member = getattr(scaler, name)
        if kind == "method":
            assert callable(member), f"GradScaler.{name} is no longer a method"
        else:
            assert not callable(member), f"GradScaler.{name} is no longer a plain attribute"
    assert isinstance(scaler._scale, torch.Tensor)
    assert set(inspect.signature(scaler._unscale_grads_).parameters) == {"optimizer", "inv_scale", "found_inf",
                                                                         "allow_fp16"}
    state = scaler._per_optimizer_states[id(inner)]
    assert state["stage"] is OptState.READY and "found_inf_per_device" in state
    # The adapter's unscale equals GradScaler.unscale_ on fp32 gradients
    from accumopt.amp import LossScaler

    expected = [p.grad / scaler.get_scale() for p in model.parameters()]
    found = LossScaler(scaler).unscale_(inner)
    assert state["stage"] is OptState.UNSCALED and set(found) == {torch.device("cpu")}
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=0)


# ------------------------------------------------- micro-batch weights and the loss dtype
def _fp16_skipped_windows(weight: float, setup: str) -> tuple[int, float]:
    """Skipped windows out of 24 (K=4) and the final scale, fp16 on CPU with an owned GradScaler."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    fp16_params = setup.startswith("fp16 params")
    if fp16_params:
        model = model.half()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=6)
    mode = "buffered" if setup.endswith("buffered") else "inplace"
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), 4, scaler=scaler, mode=mode)
    g = torch.Generator().manual_seed(1)
    for _ in range(96):
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        if fp16_params:
            out = model(x.half())
        else:
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(x)
        opt.backward(torch.nn.functional.mse_loss(out.float(), y), weight=weight)
        opt.step()
    assert opt.num_updates + opt.stats()["skipped_updates"] == 24
    return opt.stats()["skipped_updates"], scaler.get_scale()


@pytest.mark.parametrize("setup", ["autocast fp32 params inplace", "fp16 params inplace", "fp16 params buffered"])
def test_large_micro_batch_weights_do_not_overflow_fp16(setup: str) -> None:
    """Token counts in the thousands: the loss scale sees numbers near 1 whatever the unit of the weights.

    Multiplying the scaled loss by the weight overflowed fp16 (0, 2, 6 and 9 skipped windows out of 24 for
    weights 1, 16, 512, 4096 here, and the scale collapsed to 32).
    """
    runs = {w: _fp16_skipped_windows(w, setup) for w in (1.0, 16.0, 512.0, 4096.0)}
    skipped = {w: r[0] for w, r in runs.items()}
    assert skipped[4096.0] <= skipped[1.0] + 1, skipped
    assert all(r[1] >= runs[1.0][1] / 2 for r in runs.values()), runs


def _bf16_weighted(mode: str, scaler: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """bf16 parameters and loss, weights 1001 and 999 (K=3; the third micro-batch has weight 0):
    the fp32 sums after two micro-batches, the applied gradients, and the float64 references
    ``1001 g1 + 999 g2`` built from the same bf16 micro-batch gradients."""
    model = make_model(torch.bfloat16, seed=3)
    params = list(model.parameters())
    x, y = make_data(6, torch.bfloat16, seed=4)
    bf16_loss = lambda i: (model(x[2 * i:2 * i + 2]) - y[2 * i:2 * i + 2]).pow(2).mean()  # noqa: E731
    assert bf16_loss(0).dtype == torch.bfloat16
    grads = [torch.autograd.grad(bf16_loss(i), params) for i in range(2)]
    ref = [1001.0 * a.double() + 999.0 * b.double() for a, b in zip(*grads)]
    inner = torch.optim.SGD(params, lr=0.0)
    applied: list[torch.Tensor] = []
    inner.register_step_pre_hook(lambda o, a, kw: applied.extend(p.grad.clone() for p in params))
    opt = AccumulatingOptimizer(inner, 3, mode=mode,
                                scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaler else None)
    for i, w in enumerate((1001.0, 999.0)):
        opt.backward(bf16_loss(i), weight=w)
        opt.step()
    scale = opt.scaler.get_scale() if scaler else 1.0
    sums = [t.clone() / scale for t in opt.accumulated_gradients().values()]
    opt.backward(bf16_loss(2), weight=0.0)
    opt.step()
    return sums, applied, ref


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
@pytest.mark.parametrize("scaler", [False, True])
def test_bf16_loss_weights_are_not_rounded_to_bf16(mode: str, scaler: bool) -> None:
    """``backward(loss, weight=1001)`` with a bf16 loss: 1001 is not rounded to 1000 (1e-3 off) on its way.

    The fp32 sum is the float64 one to fp32 precision, and the applied bf16 gradient is one rounding
    of the exact weighted mean.
    """
    sums, applied, ref = _bf16_weighted(mode, scaler)
    assert len(sums) == len(applied) == len(ref)
    for s, c, r in zip(sums, applied, ref):
        assert s.dtype == torch.float32
        assert rel(s, r) <= 1e-6, rel(s, r)
        assert c.dtype == torch.bfloat16
        assert _within_half_ulp(c, r / 2000.0)


@pytest.mark.parametrize("owned", [False, True])
def test_closure_passed_positionally_through_scaler_step_is_refused(owned: bool) -> None:
    """``scaler.step(opt, closure)`` slips past GradScaler's keyword check; the wrapper refuses it, uncalled."""
    model = make_model()
    scaler = torch.amp.GradScaler("cpu")
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, mode="buffered",
                                scaler=scaler if owned else None)
    x, y = make_data(4)
    calls: list[int] = []

    def closure() -> torch.Tensor:
        calls.append(1)
        return loss_fn(model, x, y)

    scaler.scale(loss_fn(model, x, y)).backward()
    with pytest.raises(ValueError, match="Closures are not supported with a GradScaler"):
        scaler.step(opt, closure)
    assert calls == [] and opt.pending == 0
