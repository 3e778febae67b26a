"""Accumulation statistics, kept on the device until :meth:`Statistics.snapshot` (see docs/state.md).

Host counters are ints; device values are summed out of place and read only by ``opt.stats()`` (one host read
per device) or, for the ``log_every`` record, within the update's single host read (no sync of its own).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import suppress
from typing import Any

import torch
from torch import Tensor

from ._checks import check_int, check_state_number, scalar_tensor, weight_dtype
from .checkpoint import clone_tree
from .hostread import HostRead

__all__ = ["Statistics", "memory_usage"]

logger = logging.getLogger("accumopt")

# Device-side values: restored by load(), cloned by state(), read together by snapshot().
_DEVICE_FIELDS = ("dropped", "nonfinite_events", "samples", "window_loss", "window_loss_weight", "last_loss",
                  "norm_sum", "last_norm", "last_batch")
_HOST_FIELDS = ("micro_steps", "updates", "skipped", "norm_count")


def _add(acc: Tensor | float, value: Tensor | float) -> Tensor | float:
    return acc + (value.detach() if isinstance(value, Tensor) else value)


def _rss_bytes() -> tuple[int | None, int | None]:
    """(current, peak) resident set size of this process, in bytes (None where unknown)."""
    current = peak = None
    with suppress(OSError, ValueError, IndexError, AttributeError), open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with suppress(ImportError, OSError, AttributeError):
        import resource
        import sys
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
    # Linux: current and peak from one source (VmRSS, VmHWM), consistent with each other
    with suppress(OSError, ValueError, KeyError):
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        current = int(fields["VmRSS"].split()[0]) * 1024
        peak = int(fields["VmHWM"].split()[0]) * 1024
    if current is not None and peak is not None:
        peak = max(peak, current)
    return current, peak


def memory_usage(device: torch.device | None) -> dict[str, Any]:
    """Memory in bytes: CUDA allocated and peak on a CUDA ``device``, else the process RSS and its peak."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        # no device sync: the CUDA caching allocator's counters are host values
        return {"memory_kind": "cuda", "memory_bytes": torch.cuda.memory_allocated(device),
                "memory_peak_bytes": torch.cuda.max_memory_allocated(device)}
    current, peak = _rss_bytes()
    return {"memory_kind": "rss", "memory_bytes": current, "memory_peak_bytes": peak}


def read_values(values: dict[str, Any]) -> dict[str, Any]:
    """Replace 0-dim tensors in ``values`` by Python floats with one host read per device."""
    by_device: dict[torch.device, list[str]] = {}
    for k, v in values.items():
        if isinstance(v, Tensor):
            by_device.setdefault(v.device, []).append(k)
    out = dict(values)
    for device, keys in by_device.items():
        stacked = torch.stack([values[k].detach().reshape(()).to(torch.float64) for k in keys])
        out.update(zip(keys, stacked.tolist()))  # the sync
    return out


