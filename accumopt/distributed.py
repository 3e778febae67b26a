"""Collectives for data-parallel accumulation (any ``torch.distributed`` backend), used by :mod:`accumopt.sync`.

Both helpers average (sum, then divide by the world size), which is idempotent on values already equal across
ranks: reducing a sum partly reduced before (a mid-window checkpoint) gives the same result. See docs/distributed.md.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ._checks import scalar_tensor, weight_dtype

__all__ = ["BUCKET_BYTES", "all_reduce_mean_", "all_reduce_mean_scalar", "is_distributed"]

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb
_IN_FLIGHT = 2  # buckets reduced concurrently (bounds the extra memory to 2 buckets)


def is_distributed() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def _buckets(tensors: Sequence[Tensor], bucket_bytes: int) -> list[list[Tensor]]:
    by_key: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = {}
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    for t in tensors:
        key = (t.device, t.dtype)
        nbytes = t.numel() * t.element_size()
        lists = by_key.setdefault(key, [[]])
        if lists[-1] and sizes[key] + nbytes > bucket_bytes:
            lists.append([])
            sizes[key] = 0
        lists[-1].append(t)
        sizes[key] = sizes.get(key, 0) + nbytes
    return [b for lists in by_key.values() for b in lists if b]


def all_reduce_mean_(tensors: Sequence[Tensor], group: Any = None, world_size: int | None = None,
                     bucket_bytes: int = BUCKET_BYTES) -> int:
    """Replace every tensor by its mean over the ranks of ``group``; return the number of ``all_reduce`` calls.

    Tensors are flattened into buckets of at most ``bucket_bytes`` per device and dtype, as DDP does. Every rank
    must pass tensors of the same shapes, dtypes and order.
    """
    world_size = world_size or dist.get_world_size(group)
    pending: deque[tuple[Any, Tensor | None, list[Tensor]]] = deque()

    def finish() -> None:
        work, flat, bucket = pending.popleft()
        work.wait()
        if flat is not None:
            torch._foreach_copy_(bucket, _unflatten_dense_tensors(flat, bucket))  # type: ignore[no-untyped-call]

    buckets = _buckets([t for t in tensors if t.numel() > 0], bucket_bytes)
    for bucket in buckets:
        if len(bucket) == 1 and bucket[0].is_contiguous():
            flat, target = None, bucket[0]  # one contiguous tensor: reduce it where it lies
        else:
            flat = target = _flatten_dense_tensors(bucket)  # type: ignore[no-untyped-call]
        if world_size > 1:
            target.div_(world_size)  # pre-divide, as DDP does: no overflow from the sum
        pending.append((dist.all_reduce(target, group=group, async_op=True), flat, bucket))
        if len(pending) >= _IN_FLIGHT:
            finish()
    while pending:
        finish()
    return len(buckets)


def all_reduce_mean_scalar(value: "float | Tensor", device: torch.device, group: Any = None,
                           world_size: int | None = None) -> Tensor:
    """The mean of a number over the ranks of ``group``: a 0-dim tensor on ``device``."""
    world_size = world_size or dist.get_world_size(group)
    # float64 where the device supports it: weight totals stay exact; a copy: the caller keeps ``value``
    t = scalar_tensor(value, device, weight_dtype(device)).reshape(1).clone()
    dist.all_reduce(t, group=group)
    return (t / world_size).reshape(())
