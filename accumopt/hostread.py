"""The one host read of a real update (see docs/state.md).

The non-finite and drop flags, ``ReduceLROnPlateau``'s metric, the ``log_every`` record and ``AdaptiveK``'s
estimate are collected by :class:`HostRead` while the update is prepared, then copied to the host together:
one synchronisation per update, none when nothing asked. Values travel as float64 (exact for the flags, counts
and float32 values); tensors on several devices are gathered on the first one (no host wait), and numbers, or
CPU tensors beside device ones, are read without a copy.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._checks import weight_dtype

__all__ = ["HostRead", "host_read"]


def host_read(t: Tensor) -> list[Any]:
    """``t``'s values on the host: the one device-to-host copy of a real update (the host waits for the device)."""
    return t.cpu().tolist()


class HostRead:
    """Device values requested for one update, read on the host with a single synchronisation."""

    def __init__(self, copy: "Callable[[Tensor], list[Any]] | None" = None) -> None:
        self._copy = copy  # None: this module's host_read, looked up when the read runs
        self._parts: dict[str, "Tensor | float"] = {}
        self._values: dict[str, list[float]] | None = None
        self.syncs = 0  # device-to-host copies made by run() (0 or 1)

    def add(self, key: str, value: "Tensor | float | int") -> None:
        """Ask for ``value`` (a tensor of any shape, or a number) under ``key`` (read by :meth:`run`)."""
        if self._values is not None:
            raise RuntimeError(f"HostRead: {key!r} requested after the read")
        if key in self._parts:
            raise ValueError(f"HostRead: {key!r} requested twice")
        self._parts[key] = value.detach() if isinstance(value, Tensor) else float(value)

    def __contains__(self, key: object) -> bool:
        return key in self._parts

    @property
    def done(self) -> bool:
        """Whether :meth:`run` has read the values."""
        return self._values is not None

    def run(self) -> None:
        """Copy every requested device value to the host: one synchronisation, none when nothing was asked."""
        values: dict[str, list[float]] = {k: [v] for k, v in self._parts.items() if not isinstance(v, Tensor)}
        tensors = {k: v for k, v in self._parts.items() if isinstance(v, Tensor)}
        copied = [k for k, v in tensors.items() if v.device.type != "cpu"] or list(tensors)
        for key, v in tensors.items():
            if key not in copied:  # a CPU tensor beside device ones: read without a copy
                values[key] = [float(x) for x in v.reshape(-1).tolist()]
        if copied:
            device = tensors[copied[0]].device
            dtype = weight_dtype(device)  # float64 where the device has it
            flat = [tensors[k].reshape(-1).to(device, dtype, non_blocking=True) for k in copied]
            host = (self._copy or host_read)(torch.cat(flat))  # the one sync of this update
            self.syncs += 1
            start = 0
            for key, t in zip(copied, flat):
                values[key] = [float(x) for x in host[start:start + t.numel()]]
                start += t.numel()
        self._values = values

    def get(self, key: str) -> list[float]:
        """The host values of ``key`` (flattened), after :meth:`run`."""
        if self._values is None:
            raise RuntimeError(f"HostRead: {key!r} read before run()")
        return self._values[key]

    def scalar(self, key: str) -> float | None:
        """The single host value of ``key``; None when it was not requested (or not yet read)."""
        if self._values is None or key not in self._values:
            return None
        return self._values[key][0]
