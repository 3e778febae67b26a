"""Clipping of the accumulated gradient, applied once per real update.

Global norm (``torch.nn.utils.clip_grad_norm_``: foreach, clamped, no host sync),
by value, and unit-wise adaptive gradient clipping (AGC, Brock et al. 2021,
"High-Performance Large-Scale Image Recognition Without Normalization").
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Clipper", "adaptive_clip_grad_"]


def _unitwise_norm(x: Tensor) -> Tensor:
    if x.ndim <= 1:
        return x.norm(2)
    return x.norm(2, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad_(params: Sequence[Tensor], clip_factor: float, eps: float = 1e-3) -> None:
    """Bound each unit's gradient norm by ``clip_factor * max(|unit weight|, eps)``.

    A unit is a row (output unit) of a weight with 2+ dims, or a whole 1-D tensor.
    """
    for p in params:
        g = p.grad
        if g is None:
            continue
        max_norm = _unitwise_norm(p.detach().to(g.dtype)).clamp_min(eps).mul_(clip_factor)
        g_norm = _unitwise_norm(g)
        factor = (max_norm / g_norm.clamp_min(1e-6)).clamp_max(1.0)
        g.mul_(torch.where(g_norm > max_norm, factor, torch.ones_like(factor)))


class Clipper:
    """The clipping configured on a wrapper; ``__call__`` returns the pre-clip norm (device tensor) or None."""

    def __init__(
        self,
        *,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        max_value: float | None = None,
        agc_factor: float | None = None,
        agc_eps: float = 1e-3,
        track_norm: bool = False,
    ) -> None:
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.max_value = max_value
        self.agc_factor = agc_factor
        self.agc_eps = agc_eps
        self.track_norm = track_norm

    @property
    def active(self) -> bool:
        return self.track_norm or any(x is not None for x in (self.max_norm, self.max_value, self.agc_factor))

    def __call__(self, params: list[Tensor]) -> Tensor | None:
        if not self.active:
            return None
        params = [p for p in params if p.grad is not None]
        if not params:
            return None
        norm: Tensor | None = None
        if self.max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm, self.norm_type)
        elif self.track_norm:
            grads = [p.grad for p in params]
            norm = torch.nn.utils.get_total_norm(grads, self.norm_type) if hasattr(torch.nn.utils, "get_total_norm") else torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, self.norm_type) for g in grads]), self.norm_type)
        if self.max_value is not None:
            torch.nn.utils.clip_grad_value_(params, self.max_value)
        if self.agc_factor is not None:
            adaptive_clip_grad_(params, self.agc_factor, self.agc_eps)
        return norm
