"""The accumulation window, its size K (``accumulation_steps``) and the LR rule for a changing K.

The accepted specifications, ``schedule_by`` and ``lr_scaling`` are described in docs/schedules.md.
K only changes when a window closes (or, through ``set_epoch``, while no micro-batch is pending).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator

from torch import Tensor

from ._checks import check_choice, check_int, check_state_number, check_state_scalar, host_float
from .hostread import HostRead

__all__ = ["KSchedule", "LRScaling", "LR_SCALING_RULES", "NoiseSource", "REDUCTIONS", "Schedule", "Window"]

#: A noise-scale estimate: a number, a 0-dim tensor, or None while unknown.
NoiseSource = Callable[[], "float | Tensor | None"]

LR_SCALING_RULES = ("linear", "sqrt")
REDUCTIONS = ("mean", "sum")


class Schedule:
    """Base class of schedule objects that decide K themselves (e.g. :class:`accumopt.AdaptiveK`).

    :meth:`__call__` runs when the wrapper is built (``updates=0``), then at each window's close, maybe twice at
    one boundary (``set_epoch``): the same ``updates`` must give the same K. ``schedule_by``: "update" or "epoch".
    """

    schedule_by = "update"

    def __call__(self, epoch: int, updates: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def attach(self, estimate: NoiseSource | None) -> None:
        """Receive the wrapper's noise-scale estimate (None when it estimates nothing), before it is built."""

    def request(self, read: HostRead, updates: int) -> None:
        """Before the ``updates``-th window closes, ask the update's host ``read`` for inputs (no sync)."""

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state for checkpoints."""
        return {}

    def validate_state_dict(self, state: Any) -> None:
        """Raise ``ValueError`` unless ``state`` can be loaded (before anything changes)."""
        if not isinstance(state, Mapping):
            raise ValueError(f"Invalid state dict: the schedule entry is a {type(state).__name__} (expected a dict)")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class KSchedule:
    """Maps (epoch, number of closed windows) to K; validates the specification up front."""

    def __init__(self, spec: Any, schedule_by: str | None = None) -> None:
        if isinstance(spec, KSchedule):
            spec, schedule_by = spec.spec, schedule_by or spec.schedule_by
        self.spec: Any = spec
        self._points: list[tuple[int, int]] = []
        if isinstance(spec, Schedule):
            self.kind, default_by = "object", getattr(spec, "schedule_by", "update")
        elif isinstance(spec, Mapping):
            if not spec:
                raise ValueError("Invalid accumulation_steps: {} "
                                 "(expected a non-empty mapping {start: K} containing 0)")
            self._points = sorted((check_int("accumulation_steps key", start, minimum=0),
                                   check_int(f"accumulation_steps[{start!r}]", k)) for start, k in spec.items())
            if self._points[0][0] != 0:
                raise ValueError(f"Invalid accumulation_steps: {dict(spec)!r} (a mapping must give K from 0 on)")
            self.kind, default_by = "mapping", "epoch"
        elif isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
            if len(spec) == 0:
                raise ValueError("Invalid accumulation_steps: [] (expected a non-empty list of ints >= 1)")
            self._points = [(i, check_int(f"accumulation_steps[{i}]", k)) for i, k in enumerate(spec)]
            self.kind, default_by = "list", "epoch"
        elif callable(spec) and not isinstance(spec, (numbers.Number, Tensor)):
            self.kind, default_by = "callable", "update"
        else:
            self.spec = check_int("accumulation_steps", spec)
            self.kind, default_by = "constant", "epoch"
        self.schedule_by = check_choice("schedule_by", schedule_by or default_by, ("epoch", "update"))
        if self.kind == "object" and schedule_by is not None and schedule_by != default_by:
            raise ValueError(f"Invalid schedule_by: {schedule_by!r} ({type(spec).__name__} counts {default_by!r})")

    @property
    def constant(self) -> bool:
        """Whether K never changes."""
        return self.kind == "constant"

    def __call__(self, epoch: int, updates: int) -> int:
        """K for a window that starts at ``epoch`` after ``updates`` closed windows."""
        if self.kind == "constant":
            return int(self.spec)
        if self.kind == "object":
            return check_int(f"{type(self.spec).__name__}(...) result", self.spec(epoch, updates))
        position = epoch if self.schedule_by == "epoch" else updates
        if self.kind == "callable":
            return check_int(f"accumulation_steps({position})", self.spec(position))
        return [k for start, k in self._points if start <= position][-1]  # the points are sorted and start at 0

    def attach(self, estimate: NoiseSource | None) -> None:
        """Give a schedule object the wrapper's noise-scale estimate (it may refuse to run without one)."""
        if self.kind == "object":
            self.spec.attach(estimate)

    def request(self, read: HostRead, updates: int) -> None:
        """Let a schedule object ask the update's host read for its decision's inputs (see :class:`Schedule`)."""
        if self.kind == "object":
            self.spec.request(read, updates)

    def describe(self) -> dict[str, Any]:
        """The specification as plain data (what a checkpoint must match)."""
        spec = (int(self.spec) if self.kind == "constant"
                else [[int(a), int(b)] for a, b in self._points] if self.kind in ("list", "mapping")
                else type(self.spec).__name__ if self.kind == "object" else None)
        return {"kind": self.kind, "spec": spec, "by": self.schedule_by}

    def state_dict(self) -> dict[str, Any] | None:
        return self.spec.state_dict() if self.kind == "object" else None

    def validate_window(self, k: int, count: int, epoch: int, closed: int) -> None:
        """Raise ``ValueError`` unless a saved window's K can come from this schedule."""
        # Callables and schedule objects are not called here: they may count their calls.
        if self.kind == "constant" and k != int(self.spec):
            raise ValueError(f"Invalid state dict: window['k'] is {k} (expected the constant "
                             f"accumulation_steps {int(self.spec)})")
        if self.kind in ("list", "mapping"):
            values = sorted({v for _, v in self._points})
            if k not in values:
                raise ValueError(f"Invalid state dict: window['k'] is {k} (expected one of the schedule's values "
                                 f"{values})")
            if count == 0 and k != (expected := self(epoch, closed)):  # between windows: the position's K
                raise ValueError(f"Invalid state dict: window['k'] is {k} at epoch {epoch} after {closed} "
                                 f"windows (the schedule gives {expected})")

    def validate_state_dict(self, state: Any) -> None:
        if self.kind == "object" and state is not None:
            self.spec.validate_state_dict(state)

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if self.kind == "object" and state is not None:
            self.spec.load_state_dict(state)


