"""Clipping of the accumulated gradient, once per real update (user guide: docs/precision.md).

Global norm (``clip_grad_norm_``: foreach, no host sync), by value, and unit-wise adaptive gradient clipping
(AGC, Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without Normalization").
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ._checks import check_real

__all__ = ["Clipper", "adaptive_clip_grad_"]


def _unitwise_norm(x: Tensor) -> Tensor:
    dim = None if x.ndim <= 1 else tuple(range(1, x.ndim))
    norm: Tensor = torch.linalg.vector_norm(x, 2, dim=dim, keepdim=dim is not None)
    return norm


@torch.no_grad()
def adaptive_clip_grad_(params: Sequence[Tensor], clip_factor: float, eps: float = 1e-3) -> None:
    """Bound each unit's gradient norm by ``clip_factor * max(|unit weight|, eps)`` (no host sync).

    A unit is a row (output unit) of a 2+-D weight, as in the paper's reference code, or a whole 0/1-D tensor;
    ``eps`` keeps zero-initialised weights from freezing.
    """
    for p in params:
        g = p.grad
        if g is None:
            continue
        # norms in at least fp32: bf16/fp16 norms would round the threshold itself
        dtype = torch.promote_types(g.dtype, torch.float32) if not g.is_complex() else g.dtype
        max_norm = _unitwise_norm(p.detach().to(dtype)).clamp_min(eps).mul_(clip_factor)
        g_norm = _unitwise_norm(g.to(dtype))
        factor = (max_norm / g_norm.clamp_min(1e-6)).clamp_max(1.0)  # 1 where the unit is within bounds
        g.mul_(factor.to(g.dtype) if g.dtype != dtype else factor)


def _total_norm(grads: list[Tensor], norm_type: float) -> Tensor:
    """The global norm without clipping (``get_total_norm`` from torch 2.6 on; foreach, no sync)."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        total: Tensor = get_total_norm(grads, norm_type)
    else:  # pragma: no cover - torch < 2.6
        norms = torch._foreach_norm(grads, norm_type)
        total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), norm_type)
    return total


def _threshold(name: str, value: Any) -> float | None:
    """A clipping threshold >= 0; 0 and None mean no clipping (None)."""
    return None if value is None else (check_real(name, value, nonnegative=True) or None)


class Clipper:
    """The clipping configured on a wrapper; ``__call__`` returns the pre-clip norm (device tensor) or None.

    ``max_norm``/``max_value``/``agc_factor`` are the wrapper's ``max_grad_norm``/``clip_value``/``agc_clip_factor``
    (0 or None: none); ``track_norm``: compute the pre-clip norm even without ``max_norm``.
    """

    def __init__(self, *, max_norm: float | None = None, norm_type: float = 2.0, max_value: float | None = None,
                 agc_factor: float | None = None, agc_eps: float = 1e-3, track_norm: bool = False) -> None:
        # 0 (or None) means no clipping, as in the Hugging Face Trainer and nanoGPT
        self.max_norm = _threshold("max_grad_norm", max_norm)
        self.max_value = _threshold("clip_value", max_value)
        self.agc_factor = _threshold("agc_clip_factor", agc_factor)
        if norm_type != float("inf"):  # inf: the max-norm, as in clip_grad_norm_
            check_real("norm_type", norm_type, positive=True)
        self.norm_type = norm_type
        self.agc_eps = check_real("agc_eps", agc_eps, positive=True)
        self.track_norm = bool(track_norm)

    @property
    def active(self) -> bool:
        return self.track_norm or any(x is not None for x in (self.max_norm, self.max_value, self.agc_factor))

    def __call__(self, params: list[Tensor]) -> Tensor | None:
        """Clip the ``.grad`` of ``params`` in place (norm, then value, then AGC); return the pre-clip norm."""
        params = [p for p in params if p.grad is not None] if self.active else []
        if not params:
            return None
        norm: Tensor | None = None
        if self.max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm, self.norm_type)
        elif self.track_norm:
            norm = _total_norm([p.grad for p in params if p.grad is not None], self.norm_type)
        if self.max_value is not None:
            torch.nn.utils.clip_grad_value_(params, self.max_value)
        if self.agc_factor is not None:
            adaptive_clip_grad_(params, self.agc_factor, self.agc_eps)
        return norm
