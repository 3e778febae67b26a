"""CUDA checks for mixed precision (skip without a GPU; run them whenever one is available).

* fp16 autocast + GradScaler, both patterns, against float64 sums of the same micro-batch gradients
  and against the large-batch AMP run;
* bf16 parameters: fp32 sum within 1e-6 of float64 at K=256, applied gradient within one rounding;
* ``torch.cuda.set_sync_debug_mode("error")`` around every micro-step that does not update, every policy.
"""

from __future__ import annotations

import copy

import pytest
import torch

from accumopt import AccumulatingOptimizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).to(DEV, dtype)


def make_data(n: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 16, generator=g).to(DEV, dtype), torch.randn(n, 8, generator=g).to(DEV, dtype))


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).float() - y.float()).pow(2).mean()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("pattern", ["owned", "external"])
def test_fp16_autocast_grad_scaler(pattern: str) -> None:
    k, lr, b = 4, 0.5, 8
    xs, ys = make_data(k * b)
    base = make_model()
    params = list(base.parameters())
    ref = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(k):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(base, xs[i * b:(i + 1) * b], ys[i * b:(i + 1) * b])
        for r, g in zip(ref, torch.autograd.grad(loss * 1024.0, params)):
            r += g.double() / 1024.0 / k

    big = copy.deepcopy(base)
    big_opt = torch.optim.SGD(big.parameters(), lr=lr)
    big_scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    with torch.autocast("cuda", dtype=torch.float16):
        big_loss = loss_fn(big, xs, ys)
    big_scaler.scale(big_loss).backward()
    big_scaler.step(big_opt)
    big_scaler.update()

    acc = copy.deepcopy(base)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    opt = AccumulatingOptimizer(torch.optim.SGD(acc.parameters(), lr=lr), k, mode="buffered",
                                scaler=scaler if pattern == "owned" else None)
    for i in range(k):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(acc, xs[i * b:(i + 1) * b], ys[i * b:(i + 1) * b])
        scaler.scale(loss).backward()
        if pattern == "owned":
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    assert opt.num_updates == 1
    for p0, p, pb, r in zip(base.parameters(), acc.parameters(), big.parameters(), ref):
        update = (p0.detach() - p.detach()).double() / lr
        assert rel(update, r) < 1e-5
        assert rel(update, (p0.detach() - pb.detach()).double() / lr) < 5e-3


def test_bf16_params_fp32_sum_k256() -> None:
    k = 256
    model = make_model(torch.bfloat16, seed=3)
    params = list(model.parameters())
    xs, ys = make_data(2 * k, torch.bfloat16, seed=4)
    ref = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(k):
        for r, g in zip(ref, torch.autograd.grad(loss_fn(model, xs[2 * i:2 * i + 2], ys[2 * i:2 * i + 2]), params)):
            r += g.double()
    inner = torch.optim.SGD(params, lr=0.0)
    got: list[torch.Tensor] = []
    inner.register_step_pre_hook(lambda o, a, kw: got.extend(p.grad.clone() for p in params))
    opt = AccumulatingOptimizer(inner, k + 1)
    for i in range(k):
        loss_fn(model, xs[2 * i:2 * i + 2], ys[2 * i:2 * i + 2]).backward()
        opt.step()
        opt.zero_grad()
    sums = opt.state_dict()["accumulation"]["sums"]
    assert opt.flush()
    for s, r, c in zip(sums, ref, got):
        assert s.dtype == torch.float32 and rel(s, r) <= 1e-6
        e = (r / k)
        ulp = torch.pow(2.0, torch.floor(torch.log2(e.abs().clamp_min(1e-38))) - 7)
        assert bool(((c.double() - e).abs() <= 0.5 * ulp + 2e-7 * e.abs()).all())


CONFIGS = {
    "ignore": ({}, None),
    "skip": ({"nonfinite": "skip"}, None),
    "raise": ({"nonfinite": "raise"}, None),
    "drop": ({"nonfinite": "drop", "mode": "buffered"}, None),
    "buffered": ({"mode": "buffered"}, None),
    "clip": ({"max_grad_norm": 1.0, "clip_value": 1.0, "agc_clip_factor": 0.1, "track_grad_norm": True}, None),
    "owned scaler": ({}, "owned"),
    "owned scaler + skip": ({"nonfinite": "skip"}, "owned"),
    "owned scaler + drop": ({"nonfinite": "drop", "mode": "buffered"}, "owned"),
    "external scaler": ({"mode": "buffered"}, "external"),
    "external scaler + skip": ({"mode": "buffered", "nonfinite": "skip"}, "external"),
    "external scaler + drop": ({"mode": "buffered", "nonfinite": "drop"}, "external"),
    "bf16 params + skip": ({"nonfinite": "skip"}, "bf16"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_sync_on_non_updating_micro_steps(name: str) -> None:
    kwargs, pattern = CONFIGS[name]
    k = 4
    dtype = torch.bfloat16 if pattern == "bf16" else torch.float32
    model = make_model(dtype)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)
    opt = AccumulatingOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True), k,
                                scaler=scaler if pattern == "owned" else None, **kwargs)
    xs, ys = make_data(8 * k * 3, dtype)
    torch.cuda.synchronize()
    for i in range(k * 3):
        updating = i % k == k - 1
        if not updating:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.float16, enabled=pattern in ("owned", "external")):
                loss = loss_fn(model, xs[8 * i:8 * i + 8], ys[8 * i:8 * i + 8])
            (scaler.scale(loss) if pattern in ("owned", "external") else loss).backward()
            if pattern == "external":
                scaler.step(opt)
                scaler.update()
            else:
                opt.step(loss=loss)
            opt.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert opt.num_updates + opt.stats()["skipped_updates"] == 3
