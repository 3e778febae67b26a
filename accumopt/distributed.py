"""Collectives for data-parallel accumulation (any ``torch.distributed`` backend).

Two small helpers used by :mod:`accumopt.sync`:

* :func:`all_reduce_mean_`: average a list of tensors across ranks in place with
  a few bucketed ``all_reduce`` calls (one per 25 MiB of each device/dtype), the
  same bucketing DDP uses, instead of one call per parameter;
* :func:`all_reduce_mean_scalar`: average one number (the window's weight total)
  across ranks, as a device tensor (no host synchronisation).

Both average (sum, then divide by the world size), which is idempotent on
values that are already equal across ranks: reducing a sum that was partly
reduced before (a checkpoint taken mid-window, an extra synchronising backward)
gives the same result as reducing it once.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ._checks import weight_dtype

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
    """Replace every tensor by its mean over the ranks of ``group``, in buckets.

    Every rank must pass tensors of the same shapes, dtypes and order.

    Args:
        tensors: dense tensors to average in place.
        group: the process group (default: the world).
        world_size: its size (looked up when None).
        bucket_bytes: the most bytes flattened into one ``all_reduce`` call.

    Returns:
        The number of ``all_reduce`` calls made.
    """
    if world_size is None:
        world_size = dist.get_world_size(group)
    calls = 0
    pending: deque[tuple[Any, Tensor | None, list[Tensor]]] = deque()

    def finish() -> None:
        work, flat, bucket = pending.popleft()
        work.wait()
        if flat is not None:
            torch._foreach_copy_(bucket, _unflatten_dense_tensors(flat, bucket))  # type: ignore[no-untyped-call]

    for bucket in _buckets([t for t in tensors if t.numel() > 0], bucket_bytes):
        if len(bucket) == 1 and bucket[0].is_contiguous():
            flat, target = None, bucket[0]  # one contiguous tensor: reduce it where it lies
        else:
            flat = target = _flatten_dense_tensors(bucket)  # type: ignore[no-untyped-call]
        if world_size > 1:
            target.div_(world_size)  # pre-divide, as DDP does: no overflow from the sum
        pending.append((dist.all_reduce(target, group=group, async_op=True), flat, bucket))
        calls += 1
        if len(pending) >= _IN_FLIGHT:
            finish()
    while pending:
        finish()
    return calls


def all_reduce_mean_scalar(value: "float | Tensor", device: torch.device, group: Any = None,
                           world_size: int | None = None) -> Tensor:
    """The mean of a number over the ranks of ``group``: a 0-dim tensor on ``device``.

    float64 where the device supports it, so weight totals stay exact.
    """
    if world_size is None:
        world_size = dist.get_world_size(group)
    dtype = weight_dtype(device)
    if isinstance(value, Tensor):
        t = value.detach().to(device=device, dtype=dtype).reshape(1).clone()
    else:
        t = torch.full((1,), float(value), dtype=dtype, device=device)
    dist.all_reduce(t, group=group)
    return (t / world_size).reshape(())