def _set_lr(group: dict[str, Any], value: float) -> None:
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(value)  # keep the tensor (compiled/captured steps hold it)
    else:
        group["lr"] = value


class LRScaling:
    """Scale the learning rate with the effective batch when K changes (see docs/schedules.md).

    Keeps each group's *unscaled* LR and writes ``unscaled * factor(K)`` into ``param_groups``, the factor
    being ``K / K0`` (``"linear"``) or ``sqrt(K / K0)`` (``"sqrt"``), ``K0`` the first window's K; an LR
    written there by anything else is taken as scaled. A tensor LR is read on the host at boundaries.

    Args:
        rule: ``"linear"`` or ``"sqrt"``.
        param_groups: the optimizer's param groups (read and written in place).
        k_ref: K0.
    """

    def __init__(self, rule: str, param_groups: list[dict[str, Any]], k_ref: int) -> None:
        self.rule = check_choice("lr_scaling", rule, LR_SCALING_RULES)
        self.param_groups = param_groups
        self.k_ref = check_int("k_ref", k_ref)
        self.factor = 1.0
        self.base = [float(g["lr"]) for g in param_groups]
        self.applied = list(self.base)

    def factor_for(self, k: int, k_ref: int | None = None) -> float:
        ratio = k / (self.k_ref if k_ref is None else k_ref)
        return ratio if self.rule == "linear" else math.sqrt(ratio)

    def _sync(self) -> None:
        """Take in LRs changed behind our back (new groups: their LR is unscaled)."""
        for i, g in enumerate(self.param_groups):
            lr = float(g["lr"])
            if i >= len(self.base):
                self.base.append(lr)
                self.applied.append(lr)  # applied at the next boundary
            elif lr != self.applied[i]:
                self.base[i] = lr / self.factor
                self.applied[i] = lr

    def _write(self) -> None:
        # Always from the unscaled value: the previous factor is never divided out (no rounding drift).
        for i, g in enumerate(self.param_groups):
            value = self.base[i] * self.factor if self.factor != 1.0 else self.base[i]
            if value != self.applied[i] or float(g["lr"]) != value:
                _set_lr(g, value)
            self.applied[i] = value

    def rescale(self, k: int) -> None:
        """K of the next window is ``k``: write ``unscaled * factor(k)``."""
        factor = self.factor_for(k)
        if factor == self.factor and len(self.base) == len(self.param_groups):
            return
        self._sync()
        self.factor = factor
        self._write()

    @contextmanager
    def unscaled(self) -> Iterator[None]:
        """Groups hold the unscaled LR inside the block (for the scheduler's step)."""
        self._sync()
        if self.factor != 1.0:
            for g, b in zip(self.param_groups, self.base):
                _set_lr(g, b)
        try:
            yield
        finally:
            self.base = [float(g["lr"]) for g in self.param_groups]
            self.applied = list(self.base)
            self._write()

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "k_ref": self.k_ref, "factor": self.factor,
                "base": list(self.base), "applied": list(self.applied)}

    def validate_state_dict(self, state: Any, k: int | None = None) -> None:
        """Raise ``ValueError`` unless ``state`` fits (and, given the window's ``k``, its factor is K's)."""
        if not isinstance(state, Mapping) or any(key not in state for key in ("k_ref", "factor", "base", "applied")):
            raise ValueError("Invalid state dict: malformed window['lr_scaling'] entry")
        n = len(self.param_groups)
        if not all(isinstance(state[key], list) and len(state[key]) == n for key in ("base", "applied")):
            got = len(state["base"]) if isinstance(state["base"], list) else state["base"]
            raise ValueError(f"Invalid state dict: window['lr_scaling'] has {got} groups (expected {n})")
        check_state_number("window['lr_scaling']['k_ref']", state["k_ref"], integer=True, minimum=1)
        check_state_number("window['lr_scaling']['factor']", state["factor"])
        for x in state["base"] + state["applied"]:
            check_state_number("a learning rate in window['lr_scaling']", x)
        if state.get("rule", self.rule) != self.rule:
            raise ValueError(f"Invalid state dict: window['lr_scaling']['rule'] is {state['rule']!r} "
                             f"(expected {self.rule!r})")
        if k is not None:
            expected = self.factor_for(k, state["k_ref"])
            if not math.isclose(state["factor"], expected, rel_tol=1e-12):
                raise ValueError(f"Invalid state dict: window['lr_scaling']['factor'] is {state['factor']!r} "
                                 f"(expected {expected!r} for K={k} and k_ref={state['k_ref']})")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.k_ref, self.factor = int(state["k_ref"]), float(state["factor"])
        self.base, self.applied = ([float(x) for x in state[key]] for key in ("base", "applied"))


