"""What the framework adapters share (imports no framework)."""

from __future__ import annotations

from typing import Any

from ..optimizer import AccumulatingOptimizer

__all__ = ["unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer under framework wrappers (``LightningOptimizer``, ``AcceleratedOptimizer``), down to an
    ``AccumulatingOptimizer``."""
    seen = 0
    while not isinstance(optimizer, AccumulatingOptimizer) and seen < 4:
        inner = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    return optimizer
