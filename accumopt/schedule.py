"""The accumulation window and its size K.

``accumulation_steps`` may be:

* an ``int``: a fixed K;
* a list of ints: K by epoch (``[2, 4, 8]`` means K=2 in epoch 0, 4 in epoch 1,
  8 from epoch 2 on), the seed documents' ``accumulation_schedule``;
* a mapping ``{start: K}``: K from that epoch (or update) on, like Lightning's
  ``GradientAccumulationScheduler``; must contain 0;
* a callable ``f(num_updates) -> int``: like optax's ``every_k_schedule``.

Lists and mappings count epochs by default (``schedule_by="epoch"``), callables
count real updates (``schedule_by="update"``). The wrapper learns the epoch from
``opt.set_epoch(epoch)``. K only changes when a window closes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

from torch import Tensor

from ._checks import check_choice, check_int

__all__ = ["KSchedule", "Window"]


class KSchedule:
    """Maps (epoch, number of closed windows) to K."""

    def __init__(self, spec: Any, schedule_by: str | None = None) -> None:
        self.spec = spec
        if isinstance(spec, Mapping):
            if not spec:
                raise ValueError("Invalid accumulation_steps: {} (expected a non-empty mapping {start: K} containing 0)")
            for start, k in spec.items():
                check_int("accumulation_steps key", start, minimum=0)
                check_int(f"accumulation_steps[{start}]", k)
            if 0 not in spec:
                raise ValueError(f"Invalid accumulation_steps: {dict(spec)!r} (a mapping must give K from 0 on)")
            self._points = sorted(spec.items())
            self.kind = "mapping"
        elif isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
            if len(spec) == 0:
                raise ValueError("Invalid accumulation_steps: [] (expected a non-empty list of ints >= 1)")
            for i, k in enumerate(spec):
                check_int(f"accumulation_steps[{i}]", k)
            self._points = list(enumerate(spec))
            self.kind = "list"
        elif callable(spec) and not isinstance(spec, (int, float)):
            self.kind = "callable"
        else:
            check_int("accumulation_steps", spec)
            self.kind = "constant"
        default_by = "update" if self.kind == "callable" else "epoch"
        self.schedule_by = check_choice("schedule_by", schedule_by or default_by, ("epoch", "update"))

    def __call__(self, epoch: int, updates: int) -> int:
        if self.kind == "constant":
            return self.spec
        position = epoch if self.schedule_by == "epoch" else updates
        if self.kind == "callable":
            return check_int(f"accumulation_steps({position})", self.spec(position))
        k = self._points[0][1]
        for start, value in self._points:
            if start <= position:
                k = value
        return k


class Window:
    """Counts the micro-batches of the current window and the sum of their weights."""

    def __init__(self, schedule: KSchedule) -> None:
        self.schedule = schedule
        self.epoch = 0
        self.closed = 0  # windows closed so far (applied or skipped)
        self.count = 0  # micro-batches in the current window
        self.total: float | Tensor = 0.0  # their summed weight
        self.k = schedule(0, 0)

    def add(self, weight: "float | Tensor") -> None:
        self.count += 1
        self.total = self.total + weight

    @property
    def full(self) -> bool:
        return self.count >= self.k

    @property
    def next_is_last(self) -> bool:
        """Whether the next micro-batch closes the window."""
        return self.count + 1 >= self.k

    def inv_total(self) -> "float | Tensor":
        if isinstance(self.total, Tensor):
            return self.total.clamp_min(1e-38).reciprocal()
        return 1.0 / self.total if self.total > 0 else 0.0

    def close(self) -> None:
        self.count = 0
        self.total = 0.0
        self.closed += 1
        self.k = self.schedule(self.epoch, self.closed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int("epoch", epoch, minimum=0)
        if self.count == 0:
            self.k = self.schedule(self.epoch, self.closed)

    def state(self) -> dict:
        total = self.total
        return {"epoch": self.epoch, "closed": self.closed, "count": self.count, "k": self.k,
                "total": total.detach().clone() if isinstance(total, Tensor) else float(total)}

    def load(self, state: dict) -> None:
        self.epoch, self.closed, self.count, self.k = (int(state[k]) for k in ("epoch", "closed", "count", "k"))
        self.total = state["total"]
