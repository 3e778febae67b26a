"""Argument validation shared by the public constructors: ``TypeError`` for a value of the wrong kind,
``ValueError`` for one out of range, naming the argument, the value and what was expected."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import torch

_BOOLS: tuple[type, ...] = (bool,)
try:  # numpy is optional; its bool is not an Integral, but be explicit
    from numpy import bool_
    _BOOLS = (bool, bool_)
except ImportError:  # pragma: no cover
    pass

__all__ = ["check_choice", "check_int", "check_real", "check_state_number", "check_state_scalar", "weight_dtype"]


def weight_dtype(device: torch.device) -> torch.dtype:
    """dtype for micro-batch weights and their sums: float64 (exact counts) where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def scalar_tensor(value: "torch.Tensor | float", device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``value`` (a number or a one-element tensor) as a 0-dim ``dtype`` tensor on ``device``, without a sync."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, dtype, non_blocking=True).reshape(())
    return torch.full((), float(value), device=device, dtype=dtype)  # a fill, not a host-to-device copy


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is an integer >= ``minimum`` (numpy ints too; bools are rejected)."""
    if isinstance(value, _BOOLS) or not isinstance(value, Integral):
        raise TypeError(f"Invalid {name}: {value!r} (expected an int >= {minimum}, got {type(value).__name__})")
    number = int(value)
    if number < minimum:
        raise ValueError(f"Invalid {name}: {number} (expected an int >= {minimum})")
    return number


def check_real(name: str, value: Any, *, positive: bool = False, nonnegative: bool = False) -> float:
    """Return ``value`` as a float if it is a finite real number in range."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"Invalid {name}: {value!r} (expected a real number, got {type(value).__name__})")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"Invalid {name}: {number} (expected a finite number)")
    if positive and number <= 0:
        raise ValueError(f"Invalid {name}: {number} (expected a number > 0)")
    if nonnegative and number < 0:
        raise ValueError(f"Invalid {name}: {number} (expected a number >= 0)")
    return number


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(repr(c) for c in choices)})")
    return str(value)


def check_cuda_present(name: str, device: torch.device) -> None:
    """Raise ``ValueError`` naming ``name`` when the CUDA ``device`` does not exist on this machine."""
    if not torch.cuda.is_available():
        raise ValueError(f"Invalid device: {name!r} (CUDA is not available on this machine)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"Invalid device: {name!r} (expected an index below the "
                         f"{torch.cuda.device_count()} CUDA device(s) of this machine)")


def check_state_number(where: str, value: Any, *, integer: bool = False, minimum: float | None = None) -> None:
    """Raise ``ValueError`` unless a state-dict entry is a finite number (an int) >= ``minimum``."""
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not ok or not (integer or math.isfinite(value)) or (minimum is not None and value < minimum):
        kind = "an int" if integer else "a finite number"
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"Invalid state dict: {where} is {value!r} (expected {kind}{bound})")


def host_float(x: "torch.Tensor | float") -> float:
    """A saved scalar as a Python float (a tensor is read on the host: loading only)."""
    return float(x.detach().double().cpu().reshape(())) if isinstance(x, torch.Tensor) else float(x)


def check_state_scalar(where: str, value: Any) -> None:
    """Raise ``ValueError`` unless a state-dict entry is a one-element tensor or a finite number."""
    if not isinstance(value, torch.Tensor):
        check_state_number(where, value)
    elif value.numel() != 1:
        raise ValueError(f"Invalid state dict: {where} is a tensor of shape {tuple(value.shape)} (expected a scalar)")
