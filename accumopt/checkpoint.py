"""Validation of state dicts and checkpoint files (expanded by the state issue)."""

from __future__ import annotations

from typing import Any

__all__ = ["validate_state_dict"]


def validate_state_dict(wrapper: Any, optimizer_sd: dict, acc: dict | None) -> None:
    """Raise ``ValueError`` if ``optimizer_sd``/``acc`` do not fit ``wrapper``; change nothing."""
    groups = optimizer_sd.get("param_groups")
    if not isinstance(groups, list) or "state" not in optimizer_sd:
        raise ValueError("Invalid state dict: missing 'state' or 'param_groups' (expected an optimizer state dict)")
    ours = wrapper.param_groups
    if len(groups) != len(ours) or any(len(a["params"]) != len(b["params"]) for a, b in zip(groups, ours)):
        raise ValueError(
            f"Invalid state dict: {len(groups)} param groups of sizes {[len(g['params']) for g in groups]} "
            f"(expected {len(ours)} of sizes {[len(g['params']) for g in ours]})"
        )
    if acc is None:
        return
    for key in ("window", "sums", "stats"):
        if key not in acc:
            raise ValueError(f"Invalid state dict: accumulation entry lacks {key!r}")
    expected = wrapper._store.expected()
    sums = acc["sums"]
    if len(sums) != len(expected):
        raise ValueError(f"Invalid state dict: {len(sums)} accumulation sums (expected {len(expected)})")
    for i, (t, (shape, dtype)) in enumerate(zip(sums, expected)):
        if t is not None and (tuple(t.shape) != shape or t.dtype != dtype):
            raise ValueError(
                f"Invalid state dict: accumulation sum {i} has shape {tuple(t.shape)} and dtype {t.dtype} "
                f"(expected {shape} and {dtype})"
            )
