"""Overhead of AccumulatingOptimizer against a hand-written accumulation loop.

Same model, same data, one process, variants run in alternation (the order
rotates every round), median time per real update; peak memory measured in a
fresh subprocess per variant. Both are reported as ratios to the hand-written
loop (``loss / K``; ``loss.backward()``; ``opt.step(); opt.zero_grad()`` every K).

Variants: ``accumopt`` (default in-place mode), ``accumopt + layer weights``
(compared with ``accumopt``), ``accumopt buffered`` (for
information: one buffer per parameter by design, so more memory).

CPU (always): an MLP whose micro-step takes tens of milliseconds. Peak memory on
CPU is the growth of the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` once the model and the data exist) over the resident
set at that point, in a fresh process per variant (Linux), with glibc told to serve every allocation of 64 KiB or more
by mmap (``MALLOC_MMAP_THRESHOLD_=65536``) so that freed tensors leave the
resident set and the peak follows the bytes of live tensors.

CUDA (when available): a GPT-2-small-shaped model (124M parameters), bf16
autocast, fused AdamW, micro-batch 8 x 1024 tokens, K=8; peak memory is
``torch.cuda.max_memory_allocated`` in a fresh process per variant.

    python benchmarks/overhead.py            # CPU, then CUDA if present
    python benchmarks/overhead.py --quick    # a smaller, faster run
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accumopt  # noqa: E402

# The layer-weights variant measures cost, not effect: its weights with AdamW are deliberate here.
warnings.filterwarnings("ignore", message="accumulation weights")
from _common import GPT, GPT_CONFIGS, machine_info, markdown_table, median, num_params, quantiles  # noqa: E402

VARIANTS = ["hand-written", "accumopt", "accumopt + layer weights", "accumopt buffered"]


# ------------------------------------------------------------------------- cases
class Case:
    """A model factory, micro-batches, the loss and the inner optimizer for one device."""

    def __init__(self, device: str, quick: bool) -> None:
        self.device = device
        g = torch.Generator().manual_seed(0)
        if device == "cpu":
            d_in, hidden, batch = (512, 1024, 32) if quick else (1024, 1536, 32)
            self.k = 4
            self.describe = f"MLP {d_in}-{hidden}-{hidden}-{d_in}, fp32, AdamW, micro-batch {batch}, K={self.k}"
            torch.manual_seed(0)
            self.base = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                      nn.Linear(hidden, d_in))
            self.batches = [(torch.randn(batch, d_in, generator=g), torch.randn(batch, d_in, generator=g))
                            for _ in range(self.k)]
            self.layer_weights = {"0.*": 0.5, "4.weight": 2.0}
        else:
            cfg = GPT_CONFIGS["gpt-124m"]
            batch, tokens = (8, 1024) if not quick else (4, 1024)
            self.k = 8
            torch.manual_seed(0)
            self.base = GPT(cfg).to(device)
            self.describe = (f"GPT {num_params(self.base) / 1e6:.0f}M params, bf16 autocast, fused AdamW, "
                             f"micro-batch {batch}x{tokens} tokens, K={self.k}")
            self.batches = [
                (torch.randint(0, cfg.vocab_size, (batch, tokens), generator=g).to(device),
                 torch.randint(0, cfg.vocab_size, (batch, tokens), generator=g).to(device))
                for _ in range(self.k)
            ]
            self.layer_weights = {"h.0.*": 0.5, "ln_f.weight": 2.0}

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.device == "cpu":
            return F.mse_loss(model(x), y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x, y)

    def inner(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.device == "cpu":
            return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        return torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def make_runner(case: Case, variant: str, model: nn.Module) -> Callable[[], None]:
    """A function running one real update (K micro-steps) of ``variant`` on ``model``."""
    k, batches, loss_of = case.k, case.batches, case.loss
    if variant == "hand-written":
        opt = case.inner(model)

        def run() -> None:
            for i, (x, y) in enumerate(batches):
                loss = loss_of(model, x, y) / k
                loss.backward()
                if (i + 1) % k == 0:
                    opt.step()
                    opt.zero_grad(set_to_none=True)

        return run
    kwargs: dict[str, Any] = {}
    if variant == "accumopt + layer weights":
        kwargs = {"model": model, "layer_weights": case.layer_weights}
    elif variant == "accumopt buffered":
        kwargs = {"mode": "buffered"}
    wopt = accumopt.AccumulatingOptimizer(case.inner(model), k, **kwargs)

    def run() -> None:
        for x, y in batches:
            loss = loss_of(model, x, y)
            loss.backward()
            wopt.step()
            wopt.zero_grad()
        if not wopt.stepped:
            raise RuntimeError("benchmark bug: the window did not close on the K-th micro-step")

    return run


# ------------------------------------------------------------------------ timing
def time_variants(case: Case, rounds: int, updates: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per real update, one sample per round and variant (variants alternate, order rotating)."""
    runners = {v: make_runner(case, v, copy.deepcopy(case.base)) for v in VARIANTS}
    for run in runners.values():
        for _ in range(warmup):
            run()
    case.sync()
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        if r % 2:
            order = order[::-1]
        for v in order:
            gc.collect()
            case.sync()
            t0 = time.perf_counter()
            for _ in range(updates):
                runners[v]()
            case.sync()
            samples[v].append((time.perf_counter() - t0) / updates)
    return samples


