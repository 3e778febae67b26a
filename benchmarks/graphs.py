"""Graph-captured micro-steps (issue 9): time per real update and peak memory on CUDA.

Variants, same model and data, each in a fresh process (so that peak memory is
its own), median over timed real updates after warm-up:

* ``hand-written``: ``loss / K``, ``backward()``, ``step(); zero_grad()`` every K.
* ``accumopt eager``: ``AccumulatingOptimizer`` around the same fused AdamW.
* ``accumopt captured``: ``accumopt.CapturedMicroStep`` (forward + backward +
  accumulation replayed as one CUDA graph per micro-batch).
* ``torch.compile reduce-overhead``: the hand-written loop on
  ``torch.compile(model, mode="reduce-overhead")``.
* ``one large batch``: the K micro-batches concatenated, one step (no accumulation).

Cases (bf16 autocast, fused AdamW):

* ``gpt-20m``: a GPT with about 20M parameters, micro-batch 4 x 256 tokens, K=16;
* ``gpt-124m``: GPT-2 small shape (124M parameters), micro-batch 8 x 1024 tokens, K=8.

    python benchmarks/graphs.py                 # both cases
    python benchmarks/graphs.py --case gpt-20m --quick

Without CUDA it prints that the benchmark needs a GPU and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accumopt  # noqa: E402
from _common import GPT, GPT_CONFIGS, machine_info, markdown_table, median, num_params, quantiles  # noqa: E402

VARIANTS = ["hand-written", "accumopt eager", "accumopt captured", "torch.compile reduce-overhead", "one large batch"]
CASES = {"gpt-20m": (4, 256, 16), "gpt-124m": (8, 1024, 8)}  # micro-batch, tokens, K


def one_variant(case: str, variant: str, warmup: int, updates: int) -> dict:
    """Run in a fresh process: seconds per real update (each timed update) and peak memory."""
    micro, tokens, k = CASES[case]
    cfg = GPT_CONFIGS[case]
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    g = torch.Generator(device="cuda").manual_seed(1)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randint(0, cfg.vocab_size, (n, tokens), device="cuda", generator=g),
                torch.randint(0, cfg.vocab_size, (n, tokens), device="cuda", generator=g))

    inner = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)

    def loss_fn(m: torch.nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return m(b[0], b[1])

    batches = [batch(micro) for _ in range(k)]
    if variant == "hand-written" or variant == "torch.compile reduce-overhead":
        fwd = torch.compile(model, mode="reduce-overhead") if variant.startswith("torch.compile") else model

        def run() -> None:
            for x, y in batches:
                if fwd is not model:
                    torch.compiler.cudagraph_mark_step_begin()
                (loss_fn(fwd, (x, y)) / k).backward()
            inner.step()
            inner.zero_grad(set_to_none=True)
    elif variant == "accumopt eager":
        opt = accumopt.AccumulatingOptimizer(inner, k)

        def run() -> None:
            for b in batches:
                loss_fn(model, b).backward()
                opt.step()
                opt.zero_grad()
    elif variant == "accumopt captured":
        opt = accumopt.AccumulatingOptimizer(inner, k)
        step = accumopt.CapturedMicroStep(opt, model, loss_fn, batches[0], capture=True)

        def run() -> None:
            for b in batches:
                step(b)
    else:
        big = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
        del batches

        def run() -> None:
            loss_fn(model, big).backward()
            inner.step()
            inner.zero_grad(set_to_none=True)

    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(updates):
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"times": times, "peak": torch.cuda.max_memory_allocated(), "params": num_params(model)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="fewer timed updates")
    parser.add_argument("--updates", type=int, default=None, help="timed real updates per variant (default 20, quick 5)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--_one", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    updates = args.updates or (5 if args.quick else 20)
    if not torch.cuda.is_available():
        print("benchmarks/graphs.py needs a CUDA GPU (CUDA graphs); none is available here, nothing measured.")
        print("On CPU, accumopt.CapturedMicroStep runs eagerly; see benchmarks/overhead.py for the CPU overhead.")
        return
    if args._one:
        print(json.dumps(one_variant(args._one[0], args._one[1], args.warmup, updates)))
        return
    cases = list(CASES) if args.case == "all" else [args.case]
    print("\n".join(f"- {k}: {v}" for k, v in machine_info("cuda")))
    for case in cases:
        micro, tokens, k = CASES[case]
        results = {}
        for v in VARIANTS:
            cmd = [sys.executable, os.path.abspath(__file__), "--_one", case, v, "--updates", str(updates),
                   "--warmup", str(args.warmup)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                results[v] = {"error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
            else:
                results[v] = json.loads(res.stdout.strip().splitlines()[-1])
        ok = {v: r for v, r in results.items() if "error" not in r}
        hand = median(ok["hand-written"]["times"]) if "hand-written" in ok else None
        large = ok.get("one large batch")
        rows = []
        for v in VARIANTS:
            r = results[v]
            if "error" in r:
                rows.append([v, "failed: " + r["error"][:80], "", "", "", ""])
                continue
            t = median(r["times"])
            lo, hi = quantiles(r["times"])
            rows.append([
                v, f"{t * 1e3:.1f} [{lo * 1e3:.1f}, {hi * 1e3:.1f}]",
                f"{t / hand:.3f}" if hand else "",
                f"{t / median(large['times']):.2f}" if large else "",
                f"{r['peak'] / 2**30:.2f}",
                f"{r['peak'] / large['peak']:.3f}" if large else "",
            ])
        params = next(iter(ok.values()))["params"] if ok else 0
        print(f"\n### {case}: {params / 1e6:.1f}M parameters, micro-batch {micro}x{tokens} tokens, K={k}, "
              f"bf16 autocast, fused AdamW ({updates} timed updates after {args.warmup} warm-up)\n")
        print(markdown_table(["variant", "ms / update, median [IQR]", "x hand-written", "x large batch",
                              "peak GiB", "memory x large batch"], rows))


if __name__ == "__main__":
    main()
