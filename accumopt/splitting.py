"""Memory-aware splitting: run a whole batch as micro-batches that fit, recovering from OOM.

Owns :class:`MicroBatcher` (after an OOM the failed micro-batch is redone at half the size), :class:`MemoryMonitor`
and the batch helpers. Memory pressure only changes how a batch is split, never a gradient (docs/schedules.md).
"""

from __future__ import annotations

import gc
import os
import resource
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import torch
from torch import Tensor

from ._checks import check_int, check_real
from .optimizer import AccumulatingOptimizer

__all__ = ["MemoryMonitor", "MicroBatcher", "is_oom_error", "batch_size_of", "slice_batch", "zip_batch"]

_OOM_MESSAGES = ("out of memory", "can't allocate memory", "CUDNN_STATUS_NOT_ENOUGH_MEMORY",
                 "CUBLAS_STATUS_ALLOC_FAILED")


def is_oom_error(error: BaseException) -> bool:
    """Whether ``error`` is an out-of-memory error (``torch.OutOfMemoryError`` or an allocator RuntimeError)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(m in str(error) for m in _OOM_MESSAGES))


def _is_text(x: Any) -> bool:
    """A list of strings: per-sample data, like a tensor's rows."""
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(v, str) for v in x)


def zip_batch(fn: Callable[[list[Any]], Any], batches: list[Any]) -> Any:
    """``fn`` applied to the matching per-sample leaves (tensors, lists of strings) of same-shaped batches.

    Batches are (nested) tuples, lists, namedtuples and mappings; any other leaf is taken from the first batch.
    """
    first = batches[0]
    if isinstance(first, Tensor) or _is_text(first):
        return fn(batches)
    if isinstance(first, Mapping):
        out = {k: zip_batch(fn, [b[k] for b in batches]) for k in first}
        return out if type(first) is dict else type(first)(out)  # type: ignore[call-arg]
    if isinstance(first, (list, tuple)):
        items = [zip_batch(fn, [b[i] for b in batches]) for i in range(len(first))]
        return type(first)(*items) if hasattr(first, "_fields") else type(first)(items)
    return first


def _sizes(batch: Any) -> list[int]:
    if isinstance(batch, Tensor):
        return [batch.shape[0]] if batch.dim() > 0 else []
    if _is_text(batch):
        return [len(batch)]
    if isinstance(batch, Mapping):
        return [n for v in batch.values() for n in _sizes(v)]
    if isinstance(batch, (list, tuple)):
        return [n for v in batch for n in _sizes(v)]
    return []


def batch_size_of(batch: Any) -> int:
    """Samples in ``batch``: the common leading dimension of its tensors.

    A batch is a tensor, or a (nested) tuple, list, namedtuple or dict of them; a list of strings counts as
    per-sample data; other leaves (numbers, None, 0-dim tensors) are shared by every micro-batch.
    """
    sizes = _sizes(batch)
    if not sizes:
        raise ValueError(f"Invalid batch: {type(batch).__name__} holds no tensor with a batch dimension")
    if len(set(sizes)) != 1:
        raise ValueError(f"Invalid batch: its tensors have different leading sizes {sorted(set(sizes))} "
                         "(expected one batch dimension shared by all)")
    return sizes[0]


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of ``batch`` (views of its tensors, no copy)."""
    return zip_batch(lambda leaf: leaf[0] if isinstance(leaf[0], Tensor) and leaf[0].dim() == 0
                     else leaf[0][start:stop], [batch])


class MemoryMonitor:
    """Memory in use on ``device``: CUDA allocator statistics, or process RSS on CPU (host counters, no sync)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

    def used(self) -> int:
        """Bytes in use now: CUDA memory allocated by tensors, or the process RSS."""
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):  # not Linux: the peak is the best we have
            return self.peak()

    def peak(self) -> int:
        """Peak bytes: CUDA ``max_memory_allocated``, or the process's peak RSS."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if os.uname().sysname == "Darwin" else rss * 1024

    def total(self) -> int:
        """Bytes of the device: CUDA total memory, or physical RAM."""
        if self.cuda:
            return torch.cuda.get_device_properties(self.device).total_memory
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (OSError, ValueError):  # pragma: no cover
            return 0

    def free_cache(self) -> None:
        """Return cached blocks to the device (after an OOM)."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def snapshot(self) -> dict[str, int]:
        """``{"used", "peak", "total"}`` in bytes (plus ``"reserved"`` on CUDA)."""
        out = {"used": self.used(), "peak": self.peak(), "total": self.total()}
        if self.cuda:
            out["reserved"] = torch.cuda.memory_reserved(self.device)
        return out


