"""The owned ``torch.amp.GradScaler``, behind one small adapter (user guide: docs/precision.md).

The wrapper unscales once per window, fp16 gradients too (the single cast of an fp32 sum, whose unscale by a power
of two is as exact as the cast), which ``GradScaler.unscale_`` refuses. That needs the private ``GradScaler``
members named in :data:`PRIVATE_MEMBERS`; no other module touches them (tests/test_precision.py checks them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from ._checks import check_state_number

__all__ = ["LossScaler", "PRIVATE_MEMBERS", "scale_tensor"]

#: Private ``GradScaler`` members used here, and what each must be.
PRIVATE_MEMBERS = {
    "_scale": "attribute",  # the current scale (device tensor; None until the first scale())
    "_per_optimizer_states": "attribute",  # {id(optimizer): {"stage": OptState, "found_inf_per_device": ...}}
    "_lazy_init_scale_growth_tracker": "method",
    "_check_scale_growth_tracker": "method",
    "_unscale_grads_": "method",  # (optimizer, inv_scale, found_inf, allow_fp16) -> {device: found_inf}
}
_STATE_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def check_factors(growth: Any, backoff: Any, interval: Any, where: str) -> None:
    """Raise ``ValueError`` unless a GradScaler's growth factor is > 1, backoff in (0, 1), interval an int >= 1."""
    if not _real(growth) or not growth > 1.0:
        raise ValueError(f"Invalid {where}growth_factor: {growth!r} (expected a finite number > 1; otherwise the "
                         "scale never grows back after an overflow)")
    if not _real(backoff) or not 0.0 < backoff < 1.0:
        raise ValueError(f"Invalid {where}backoff_factor: {backoff!r} (expected a number in (0, 1); otherwise the "
                         "scale does not back off after an overflow)")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"Invalid {where}growth_interval: {interval!r} (expected an int >= 1)")


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def scale_tensor(scaler: "torch.amp.GradScaler | None") -> Tensor | None:
    """The scaler's current scale tensor (None before its first ``scale()``, or without a scaler)."""
    return None if scaler is None else scaler._scale


class LossScaler:
    """An enabled ``GradScaler`` owned by the wrapper: its scale is constant within a window."""

    def __init__(self, scaler: "torch.amp.GradScaler") -> None:
        if not isinstance(scaler, torch.amp.GradScaler) or not scaler.is_enabled():
            raise TypeError(f"Invalid scaler: {type(scaler).__name__} (expected an enabled torch.amp.GradScaler)")
        self.scaler = scaler
        self.check_settings()
        self._unscaled: int | None = None  # id of the optimizer unscaled in this window

    def check_settings(self) -> None:
        """Raise ``ValueError`` unless the scaler's factors make sense (host values only: no sync)."""
        # Checked at construction, at load and at every update: torch's set_growth_factor & co. accept any value.
        s = self.scaler
        check_factors(s.get_growth_factor(), s.get_backoff_factor(), s.get_growth_interval(), "scaler ")
        if s._scale is None:  # not created yet: get_scale() returns the initial scale, a host number (no sync)
            init = s.get_scale()
            if not _real(init) or not init > 0:
                raise ValueError(f"Invalid scaler init_scale: {init!r} (expected a finite number > 0)")

    def scale(self, loss: Tensor) -> Tensor:
        """``loss`` times the current scale."""
        return self.scaler.scale(loss)

    def scale_tensor(self) -> Tensor | None:
        """The current scale (device tensor, no sync), None before the first :meth:`scale`."""
        return scale_tensor(self.scaler)

    def unscale_(self, inner: torch.optim.Optimizer) -> dict[torch.device, Tensor]:
        """``scaler.unscale_(inner)``, fp16 gradients allowed; returns the found-inf flag per device."""
        self.check_settings()  # factors changed through torch's setters since the last update
        scaler = self.scaler
        if scaler._scale is None:  # e.g. loaded from a state dict: GradScaler creates it lazily, in scale()
            params = [p for g in inner.param_groups for p in g["params"]]
            device = next((p.grad.device for p in params if p.grad is not None), params[0].device)
            scaler._lazy_init_scale_growth_tracker(device)
        scaler._check_scale_growth_tracker("unscale_")
        state = scaler._per_optimizer_states[id(inner)]
        if state["stage"] is not OptState.READY:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        scale = cast(Tensor, scaler._scale)  # created by _check_scale_growth_tracker above
        inv_scale = scale.double().reciprocal().float()
        found_inf = torch.full((), 0.0, dtype=torch.float32, device=scale.device)
        per_device: dict[torch.device, Tensor] = scaler._unscale_grads_(inner, inv_scale, found_inf, True)
        state["found_inf_per_device"] = per_device
        state["stage"] = OptState.UNSCALED
        self._unscaled = id(inner)
        return per_device

    def update(self) -> None:
        """``scaler.update()`` (after a window that produced a gradient)."""
        self.scaler.update()
        self._unscaled = None

    def forget_unscale(self) -> None:
        """Drop the record of this window's unscale (no update follows): the scale stays as it was."""
        if self._unscaled is not None:
            self.scaler._per_optimizer_states.pop(self._unscaled, None)
        self._unscaled = None

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    @staticmethod
    def validate_state_dict(state: Any) -> None:
        """Raise ``ValueError`` unless ``state`` is a usable ``GradScaler`` state dict (scale, factors, tracker)."""
        if not isinstance(state, Mapping) or any(k not in state for k in _STATE_KEYS):
            raise ValueError(f"Invalid state dict: the scaler entry lacks one of {_STATE_KEYS}")
        for k in _STATE_KEYS:
            check_state_number(f"scaler[{k!r}]", state[k])
        if not state["scale"] > 0:
            raise ValueError(f"Invalid state dict: scaler['scale'] is {state['scale']!r} "
                             "(expected a finite number > 0)")
        check_factors(state["growth_factor"], state["backoff_factor"], state["growth_interval"],
                      "state dict: scaler ")
        tracker = state["_growth_tracker"]
        if isinstance(tracker, bool) or not isinstance(tracker, int) or not 0 <= tracker < state["growth_interval"]:
            raise ValueError(f"Invalid state dict: scaler['_growth_tracker'] is {tracker!r} (expected an int in "
                             f"[0, {state['growth_interval']}))")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.validate_state_dict(state)
        self.scaler.load_state_dict(dict(state))
