"""Buffer memory of ``mode="buffered"`` with and without selective exclusion.

Builds a stack of equal ``Linear`` layers, wraps AdamW with
``AccumulatingOptimizer(mode="buffered")`` once with nothing excluded and once
with the first half of the layers excluded (``exclude=["0.*", "1.*", ...]``),
and reports two independent figures for each:

* ``buffer_bytes``: what the wrapper says it holds (``opt.stats()["buffer_bytes"]``);
* ``measured``: bytes the allocator actually handed out while the wrapper was
  built, from ``torch.cuda.memory_allocated`` on CUDA, or from the profiler's
  CPU memory events on CPU.

Run: ``python benchmarks/buffer_memory.py [--layers 8] [--width 1024] [--device cpu]``
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from accumopt import AccumulatingOptimizer  # noqa: E402


def _build(model: torch.nn.Module, device: str, **kw) -> tuple[AccumulatingOptimizer, int]:
    """Build the wrapper; return it and the bytes allocated while building it."""
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        opt = AccumulatingOptimizer(inner, 4, mode="buffered", model=model, **kw)
        torch.cuda.synchronize()
        return opt, torch.cuda.memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt = AccumulatingOptimizer(inner, 4, mode="buffered", model=model, **kw)
    measured = sum(e.self_cpu_memory_usage for e in prof.key_averages())
    return opt, measured


def _train_window(model: torch.nn.Module, opt: AccumulatingOptimizer, width: int, device: str) -> None:
    """One full window, so that the figures hold after real use too."""
    for _ in range(opt.accumulation_steps):
        model(torch.randn(4, width, device=device)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.layers < 2 or args.layers % 2:
        ap.error("--layers must be an even number >= 2")

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)]).to(args.device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    half = [f"{i}.*" for i in range(args.layers // 2)]

    rows = []
    for label, kw in (("no exclusion", {}), (f"exclude {half[0]}..{half[-1]} (half)", {"exclude": half})):
        opt, measured = _build(model, args.device, **kw)
        _train_window(model, opt, args.width, args.device)
        state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor))
        rows.append((label, opt.stats()["buffer_bytes"], measured, state))
        del opt
        gc.collect()

    base_reported, base_measured = rows[0][1], rows[0][2]
    sys.stdout.flush()
    print(f"Parameters: {args.layers} x Linear({args.width}, {args.width}), {param_bytes / 2**20:.2f} MiB "
          f"(float32), device {args.device}, AccumulatingOptimizer(AdamW, mode='buffered')\n")
    print("| configuration | buffer_bytes (MiB) | measured allocation (MiB) | buffer ratio | AdamW state (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for label, reported, measured, state in rows:
        print(f"| {label} | {reported / 2**20:.2f} | {measured / 2**20:.2f} | "
              f"{reported / base_reported:.3f} (measured {measured / base_measured:.3f}) | {state / 2**20:.2f} |")


if __name__ == "__main__":
    main()