class Statistics:
    """Counts and sums for :meth:`AccumulatingOptimizer.stats`.

    Args:
        log_every: log a summary every this many real updates (None: never).
    """

    def __init__(self, log_every: int | None = None) -> None:
        self.log_every = None if log_every is None else check_int("log_every", log_every)
        self.micro_steps = self.updates = self.skipped = self.norm_count = 0
        self.dropped: Tensor | float = 0.0
        self.nonfinite_events: Tensor | float = 0.0
        self.samples: Tensor | float = 0.0
        self.window_loss: Tensor | float = 0.0
        self.window_loss_weight: Tensor | float = 0.0
        self.last_loss: Tensor | float | None = None
        self.norm_sum: Tensor | float = 0.0
        self.last_norm: Tensor | float | None = None
        self.last_batch: Tensor | float | None = None  # summed weight of the last closed window
        self._t0: float | None = None  # end of the first micro-step seen by this object
        self._rate_samples: Tensor | float = 0.0  # samples since _t0 (not checkpointed: time restarts)
        self._record: dict[str, Any] | None = None  # what the pending log record needs (see request)

    def on_micro_step(self, weight: Tensor | float, loss: Tensor | float | None, found: Tensor | None) -> None:
        """Count one micro-batch (``weight`` 0 when it was dropped). No sync."""
        self.micro_steps += 1
        self.samples = _add(self.samples, weight)
        if self._t0 is None:
            self._t0 = time.perf_counter()
        else:
            self._rate_samples = _add(self._rate_samples, weight)
        if found is not None:
            self.dropped = _add(self.dropped, found)
            self.nonfinite_events = _add(self.nonfinite_events, found)
        if loss is not None:
            loss = loss.detach() if isinstance(loss, Tensor) else loss
            weighted = loss * weight if isinstance(weight, Tensor) or weight != 1.0 else loss
            if found is not None:  # a dropped micro-batch's loss (often NaN) does not count: NaN * 0 is NaN
                weighted = torch.where(found > 0, torch.zeros_like(found), weighted)
            self.window_loss = _add(self.window_loss, weighted)
            self.window_loss_weight = _add(self.window_loss_weight, weight)

    def window_mean_loss(self) -> Tensor | float | None:
        """Weighted mean loss of the pending window (None when no loss was given)."""
        if isinstance(self.window_loss_weight, float) and self.window_loss_weight == 0.0:
            return None
        return self.window_loss / self.window_loss_weight

    def make_global(self, device: torch.device, group: Any, world_size: int) -> None:
        """Sum the window's loss and loss weight over the ranks, once per update before its mean is read. No sync."""
        weight = self.window_loss_weight
        if world_size <= 1 or (isinstance(weight, float) and weight == 0.0):
            return
        dtype = weight_dtype(device)
        sums = torch.stack([scalar_tensor(self.window_loss, device, dtype), scalar_tensor(weight, device, dtype)])
        torch.distributed.all_reduce(sums, group=group)
        self.window_loss, self.window_loss_weight = sums[0], sums[1]

    def logs_next_update(self) -> bool:
        """Whether the next real update, if applied, writes the periodic record."""
        every = self.log_every
        return every is not None and (self.updates + 1) % every == 0 and logger.isEnabledFor(logging.INFO)

    def request(self, read: HostRead, norm: Tensor | None, total: "Tensor | float | None", *, k: int,
                noise_scale: Tensor | None = None, world_size: int = 1,
                local_total: "Tensor | float | None" = None) -> None:
        """Ask ``read`` for this update's log record values, if it logs (arguments as :meth:`on_update`). No sync."""
        if not self.logs_next_update():
            return
        values = {"last_loss": self.window_mean_loss(), "last_grad_norm": norm, "rate_samples": self._rate_samples,
                  "effective_batch": total, "noise_scale": noise_scale,
                  "local_total": local_total if world_size > 1 else None}
        present = {name: v for name, v in values.items() if v is not None}
        for name, v in present.items():
            read.add(f"stats.{name}", v)
        self._record = {"keys": {name: f"stats.{name}" for name in present}, "k": k, "world_size": world_size}

    def on_update(self, applied: bool, norm: Tensor | None, found: Tensor | None,
                  total: "Tensor | float | None" = None, read: HostRead | None = None, *,
                  local_total: "Tensor | float | None" = None, world_size: int = 1) -> None:
        """Count a closed window (applied or skipped). No sync.

        ``total``: its summed weight (data-parallel: the mean over ``world_size`` ranks, this rank's
        own being ``local_total``); ``read``, once run, holds what :meth:`request` asked for.
        """
        record, self._record = self._record, None
        if applied:
            self.updates += 1
        else:
            self.skipped += 1
        if found is not None and not applied:
            self.nonfinite_events = _add(self.nonfinite_events, (found.detach() > 0).float())
        if norm is not None:
            self.last_norm = norm.detach()
            if applied:  # the mean is over applied updates: a skipped window's inf/NaN norm does not poison it
                self.norm_sum = _add(self.norm_sum, self.last_norm)
                self.norm_count += 1
        if total is not None:
            batch = total.detach().clone() if isinstance(total, Tensor) else float(total)
            if world_size > 1:  # the global batch: sum over ranks; samples become global too
                batch = batch * world_size
                if local_total is not None:
                    extra = batch - (local_total.detach() if isinstance(local_total, Tensor) else local_total)
                    self.samples = _add(self.samples, extra)
                    self._rate_samples = _add(self._rate_samples, extra)
            self.last_batch = batch
        self.last_loss = self.window_mean_loss()
        self.window_loss = self.window_loss_weight = 0.0
        if applied and record is not None and read is not None and read.done:
            self._log(record, read)

    def _log(self, record: dict[str, Any], read: HostRead) -> None:
        """Write the periodic INFO record from host values (read with the update)."""
        v = {name: read.scalar(key) for name, key in record["keys"].items()}
        elapsed = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        rate = v.get("rate_samples") or 0.0
        batch = v.get("effective_batch")
        if batch is not None and record["world_size"] > 1:  # global, as on_update makes it
            batch *= record["world_size"]
            rate += batch - (v.get("local_total") or 0.0)
        noise = usable_noise_scale(v.get("noise_scale"))
        logger.info("accumopt: update %d (%d micro-steps, %d skipped): loss %s, grad norm %s, K %s, "
                    "effective batch %s, %.1f samples/s%s", self.updates, self.micro_steps, self.skipped,
                    _fmt(v.get("last_loss")), _fmt(v.get("last_grad_norm")), record["k"], _fmt(batch),
                    rate / elapsed if elapsed > 0 else 0.0,
                    "" if noise is None else f", noise scale {noise:.4g}")

    def discard_window(self) -> None:
        """Forget the pending window's losses (the window was discarded)."""
        self.window_loss = self.window_loss_weight = 0.0
        self._record = None

    def device_values(self) -> dict[str, Any]:
        """The raw values (device tensors or numbers), for :func:`read_values`."""
        return {"dropped": self.dropped, "nonfinite": self.nonfinite_events, "samples": self.samples,
                "rate_samples": self._rate_samples, "last_loss": self.last_loss,
                "accumulated_loss": self.window_mean_loss(), "last_grad_norm": self.last_norm,
                "norm_sum": self.norm_sum, "effective_batch": self.last_batch}

    def snapshot(self, extra: dict[str, Any] | None = None, device: torch.device | None = None) -> dict[str, Any]:
        """Statistics as Python numbers. ``extra`` device values are read in the same sync."""
        v = read_values({**self.device_values(), **(extra or {})})
        elapsed = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        rate, norm_sum = v.pop("rate_samples"), v.pop("norm_sum")
        out = {"micro_steps": self.micro_steps, "updates": self.updates, "skipped_updates": self.skipped,
               "dropped_micro_batches": int(round(v.pop("dropped"))),
               "nonfinite_events": int(round(v.pop("nonfinite"))), "samples": v.pop("samples"),
               "samples_per_second": rate / elapsed if elapsed > 0 else 0.0,
               "effective_batch": v.pop("effective_batch"), "last_loss": v.pop("last_loss"),
               "accumulated_loss": v.pop("accumulated_loss"), "last_grad_norm": v.pop("last_grad_norm"),
               "mean_grad_norm": norm_sum / self.norm_count if self.norm_count else None}
        return {**out, **v, **memory_usage(device)}

    def state_dict(self) -> dict[str, Any]:
        """Plain data (tensors cloned)."""
        return dict(clone_tree({k: getattr(self, k) for k in _HOST_FIELDS + _DEVICE_FIELDS}))

    @staticmethod
    def validate_state_dict(state: Any) -> None:
        """Raise ``ValueError`` unless ``state`` looks like :meth:`state_dict` (before any change)."""
        if not isinstance(state, dict):
            raise ValueError(f"Invalid state dict: the 'stats' entry is a {type(state).__name__} (expected a dict)")
        for k in _HOST_FIELDS:
            if k in state:
                check_state_number(f"stats entry {k!r}", state[k], integer=True, minimum=0)
        for k in _DEVICE_FIELDS:
            v = state.get(k)
            if v is not None and not isinstance(v, (Tensor, float, int)):
                raise ValueError(f"Invalid state dict: stats entry {k!r} is a {type(v).__name__} "
                                 "(expected a tensor or a number)")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors copied: the argument is not aliased)."""
        self.validate_state_dict(state)
        for k in (f for f in _HOST_FIELDS + _DEVICE_FIELDS if f in state):
            setattr(self, k, int(state[k]) if k in _HOST_FIELDS else clone_tree(state[k]))
        self._t0 = None
        self._rate_samples = 0.0


def usable_noise_scale(value: float | None) -> float | None:
    """The noise scale as reported: None before a usable window, or where ``|G|^2`` was estimated <= 0."""
    return value if value is not None and 0 < value < float("inf") else None


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.6g}" if isinstance(x, float) else str(x)
