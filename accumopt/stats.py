"""Accumulation statistics, kept on the device until :meth:`Statistics.snapshot`.

Counters that the host knows (micro-steps, updates) are Python ints; values the
device produces (losses, gradient norms, non-finite flags) are accumulated as
device tensors and read only when the user asks for them.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

__all__ = ["Statistics"]


def _add(acc: Tensor | float, value: Tensor | float) -> Tensor | float:
    if isinstance(value, Tensor):
        value = value.detach()
    return acc + value


class Statistics:
    """Counts and sums for :meth:`AccumulatingOptimizer.stats`."""

    def __init__(self) -> None:
        self.micro_steps = 0
        self.updates = 0
        self.skipped = 0
        self.dropped: Tensor | float = 0.0
        self.nonfinite_events: Tensor | float = 0.0
        self.samples: Tensor | float = 0.0
        self.window_loss: Tensor | float = 0.0
        self.window_loss_weight: Tensor | float = 0.0
        self.last_loss: Tensor | float | None = None
        self.norm_sum: Tensor | float = 0.0
        self.norm_count = 0
        self.last_norm: Tensor | None = None
        self._t0: float | None = None

    def on_micro_step(self, weight: Tensor | float, loss: Tensor | float | None, found: Tensor | None) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        self.micro_steps += 1
        self.samples = _add(self.samples, weight)
        if found is not None:
            self.dropped = _add(self.dropped, found)
            self.nonfinite_events = _add(self.nonfinite_events, found)
        if loss is not None:
            self.window_loss = _add(self.window_loss, loss * weight if isinstance(weight, Tensor) or weight != 1.0 else loss)
            self.window_loss_weight = _add(self.window_loss_weight, weight)

    def window_mean_loss(self) -> Tensor | float | None:
        if isinstance(self.window_loss_weight, float) and self.window_loss_weight == 0.0:
            return None
        return self.window_loss / self.window_loss_weight

    def on_update(self, applied: bool, norm: Tensor | None, found: Tensor | None) -> None:
        if applied:
            self.updates += 1
        else:
            self.skipped += 1
        if found is not None and not applied:
            self.nonfinite_events = _add(self.nonfinite_events, (found > 0).float())
        if norm is not None:
            self.last_norm = norm.detach()
            self.norm_sum = _add(self.norm_sum, self.last_norm)
            self.norm_count += 1
        self.last_loss = self.window_mean_loss()
        self.window_loss = 0.0
        self.window_loss_weight = 0.0

    def snapshot(self) -> dict[str, Any]:
        def f(x: Any) -> Any:
            return x.item() if isinstance(x, Tensor) else x

        elapsed = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        samples = f(self.samples)
        return {
            "micro_steps": self.micro_steps,
            "updates": self.updates,
            "skipped_updates": self.skipped,
            "dropped_micro_batches": int(round(f(self.dropped))),
            "nonfinite_events": int(round(f(self.nonfinite_events))),
            "samples": samples,
            "samples_per_second": samples / elapsed if elapsed > 0 else 0.0,
            "last_loss": f(self.last_loss),
            "last_grad_norm": f(self.last_norm),
            "mean_grad_norm": f(self.norm_sum) / self.norm_count if self.norm_count else None,
        }

    def state(self) -> dict[str, Any]:
        def c(x: Any) -> Any:
            return x.detach().clone() if isinstance(x, Tensor) else x

        return {k: c(v) for k, v in vars(self).items() if k != "_t0"}

    def load(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            if k in vars(self) and k != "_t0":
                setattr(self, k, v)