# ------------------------------------------------------------------------ memory
def probe(device: str, variant: str, quick: bool, updates: int) -> dict[str, float]:
    """Run in a fresh process: peak memory of ``updates`` real updates of ``variant``."""
    case = Case(device, quick)
    gc.collect()
    if device == "cuda":  # from here on: optimizer (and wrapper) state, gradients, activations
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _status_kib("VmRSS") * 1024
    run = make_runner(case, variant, case.base)
    for _ in range(updates):
        run()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    return {"base": float(base), "peak": float(peak)}


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_memory(device: str, quick: bool, updates: int, threads: int) -> dict[str, dict[str, float]]:
    out = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for v in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), "--_probe", v, "--device", device,
               "--updates", str(updates), "--threads", str(threads)] + (["--quick"] if quick else [])
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        out[v] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ------------------------------------------------------------------------ report
def report(device: str, describe: str, samples: dict[str, list[float]], memory: dict[str, dict[str, float]], rounds: int,
           updates: int) -> str:
    hand = median(samples["hand-written"])
    unweighted = median(samples["accumopt"])
    paired = {v: [a / b for a, b in zip(samples[v], samples["hand-written"])] for v in VARIANTS}
    cpu = device == "cpu"
    unit = "MiB"
    rows = []
    for v in VARIANTS:
        t = median(samples[v])
        lo, hi = quantiles(paired[v])
        m = memory[v]
        grown = (m["peak"] - m["base"]) if cpu else m["peak"]
        ref = (memory["hand-written"]["peak"] - memory["hand-written"]["base"]) if cpu else memory["hand-written"]["peak"]
        row = [v, f"{t * 1e3:.1f}", f"{t / hand:.3f}", f"{median(paired[v]):.3f} [{lo:.3f}, {hi:.3f}]",
               f"{t / unweighted:.3f}"]
        if cpu:
            row += [f"{grown / 2**20:.0f}", f"{grown / ref:.3f}", f"{m['peak'] / 2**20:.0f}",
                    f"{m['peak'] / memory['hand-written']['peak']:.3f}"]
        else:
            row += [f"{m['peak'] / 2**30:.2f}", f"{m['peak'] / ref:.3f}"]
        rows.append(row)
    headers = ["variant", "ms / update (median)", "time ratio", "paired ratio, median [IQR]", "vs accumopt"]
    if cpu:
        headers += [f"training peak ({unit})", "memory ratio", f"process peak RSS ({unit})", "RSS ratio"]
    else:
        headers += ["peak allocated (GiB)", "memory ratio"]
    text = [f"### {device.upper()}: {describe}", ""]
    text += [f"- {k}: {v}" for k, v in machine_info(device)]
    text += [f"- {rounds} alternating rounds x {updates} real updates per variant; ratios are to the hand-written loop",
             ""]
    text.append(markdown_table(headers, rows))
    return "\n".join(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer rounds")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 15, quick 5)")
    parser.add_argument("--updates", type=int, default=None, help="real updates per timed block (default 2, quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier on shared machines)")
    parser.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 15)
    updates = args.updates or (1 if args.quick else 2)
    if args._probe:
        print(json.dumps(probe(args.device, args._probe, args.quick, updates + 1)))
        return
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("CUDA: not available on this machine, skipped (the GPT-124M case needs a GPU).\n")
            continue
        case = Case(device, args.quick)
        describe = case.describe
        samples = time_variants(case, rounds, updates, warmup=2)
        del case
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        memory = measure_memory(device, args.quick, updates + 1, args.threads)
        print(report(device, describe, samples, memory, rounds, updates))
        print()


if __name__ == "__main__":
    main()
