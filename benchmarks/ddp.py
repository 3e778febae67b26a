"""Time per real update under DDP: reduce every micro-batch vs ``no_sync`` vs accumopt.

Two gloo ranks on CPU (spawned here), a 6.4M-parameter MLP, K=8 micro-batches of
16 samples per real update, AdamW. Variants, each with its own DDP model:

* ``every``: the naive loop, DDP all-reduces after every micro-batch (loss / K);
* ``no_sync``: the hand-written loop, ``with ddp.no_sync()`` on the first K-1 micro-batches;
* ``accumopt``: ``AccumulatingOptimizer(AdamW, 8, model=ddp)``, the plain loop (mode="inplace");
* ``accumopt-buffered``: the same with ``mode="buffered"`` (explicit bucketed all_reduce).

The variants run interleaved (the order rotates every repeat) so slow drifts of a
shared machine hit them alike; each repeat times ``--updates`` real updates, and the
figure is the median over repeats of the time per update (rank 0's clock, after
a barrier). Ratios are against ``no_sync``.

Run: ``python benchmarks/ddp.py [--repeats 7] [--updates 3] [--threads 1]``
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from accumopt import AccumulatingOptimizer  # noqa: E402

K = 8
MICRO = 16
VARIANTS = ("every", "no_sync", "accumopt", "accumopt-buffered")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 512*2048 + 2048*2048 + 2048*576 weights + biases = 6.42M parameters
    return torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048),
                               torch.nn.ReLU(), torch.nn.Linear(2048, 576))


def _make(variant: str):
    ddp = DDP(_model())
    inner = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    if variant.startswith("accumopt"):
        mode = "buffered" if variant.endswith("buffered") else "inplace"
        return ddp, AccumulatingOptimizer(inner, K, mode=mode, model=ddp)
    return ddp, inner


def _update(variant: str, ddp, opt, batches) -> None:
    """One real update = K micro-batches."""
    loss_fn = torch.nn.functional.mse_loss
    if variant == "every":
        for x, y in batches:
            (loss_fn(ddp(x), y) / K).backward()
        opt.step()
        opt.zero_grad()
    elif variant == "no_sync":
        for i, (x, y) in enumerate(batches):
            if i < K - 1:
                with ddp.no_sync():
                    (loss_fn(ddp(x), y) / K).backward()
            else:
                (loss_fn(ddp(x), y) / K).backward()
        opt.step()
        opt.zero_grad()
    else:
        for x, y in batches:
            loss_fn(ddp(x), y).backward()
            opt.step()
            opt.zero_grad()


def _worker(rank: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(MICRO, 512, generator=g), torch.randn(MICRO, 576, generator=g)) for _ in range(K)]
    runs = {v: _make(v) for v in VARIANTS}
    for v in VARIANTS:  # warm-up: allocate gradients, optimizer state, DDP buckets
        for _ in range(2):
            _update(v, *runs[v], batches)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(args.repeats):
        order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[: rep % len(VARIANTS)]
        for v in order:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.updates):
                _update(v, *runs[v], batches)
            dist.barrier()
            times[v].append((time.perf_counter() - t0) / args.updates)
    n_params = sum(p.numel() for p in runs["every"][0].parameters())
    if rank == 0:
        queue.put((n_params, times))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--updates", type=int, default=3, help="real updates timed per repeat")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_worker, args=(port, args, queue), nprocs=2, join=True)
    n_params, times = queue.get()
    med = {v: statistics.median(t) for v, t in times.items()}
    print(f"DDP, 2 gloo ranks on CPU, {n_params / 1e6:.2f}M-parameter MLP, K={K}, micro-batch {MICRO}, "
          f"{args.threads} thread(s)/rank, median of {args.repeats} repeats x {args.updates} updates\n")
    print("| variant | ms per real update (median) | min | max | vs no_sync |")
    print("|---|---:|---:|---:|---:|")
    for v in VARIANTS:
        t = times[v]
        print(f"| {v} | {med[v] * 1e3:.1f} | {min(t) * 1e3:.1f} | {max(t) * 1e3:.1f} | {med[v] / med['no_sync']:.3f}x |")
    print(f"\nreducing every micro-batch / accumopt: {med['every'] / med['accumopt']:.2f}x")


if __name__ == "__main__":
    main()
