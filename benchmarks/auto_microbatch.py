"""Automatic micro-batching under a memory cap vs a sweep of fixed micro-batch sizes (CUDA).

The target: with a memory cap, ``MicroBatcher``'s automatic split (start from
the whole batch, halve on out-of-memory, remember the size that fits) must take
no more than 10% longer per real update than the best fixed micro-batch size.

Every variant runs in a fresh process (an OOM in one must not leave allocator
state to the next), capped with ``torch.cuda.set_per_process_memory_fraction``
to ``--cap-gib`` of device memory. All variants run the same code path,
``MicroBatcher.step`` on the same batches; a fixed size is
``MicroBatcher(opt, micro_batch_size=m, min_micro_batch_size=m, grow_after=0)``,
which raises instead of splitting (reported as OOM). Model: GPT-2-small shape
(124M parameters), bf16 autocast, fused AdamW, ``--batch`` sequences of
``--seq`` tokens per real update.

Reported per variant: median time per real update over ``--updates`` updates
after ``--warmup`` (and, for auto, the first update, which pays for the OOM
probing), the micro-batch sizes used, the peak memory.

    python benchmarks/auto_microbatch.py                 # CUDA; prints a markdown table
    python benchmarks/auto_microbatch.py --quick         # smaller model and batch
    python benchmarks/auto_microbatch.py --cpu-smoke     # no GPU: run the harness on a tiny CPU model (no cap)

Without CUDA (and without ``--cpu-smoke``) it prints why it cannot run and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accumopt  # noqa: E402
from _common import GPT, GPT_CONFIGS, GPTConfig, machine_info, markdown_table  # noqa: E402


def worker(args: argparse.Namespace) -> dict:
    """One variant, in this process: returns timings as a dict."""
    device = "cuda" if not args.cpu_smoke else "cpu"
    torch.manual_seed(0)
    if args.cpu_smoke:
        cfg = GPTConfig(vocab_size=512, block_size=args.seq, n_layer=2, n_head=2, n_embd=64)
    else:
        cfg = GPT_CONFIGS[args.model]
        cfg = GPTConfig(**{**cfg.__dict__, "block_size": max(cfg.block_size, args.seq)})
    model = GPT(cfg).to(device)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    opt = accumopt.AccumulatingOptimizer(inner, mode="buffered")
    if args.micro == "auto":
        mb = accumopt.MicroBatcher(opt, grow_after=args.grow_after)
    else:
        m = int(args.micro)
        mb = accumopt.MicroBatcher(opt, micro_batch_size=m, min_micro_batch_size=m, grow_after=0)
    g = torch.Generator(device=device).manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device, generator=g)
    batch = (data[:, :-1].contiguous(), data[:, 1:].contiguous())
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total))
        torch.cuda.reset_peak_memory_stats()

    def loss_fn(b):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            return model(b[0], b[1])

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    times, sizes = [], []
    try:
        for i in range(args.warmup + args.updates):
            sync()
            t0 = time.perf_counter()
            mb.step(batch, loss_fn)
            sync()
            times.append(time.perf_counter() - t0)
            sizes.append(list(mb.last.sizes))
    except torch.OutOfMemoryError:
        return {"micro": args.micro, "oom": True}
    steady = times[args.warmup:]
    return {
        "micro": args.micro, "oom": False, "median_s": statistics.median(steady), "first_s": times[0],
        "mean_all_s": statistics.fmean(times), "sizes_first": sizes[0], "sizes_last": sizes[-1],
        "ooms": mb.ooms, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def run_variant(args: argparse.Namespace, micro: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--micro", micro, "--model", args.model,
           "--batch", str(args.batch), "--seq", str(args.seq), "--cap-gib", str(args.cap_gib),
           "--warmup", str(args.warmup), "--updates", str(args.updates), "--grow-after", str(args.grow_after)]
    if args.cpu_smoke:
        cmd.append("--cpu-smoke")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode != 0:
        return {"micro": micro, "error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt-124m", choices=sorted(GPT_CONFIGS))
    p.add_argument("--batch", type=int, default=64, help="sequences per real update")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--cap-gib", type=float, default=16.0, help="per-process memory cap (GiB)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--updates", type=int, default=8)
    p.add_argument("--grow-after", type=int, default=50)
    p.add_argument("--sizes", default="1,2,4,8,16,32,64", help="fixed micro-batch sizes to sweep")
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--quick", action="store_true", help="gpt-20m, batch 64 x 256, cap 2 GiB")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run of the harness (no cap, no bar)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--micro", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.model, args.seq, args.cap_gib = "gpt-20m", 256, 2.0
    if args.cpu_smoke:
        args.seq, args.batch, args.warmup, args.updates = 16, 8, 1, 2
        args.sizes = "2,4,8"
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("auto_microbatch: CUDA is not available. This benchmark measures automatic micro-batching under a "
              "GPU memory cap (torch.cuda.set_per_process_memory_fraction) and needs a CUDA device; nothing was "
              "measured. Use --cpu-smoke to exercise the harness on a tiny CPU model.")
        return 0

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip() and int(s) <= args.batch]
    results = [run_variant(args, m) for m in sizes] + [run_variant(args, "auto")]
    fixed_ok = [r for r in results if r["micro"] != "auto" and not r.get("oom") and "error" not in r]
    best = min(fixed_ok, key=lambda r: r["median_s"]) if fixed_ok else None
    rows = []
    for r in results:
        if r.get("oom"):
            rows.append([r["micro"], "OOM", "", "", "", ""])
        elif "error" in r:
            rows.append([r["micro"], "error: " + " ".join(r["error"]), "", "", "", ""])
        else:
            rel = f"{r['median_s'] / best['median_s']:.3f}" if best else ""
            split = r["sizes_last"]
            split_s = f"{len(split)} x {split[0]}" if len(set(split)) == 1 else str(split)
            peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
            rows.append([r["micro"], f"{r['median_s'] * 1e3:.1f}", rel, f"{r['first_s'] * 1e3:.1f}", split_s, peak])
    dev = "cpu" if args.cpu_smoke else "cuda"
    print("\n".join(f"- {k}: {v}" for k, v in machine_info(dev)))
    print(f"- model {args.model if not args.cpu_smoke else 'tiny'}, batch {args.batch} x {args.seq} tokens, "
          f"cap {args.cap_gib} GiB" + (" (not applied on CPU)" if args.cpu_smoke else ""))
    print()
    print(markdown_table(["micro-batch", "ms / update (median)", "vs best fixed", "first update ms",
                          "split (last update)", "peak GiB"], rows))
    auto = next(r for r in results if r["micro"] == "auto")
    if best and not auto.get("oom") and "error" not in auto:
        ratio = auto["median_s"] / best["median_s"]
        print(f"\nauto / best fixed ({best['micro']}): {ratio:.3f} "
              f"({'within' if ratio <= 1.10 else 'NOT within'} the 10% bar); auto recovered {auto['ooms']} OOM(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
