"""Graph-captured micro-steps: time per real update and peak memory on CUDA.

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

* ``gpt-20m``: a GPT with 19.3M parameters (8 layers, width 256, 256 positions), micro-batch
  4 x 256 tokens, K=16. Its output layer shares the token embedding (12.9M of them): a count
  that lists that matrix twice (``state_dict()``) reads 32.1M; the table gives both;
* ``gpt-124m``: GPT-2 small shape (124M parameters), micro-batch 8 x 1024 tokens, K=8.

Peak memory is reported twice: *allocated* (``torch.cuda.max_memory_allocated``, live
tensors) and *reserved* (``torch.cuda.max_memory_reserved``, everything the caching
allocator holds from the device). A CUDA graph keeps its own private memory pool, whose
blocks stay reserved between replays whether or not a tensor lives in them, so for the
captured and reduce-overhead variants the reserved peak is the memory the graph really
costs; compare variants on it.

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
    return {"times": times, "peak": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
            "params": num_params(model), "params_listed": sum(t.numel() for t in model.state_dict().values())}


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
        print(report(case, results, updates, args.warmup))


def report(case: str, results: dict[str, dict], updates: int, warmup: int) -> str:
    """The markdown section of one case: a heading and one row per variant."""
    micro, tokens, k = CASES[case]
    ok = {v: r for v, r in results.items() if "error" not in r}
    hand = median(ok["hand-written"]["times"]) if "hand-written" in ok else None
    large = ok.get("one large batch")
    rows = []
    for v in VARIANTS:
        r = results[v]
        if "error" in r:
            rows.append([v, "failed: " + r["error"][:80], "", "", "", "", "", ""])
            continue
        t = median(r["times"])
        lo, hi = quantiles(r["times"])
        rows.append([
            v, f"{t * 1e3:.1f} [{lo * 1e3:.1f}, {hi * 1e3:.1f}]",
            f"{t / hand:.3f}" if hand else "",
            f"{t / median(large['times']):.2f}" if large else "",
            f"{r['peak'] / 2**30:.2f}",
            f"{r['peak'] / large['peak']:.3f}" if large else "",
            f"{r['reserved'] / 2**30:.2f}",
            f"{r['reserved'] / large['reserved']:.3f}" if large else "",
        ])
    first = next(iter(ok.values()), {})
    params, listed = first.get("params", 0), first.get("params_listed", 0)
    tied = f" ({listed / 1e6:.1f}M counting the tied output layer twice)" if listed != params else ""
    heading = (f"### {case}: {params / 1e6:.1f}M parameters{tied}, micro-batch {micro}x{tokens} tokens, K={k}, "
               f"bf16 autocast, fused AdamW ({updates} timed updates after {warmup} warm-up)")
    table = markdown_table(["variant", "ms / update, median [IQR]", "x hand-written", "x large batch",
                            "peak allocated GiB", "allocated x large batch", "peak reserved GiB",
                            "reserved x large batch"], rows)
    return f"\n{heading}\n\n{table}"


if __name__ == "__main__":
    main()
