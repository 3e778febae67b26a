"""Accumulation error against float64, by K, for bf16 and fp16 parameters.

For each K, the same K micro-batch gradients (computed by autograd in the
parameter dtype) are accumulated three ways and compared with their float64
mean (norm-wise relative error over all parameters):

* hand-written loop: ``(loss / K).backward()`` K times, the sum lives in the
  low-precision ``.grad`` (what most training loops do);
* accumopt, fp32 sum: the wrapper's accumulation buffer before its single cast;
* accumopt, applied: the gradient the wrapped optimizer receives (one cast);
* floor: the float64 mean rounded once to the dtype, the best any gradient in
  that dtype can be.

Usage::

    python benchmarks/precision.py            # K in 4, 16, 64, 256
    python benchmarks/precision.py --ks 4 16  # a subset
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accumopt import AccumulatingOptimizer  # noqa: E402


def make_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 16)).to(dtype)


def rel_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum(float((g.double() - r).pow(2).sum()) for g, r in zip(got, ref))
    den = sum(float(r.pow(2).sum()) for r in ref)
    return (num / den) ** 0.5


def measure(dtype: torch.dtype, k: int, batch: int = 8) -> dict[str, float]:
    model = make_model(dtype)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(k)
    xs = torch.randn(k * batch, 32, generator=g).to(dtype)
    ys = torch.randn(k * batch, 16, generator=g).to(dtype)

    def loss_of(i: int) -> torch.Tensor:
        x, y = xs[i * batch:(i + 1) * batch], ys[i * batch:(i + 1) * batch]
        return (model(x).float() - y.float()).pow(2).mean()

    # float64 mean of the very micro-batch gradients every method sees
    ref = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(k):
        for r, gr in zip(ref, torch.autograd.grad(loss_of(i), params)):
            r += gr.double()
    ref = [r / k for r in ref]

    # hand-written loop: sum in the low-precision .grad
    for p in params:
        p.grad = None
    for i in range(k):
        (loss_of(i) / k).backward()
    hand = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    # accumopt: fp32 buffers, one cast when the update is applied
    inner = torch.optim.SGD(params, lr=0.0)
    applied: list[torch.Tensor] = []
    inner.register_step_pre_hook(lambda o, a, kw: applied.extend(p.grad.clone() for p in params))
    opt = AccumulatingOptimizer(inner, k + 1)  # one more than K: read the sum before the boundary
    for i in range(k):
        loss_of(i).backward()
        opt.step()
        opt.zero_grad()
    sums = opt.state_dict()["accumulation"]["sums"]
    opt.flush()
    return {
        "hand": rel_error(hand, ref),
        "fp32 sum": rel_error([s / k for s in sums], ref),
        "applied": rel_error(applied, ref),
        "floor": rel_error([r.to(dtype) for r in ref], ref),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 16, 64, 256])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| dtype | K | hand-written loop (sum in `.grad`) | accumopt fp32 sum | accumopt applied (one cast) "
          "| floor (float64 mean, one cast) |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for k in args.ks:
            r = measure(dtype, k)
            print(f"| {name} | {k} | {r['hand']:.2e} | {r['fp32 sum']:.2e} | {r['applied']:.2e} | {r['floor']:.2e} |")


if __name__ == "__main__":
    main()
