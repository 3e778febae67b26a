"""Adaptive K: the window follows the gradient noise scale (McCandlish et al. 2018, arXiv:1812.06162).

The rules and the estimate are described in docs/schedules.md. The estimate is read within the real
update's single host read: micro-steps stay sync-free.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ._checks import check_int, check_real, check_state_number
from .hostread import HostRead
from .schedule import NoiseSource, Schedule

__all__ = ["AdaptiveK"]


class AdaptiveK(Schedule):
    """K between ``k_min`` and ``k_max`` following the gradient noise scale (see docs/schedules.md).

    At a window boundary, once the target ``T = noise scale / micro_batch_size`` has left ``[K / band,
    K * band]`` on one side for ``patience`` windows, K jumps to the candidate ``k_min * 2**j`` (or
    ``k_max``) nearest to ``T`` in log scale. Pass it as ``accumulation_steps``::

        opt = AccumulatingOptimizer(inner, AdaptiveK(k_min=1, k_max=64, micro_batch_size=32,
                                                     noise_scale=estimator))

    Args:
        noise_scale: a callable returning the simple noise scale in *samples* (a float, a 0-dim tensor,
            or None while unknown). None: follow ``opt.noise_scale()`` (``noise_scale=True`` in the wrapper).
        k_min: smallest K (acts as 2 with the wrapper's estimator: one micro-batch tells it nothing).
        k_max: largest K.
        micro_batch_size: samples per micro-batch (1: the estimate is in micro-batches).
        k_init: K of the first windows (default ``k_min``, raised to the floor).
        band: hysteresis factor, >= sqrt(2) so that a constant estimate is a fixed point.
        patience: consecutive out-of-band windows, in the same direction, needed to move.
        warmup: windows before the first decision (the estimate needs a few updates).
    """

    schedule_by = "update"

    def __init__(self, noise_scale: NoiseSource | None = None, *, k_min: int = 1, k_max: int,
                 micro_batch_size: float = 1, k_init: int | None = None, band: float = 2.0, patience: int = 3,
                 warmup: int = 1) -> None:
        if noise_scale is not None and not callable(noise_scale):
            raise TypeError(f"Invalid noise_scale: {noise_scale!r} "
                            "(expected a callable returning the estimate, or None)")
        self.k_min = check_int("k_min", k_min)
        self.k_max = check_int("k_max", k_max)
        if self.k_max < self.k_min:
            raise ValueError(f"Invalid k_max: {k_max} (expected an int >= k_min={k_min})")
        self.micro_batch_size = check_real("micro_batch_size", micro_batch_size, positive=True)
        k_init = self.k_min if k_init is None else check_int("k_init", k_init)
        if not self.k_min <= k_init <= self.k_max:
            raise ValueError(f"Invalid k_init: {k_init} (expected an int in [k_min={k_min}, k_max={k_max}])")
        self.band = check_real("band", band)
        if self.band < math.sqrt(2):
            raise ValueError(f"Invalid band: {band} (expected a factor >= sqrt(2), or K would oscillate)")
        self.patience = check_int("patience", patience)
        self.warmup = check_int("warmup", warmup, minimum=0)
        self.noise_scale = noise_scale
        self.floor = self.k_min  # the lowest K used; 2 with the wrapper's estimator (see attach)
        self.candidates = self._candidates()
        self.k = k_init
        self.target: float | None = None  # last target, in micro-batches
        self.changes = 0  # times K changed
        self._direction = self._streak = 0  # the side of the band the target is on, for how many windows
        self._decided_at = 0  # the boundary (closed windows) of the last decision
        self._source = noise_scale
        self._prefetched: tuple[int, Any, HostRead | None] | None = None  # (boundary, value, its read)

    def _candidates(self) -> list[int]:
        powers = (self.k_min * 2**j for j in range(self.k_max.bit_length()))
        return [k for k in powers if self.floor <= k < self.k_max] + [self.k_max]

    def attach(self, estimate: NoiseSource | None) -> None:
        """Called by the wrapper before it is built, with its own noise-scale estimate (or None).

        Raises:
            ValueError: no callable ``noise_scale`` and no estimation in the wrapper.
        """
        if self.noise_scale is not None:
            return
        if estimate is None:
            raise ValueError("Invalid accumulation_steps: AdaptiveK has no noise-scale estimate to follow (build the "
                             "wrapper with noise_scale=True, or give AdaptiveK(noise_scale=callable))")
        self._source = estimate
        self.floor = max(self.k_min, min(2, self.k_max))  # one micro-batch: nothing to estimate from
        self.candidates = self._candidates()
        self.k = max(self.k, self.floor)

    def decides_at(self, updates: int) -> bool:
        """Whether the window closing as the ``updates``-th one makes a decision."""
        return updates != self._decided_at and updates >= self.warmup

    def request(self, read: HostRead, updates: int) -> None:
        """Before the ``updates``-th window closes, ask the update's ``read`` for the estimate if a decision is due."""
        if not self.decides_at(updates) or self._source is None or self.noise_scale is not None:
            return  # a user's callable is read at the window's close, after the update, as documented
        value = self._source()
        if isinstance(value, Tensor):
            read.add("adaptive_k", value.reshape(-1)[:1])
        self._prefetched = (updates, value, read if isinstance(value, Tensor) else None)

    def read(self, updates: int | None = None) -> float | None:
        """The estimate fetched for boundary ``updates``, else read now (a sync for a device tensor)."""
        pre, self._prefetched = self._prefetched, None
        if pre is not None and pre[0] == updates:
            _, value, read = pre
            if read is not None and read.done:
                value = read.scalar("adaptive_k")
        else:
            value = None if self._source is None else self._source()
        if value is None:
            return None
        value = float(value)  # a device tensor not read with the update (flush after an error): one sync
        return value if math.isfinite(value) and value > 0 else None

    def nearest(self, target: float) -> int:
        """The candidate K nearest to ``target`` in log scale (the smaller one on a tie)."""
        if target <= 0:
            return self.candidates[0]
        log_t = math.log(target)
        return min(self.candidates, key=lambda k: (abs(math.log(k) - log_t), k))

    def __call__(self, epoch: int, updates: int) -> int:
        if not self.decides_at(updates):
            return self.k  # already decided at this boundary, or still warming up
        self._decided_at = updates
        estimate = self.read(updates)
        if estimate is None:
            return self.k  # no evidence: stay
        self.target = estimate / self.micro_batch_size
        up = self.target > self.k * self.band and self.k < self.k_max
        down = self.target < self.k / self.band and self.k > self.floor  # never both: band > 1
        direction = int(up) - int(down)
        # consecutive out-of-band windows on the same side (0 when back in the band)
        self._streak = self._streak + 1 if direction and direction == self._direction else abs(direction)
        self._direction = direction
        if direction and self._streak >= self.patience:
            k = self.nearest(self.target)
            if k != self.k:
                self.k = k
                self.changes += 1
            self._streak = self._direction = 0
        return self.k

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "target": self.target, "changes": self.changes, "direction": self._direction,
                "streak": self._streak, "decided_at": self._decided_at}

    def validate_state_dict(self, state: Any) -> None:
        super().validate_state_dict(state)
        check_state_number("schedule['k']", state.get("k"), integer=True, minimum=1)
        for key in ("changes", "streak", "decided_at"):
            if key in state:
                check_state_number(f"schedule[{key!r}]", state[key], integer=True, minimum=0)
        if state.get("target") is not None:
            check_state_number("schedule['target']", state["target"])

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.validate_state_dict(state)
        self.k = int(state["k"])
        self.target = None if state.get("target") is None else float(state["target"])
        self.changes, self._direction, self._streak, self._decided_at = (
            int(state.get(key, 0)) for key in ("changes", "direction", "streak", "decided_at"))

    def __repr__(self) -> str:
        return (f"AdaptiveK(k={self.k}, k_min={self.k_min}, k_max={self.k_max}, "
                f"micro_batch_size={self.micro_batch_size:g}, band={self.band:g}, patience={self.patience})")