class Window:
    """Counts the micro-batches of the current window and the sum of their weights.

    Args:
        schedule: the K schedule.
        lr_scaling: optional LR rule (``"linear"``, ``"sqrt"``) applied when K changes.
        param_groups: the groups whose LR ``lr_scaling`` scales.
        reduction: ``"mean"`` (the update is the sum over the weight total) or ``"sum"``.
    """

    def __init__(self, schedule: KSchedule, lr_scaling: str | None = None,
                 param_groups: list[dict[str, Any]] | None = None, reduction: str = "mean") -> None:
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        if lr_scaling is not None:
            check_choice("lr_scaling", lr_scaling, LR_SCALING_RULES)
        self.schedule = schedule
        self.epoch = 0
        self.closed = 0  # windows closed so far (applied or skipped)
        self.count = 0  # micro-batches in the current window
        self.total: float | Tensor = 0.0  # their summed weight
        self.open_ended = False  # only flush() closes it (MicroBatcher: one batch, one window)
        self.weighted = False  # any explicit micro-batch weight so far (sticky for the run)
        # Scale-free weights: micro-batch weights in .grad are relative to this reference (the window's first
        # weight; None until fixed), so the sums hold sum(w_i g_i) / ref. The boundary multiplies ref back.
        self.ref: float | Tensor | None = None
        self.k = schedule(0, 0)
        self.lr_scaling = None
        if lr_scaling is not None:
            if param_groups is None:
                raise ValueError("lr_scaling needs the optimizer's param_groups")
            self.lr_scaling = LRScaling(lr_scaling, param_groups, self.k)

    def add(self, weight: "float | Tensor") -> None:
        self.count += 1
        self.total = self.total + weight

    @property
    def full(self) -> bool:
        return not self.open_ended and self.count >= self.k

    @property
    def next_is_last(self) -> bool:
        """Whether the next micro-batch closes the window."""
        return not self.open_ended and self.count + 1 >= self.k

    def unit(self) -> "float | Tensor":
        """The reference weight of the sums (1 unless scale-free weights fixed another)."""
        return 1.0 if self.ref is None else self.ref

    def grad_factor(self) -> "float | Tensor":
        """What the window's sum is multiplied by to give the applied gradient."""
        factor = self.inv_total() if self.reduction == "mean" else 1.0
        ref = self.ref
        return factor if ref is None or (not isinstance(ref, Tensor) and ref == 1.0) else ref * factor

    def inv_total(self) -> "float | Tensor":
        if isinstance(self.total, Tensor):
            return self.total.clamp_min(1e-38).reciprocal()
        return 1.0 / self.total if self.total > 0 else 0.0

    def close(self) -> None:
        self.discard()
        self.closed += 1
        self._set_k(self.schedule(self.epoch, self.closed))

    def discard(self) -> None:
        """Forget the pending micro-batches without closing the window (the caller resets the sums)."""
        self.count, self.total, self.ref = 0, 0.0, None

    def _set_k(self, k: int) -> None:
        self.k = k
        if self.lr_scaling is not None:
            self.lr_scaling.rescale(k)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int("epoch", epoch, minimum=0)
        if self.count == 0 and not self.open_ended:
            self._set_k(self.schedule(self.epoch, self.closed))

    def scheduler_lr(self) -> ContextManager[None]:
        """Context for the scheduler's step: unscaled LRs inside (see :class:`LRScaling`)."""
        return nullcontext() if self.lr_scaling is None else self.lr_scaling.unscaled()

    @property
    def lr_scaling_rule(self) -> str | None:
        return None if self.lr_scaling is None else self.lr_scaling.rule

    def state_dict(self) -> dict[str, Any]:
        total, ref = self.total, self.ref
        out: dict[str, Any] = {"epoch": self.epoch, "closed": self.closed, "count": self.count, "k": self.k,
                               "total": total.detach().clone() if isinstance(total, Tensor) else float(total),
                               "ref": ref.detach().clone() if isinstance(ref, Tensor) else ref}
        if (schedule_state := self.schedule.state_dict()) is not None:
            out["schedule"] = schedule_state
        if self.lr_scaling is not None:
            out["lr_scaling"] = self.lr_scaling.state_dict()
        return out

    def validate_state_dict(self, state: Any) -> None:
        """Raise ``ValueError`` unless ``state`` looks like :meth:`state_dict` of this window."""
        if not isinstance(state, Mapping):
            raise ValueError(f"Invalid state dict: the window entry is a {type(state).__name__} (expected a dict)")
        for key, minimum in (("epoch", 0), ("closed", 0), ("count", 0), ("k", 1)):
            if key not in state:
                raise ValueError(f"Invalid state dict: window entry lacks {key!r}")
            check_state_number(f"window[{key!r}]", state[key], integer=True, minimum=minimum)
        check_state_scalar("window['total']", state.get("total"))
        count, k = state["count"], state["k"]
        if count >= k:
            raise ValueError(f"Invalid state dict: window['count'] is {count} with window['k'] {k} (expected "
                             "0 <= count < k: a full window is applied before the state is taken)")
        self.schedule.validate_window(k, count, state["epoch"], state["closed"])
        total = state["total"]
        value = host_float(total)
        if isinstance(total, Tensor) and (total.is_complex() or not total.is_floating_point()):
            raise ValueError(f"Invalid state dict: window['total'] has dtype {total.dtype} (expected a float)")
        if not math.isfinite(value) or value < 0 or (count == 0 and value != 0):
            raise ValueError(f"Invalid state dict: window['total'] is {value!r} with {count} micro-batches pending "
                             "(expected the finite, non-negative sum of their weights; 0 with none pending)")
        if (ref := state.get("ref")) is not None:
            check_state_scalar("window['ref']", ref)
            r = host_float(ref)
            if not (math.isfinite(r) and r > 0):
                raise ValueError(f"Invalid state dict: window['ref'] is {r!r} (expected a finite reference weight > 0)")
        self.schedule.validate_state_dict(state.get("schedule"))
        if self.lr_scaling is not None:
            if state.get("lr_scaling") is None:
                raise ValueError("Invalid state dict: window entry lacks 'lr_scaling' (this optimizer scales "
                                 "the learning rate with K)")
            self.lr_scaling.validate_state_dict(state["lr_scaling"], k)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors are taken as given: the caller copies them)."""
        self.validate_state_dict(state)
        self.epoch, self.closed, self.count, self.k = (int(state[k]) for k in ("epoch", "closed", "count", "k"))
        self.total = state["total"]
        ref = state.get("ref")
        self.ref = ref if isinstance(ref, Tensor) or ref is None else float(ref)
        self.schedule.load_state_dict(state.get("schedule"))
        if self.lr_scaling is not None and state.get("lr_scaling") is not None:
            self.lr_scaling.load_state_dict(state["lr_scaling"])