@dataclass
class _Record:
    """What the last :meth:`MicroBatcher.step` did."""

    sizes: list[int] = field(default_factory=list)  # micro-batch sizes that succeeded, in order
    ooms: int = 0  # out-of-memory errors recovered during it
    over_budget: int = 0  # micro-batches whose measured use exceeded the budget


class MicroBatcher:
    """Run a whole batch as one real update, split into micro-batches that fit in memory.

    Args:
        optimizer: an :class:`~accumopt.AccumulatingOptimizer` built with ``mode="buffered"`` (a failed
            micro-batch must not reach the window's sum); one :meth:`step` is one window.
        micro_batch_size: the first micro-batch size to try; None: the whole batch.
        min_micro_batch_size: below this, an OOM is re-raised (default 1 sample).
        grow_after: successful micro-batches after which twice the current size (up to ``micro_batch_size``)
            is tried again; 0 never grows. Each time that size fails again, the wait doubles.
        memory_fraction: a fraction of device memory (None: no budget, only OOM errors shrink the size); a
            micro-batch using more after its forward (plus its gradients) halves the next; growth must stay below it.
        device: the device to watch (default: that of the first parameter).
    """

    def __init__(self, optimizer: AccumulatingOptimizer, micro_batch_size: int | None = None, *,
                 min_micro_batch_size: int = 1, grow_after: int = 50, memory_fraction: float | None = None,
                 device: torch.device | str | None = None) -> None:
        if not isinstance(optimizer, AccumulatingOptimizer):
            raise TypeError(f"Invalid optimizer: {type(optimizer).__name__} (expected an "
                            "accumopt.AccumulatingOptimizer built with mode='buffered')")
        if optimizer.mode != "buffered":
            raise ValueError(f"Invalid optimizer: mode={optimizer.mode!r} (MicroBatcher needs mode='buffered': a "
                             "micro-batch that runs out of memory half-way through its backward has already added "
                             "to .grad, and only buffered mode keeps the window's sum apart from it). Build it "
                             "with AccumulatingOptimizer(..., mode='buffered').")
        if micro_batch_size is not None:
            check_int("micro_batch_size", micro_batch_size)
        self.min_micro_batch_size = check_int("min_micro_batch_size", min_micro_batch_size)
        if micro_batch_size is not None and micro_batch_size < min_micro_batch_size:
            raise ValueError(f"Invalid micro_batch_size: {micro_batch_size} (expected an int >= "
                             f"min_micro_batch_size={min_micro_batch_size})")
        self.grow_after = check_int("grow_after", grow_after, minimum=0)
        if memory_fraction is not None:
            memory_fraction = check_real("memory_fraction", memory_fraction, positive=True)
            if memory_fraction > 1:
                raise ValueError(f"Invalid memory_fraction: {memory_fraction} "
                                 "(expected a fraction of device memory in (0, 1])")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.optimizer = optimizer
        self.memory_fraction = memory_fraction
        self.monitor = MemoryMonitor(params[0].device if device is None else device)
        self.max_micro_batch_size = micro_batch_size  # never grow above (None: the batch)
        self.micro_batch_size = micro_batch_size  # the size that fits (None: not known yet)
        self.ooms = 0  # recovered OOM errors, all batches
        self.last = _Record()
        self._successes = 0  # consecutive successful micro-batches at the current size
        self._wait: dict[int, int] = {}  # size -> successes needed before trying it again
        self._grad_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)

    def step(self, batch: Any, loss_fn: Callable[[Any], Tensor]) -> Tensor:
        """Forward, backward and accumulate all of ``batch``, then apply one real update.

        Args:
            batch: a tensor, or a (nested) tuple/list/namedtuple/dict of tensors sharing the leading dimension.
            loss_fn: ``loss_fn(micro_batch) -> loss``, the *mean* loss over the micro-batch (it runs the forward).

        Returns:
            The batch's mean loss: the sample-weighted mean of the micro-batch losses (detached, 0-dim, no sync).

        Raises:
            torch.OutOfMemoryError: when even ``min_micro_batch_size`` samples do not fit (the window is discarded).
        """
        opt = self.optimizer
        if opt.pending:
            raise RuntimeError(f"MicroBatcher.step: the optimizer has {opt.pending} pending micro-batches (expected an "
                               "empty window: one MicroBatcher.step is one whole window; call opt.flush() first)")
        n = batch_size_of(batch)
        if n == 0:
            raise ValueError("Invalid batch: 0 samples")
        if not callable(loss_fn):
            raise TypeError(f"Invalid loss_fn: {loss_fn!r} (expected a callable micro_batch -> loss)")
        opt.zero_grad(set_to_none=True)
        self.last = _Record()
        loss_sum: Tensor | None = None
        try:
            with opt._open_ended_window():
                start = 0
                while start < n:
                    size = self._next_size(n - start)
                    loss = self._run(slice_batch(batch, start, start + size), size, loss_fn)
                    if loss is None:
                        continue  # OOM: recovered, the size was halved; redo from `start`
                    loss_sum = loss * size if loss_sum is None else loss_sum + loss * size
                    self.last.sizes.append(size)
                    start += size
        except BaseException:
            opt.discard()  # nothing half-applied
            raise
        opt.flush()
        return cast(Tensor, loss_sum) / n  # n > 0 samples ran

    __call__ = step

    def stats(self) -> dict[str, Any]:
        """Current micro-batch size, recovered OOMs, the last batch's split and memory readings (bytes)."""
        return {"micro_batch_size": self.micro_batch_size, "ooms": self.ooms, "last_sizes": list(self.last.sizes),
                "last_ooms": self.last.ooms, "memory": self.monitor.snapshot()}

    def state_dict(self) -> dict[str, Any]:
        """The learnt size and growth back-off (plain data)."""
        return {"micro_batch_size": self.micro_batch_size, "successes": self._successes,
                "wait": {int(k): int(v) for k, v in self._wait.items()}, "ooms": self.ooms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        size = state.get("micro_batch_size")
        self.micro_batch_size = None if size is None else int(size)
        self._successes = int(state.get("successes", 0))
        self._wait = {int(k): int(v) for k, v in state.get("wait", {}).items()}
        self.ooms = int(state.get("ooms", 0))

    def _next_size(self, remaining: int) -> int:
        """Size of the next micro-batch: the learnt size, grown after enough successes."""
        if self.micro_batch_size is None:
            self.micro_batch_size = remaining if self.max_micro_batch_size is None else self.max_micro_batch_size
        size = self.micro_batch_size
        if self.grow_after and self._successes >= self._wait.get(2 * size, self.grow_after):
            cap = self.max_micro_batch_size
            if (cap is None or 2 * size <= cap) and remaining > size and self._fits(2 * size):
                size = self.micro_batch_size = 2 * size
                self._successes = 0
        return min(size, remaining)

    def _fits(self, size: int) -> bool:
        """Whether ``size`` is projected to stay within the memory budget."""
        if self.memory_fraction is None or not hasattr(self, "_per_sample"):
            return True
        total = self.monitor.total()
        return not total or self._static + self._per_sample * size + self._grad_bytes <= self.memory_fraction * total

    def _run(self, micro: Any, size: int, loss_fn: Callable[[Any], Tensor]) -> Tensor | None:
        """One micro-batch: its detached loss, or None after a recovered OOM."""
        before = self.monitor.used() if self.memory_fraction is not None else 0
        loss: Tensor | None = None
        try:
            loss = loss_fn(micro)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else ""
                raise TypeError(f"Invalid loss_fn result: {type(loss).__name__} {shape} "
                                "(expected a scalar loss tensor)")
            if self.memory_fraction is not None:
                self._measure(before, self.monitor.used(), size)
            self.optimizer.backward(loss)
        except BaseException as error:  # noqa: BLE001 - filtered just below
            if not is_oom_error(error):
                raise
            if size <= self.min_micro_batch_size:
                raise torch.OutOfMemoryError(
                    f"MicroBatcher: a micro-batch of {size} sample(s) does not fit in memory even after splitting "
                    f"(min_micro_batch_size={self.min_micro_batch_size}); the batch was discarded, parameters are "
                    f"unchanged. Original error: {error}"
                ) from error
            loss = None
        if loss is None:  # outside the except block: the traceback (and its activations) is gone
            self.optimizer.zero_grad(set_to_none=True)  # buffered mode: the window lives in the buffers, untouched
            self.monitor.free_cache()
            self.ooms += 1
            self.last.ooms += 1
            self._wait[size] = max(self.grow_after, 2 * self._wait.get(size, self.grow_after // 2 or 1))
            self.micro_batch_size = max(self.min_micro_batch_size, size // 2)
            self._successes = 0
            return None
        self.optimizer.step(weight=float(size), loss=loss.detach())
        self._successes += 1
        return loss.detach()

    def _measure(self, before: int, after_forward: int, size: int) -> None:
        self._static = before
        self._per_sample = max(after_forward - before, 0) / size
        total = self.monitor.total()
        fraction = self.memory_fraction or 1.0  # only measured with a budget
        if total and after_forward + self._grad_bytes > fraction * total and size > self.min_micro_batch_size:
            self.last.over_budget += 1
            self.micro_batch_size = max(self.min_micro_batch_size, size // 2)  # this one is kept; the next are halved
            self._successes = 0

    def __repr__(self) -> str:
        return (f"MicroBatcher(micro_batch_size={self.micro_batch_size}, ooms={self.ooms}, "
                f"memory_fraction={self.memory_fraction})")
