"""Gradient accumulation under DistributedDataParallel with accumopt.

Run on CPU (gloo) or GPUs (nccl)::

    torchrun --nproc_per_node=2 examples/ddp_train.py
    torchrun --nproc_per_node=2 examples/ddp_train.py --accumulation-steps 8 --mode buffered

Started with plain ``python`` (no torchrun environment), it says so and runs
as a single process (world size 1).

The loop is the plain one: no ``no_sync()``, no ``loss / K``. Passing ``model=ddp``
to the wrapper makes DDP all-reduce once per real update (on the backward that
closes each window) instead of after every micro-batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

try:
    import accumopt
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import accumopt


def init_distributed(backend: str) -> str | None:
    """Join the torchrun process group; without torchrun, a one-process group. Returns the temp file to remove."""
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        dist.init_process_group(backend)
        return None
    print("ddp_train.py: not started by torchrun (RANK/WORLD_SIZE are not set), so running as a single process.\n"
          "For data-parallel training on 2 processes run:\n"
          "    torchrun --nproc_per_node=2 examples/ddp_train.py", file=sys.stderr, flush=True)
    fd, store = tempfile.mkstemp(prefix="accumopt_ddp_")
    os.close(fd)
    os.remove(store)  # the file store creates it
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    return store


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (refused before any process group exists)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r} (expected an int >= 1)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value} (expected an int >= 1)")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accumulation-steps", type=positive_int, default=4, help="K, micro-batches per update")
    parser.add_argument("--micro-batch", type=positive_int, default=16, help="samples per micro-batch")
    parser.add_argument("--epochs", type=positive_int, default=2)
    parser.add_argument("--mode", choices=("inplace", "buffered"), default="inplace")
    parser.add_argument("--checkpoint", default="", help="save a checkpoint here at the end (rank 0 writes)")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    store = init_distributed("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # same data and initial weights on every rank; DDP broadcasts rank 0's anyway
    x = torch.randn(1024, 32)
    y = (x[:, :4].sum(dim=1, keepdim=True) > 0).float()
    sampler = DistributedSampler(TensorDataset(x, y), shuffle=True, drop_last=True)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.micro_batch, sampler=sampler, drop_last=True)

    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).to(device)
    ddp = DDP(model, device_ids=[device.index] if use_cuda else None)
    opt = accumopt.AccumulatingOptimizer(
        torch.optim.AdamW(ddp.parameters(), lr=1e-2),
        accumulation_steps=args.accumulation_steps,
        mode=args.mode,
        model=ddp,  # <- the one extra argument for data-parallel training
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        opt.set_epoch(epoch)
        for xb, yb in loader:
            loss = loss_fn(ddp(xb.to(device)), yb.to(device))  # plain mean loss
            loss.backward()
            opt.step(loss=loss)
            opt.zero_grad()
        opt.flush()  # a partial window at the end of the epoch (reduced explicitly, once)
        if rank == 0:
            print(f"epoch {epoch}: updates={opt.num_updates} last loss={loss.item():.4f}", flush=True)

    # Every rank holds the same parameters: check it with one all_reduce of a checksum.
    checksum = torch.stack([p.detach().double().sum() for p in ddp.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    if rank == 0:
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        print(f"world={world} K={args.accumulation_steps} mode={args.mode}: parameters identical on all ranks: {same}")

    if args.checkpoint:
        state = opt.state_dict()  # on every rank (collective when a window is pending)
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": state}, args.checkpoint)
    dist.barrier()  # let every rank finish before tearing the group down
    dist.destroy_process_group()
    if store is not None and os.path.exists(store):
        os.remove(store)


if __name__ == "__main__":
    main()
