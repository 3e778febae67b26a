"""Gradient synchronisation control for data-parallel models.

The wrapper knows, at the end of each micro-step, whether the *next* backward
pass closes the window. It tells the model, so that DDP all-reduces (and FSDP2
reduce-scatters) only on that backward: DDP through ``require_backward_grad_sync``
(what ``no_sync()`` toggles), FSDP2 through ``set_requires_gradient_sync``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["GradSync", "unwrap_model"]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside a DDP/DataParallel wrapper (for parameter names)."""
    inner = getattr(model, "module", None)
    if isinstance(inner, torch.nn.Module) and hasattr(model, "require_backward_grad_sync"):
        return inner
    return model


class GradSync:
    """Switches a model's gradient synchronisation on for the last micro-batch only."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.kind = "none"
        if model is None:
            return
        if hasattr(model, "require_backward_grad_sync"):
            self.kind = "ddp"
        elif hasattr(model, "set_requires_gradient_sync"):
            self.kind = "fsdp"

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def set(self, sync: bool) -> None:
        """Whether the next backward pass reduces gradients across ranks."""
        if self.kind == "ddp":
            self.model.require_backward_grad_sync = sync
        elif self.kind == "fsdp":
            self.model.set_requires_gradient_sync(sync)
