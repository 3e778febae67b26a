"""Gradient noise scale: the batch size beyond which more accumulation stops paying.

:class:`NoiseScaleEstimator` smooths McCandlish et al. 2018's small-/big-batch estimators (appendix A), the window
being the big batch and its micro-batches the small ones, all on the device; see docs/state.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._checks import check_real, check_state_number, host_float, scalar_tensor
from .checkpoint import clone_tree
from .buffers import GradientStore
from .sync import GradSync

__all__ = ["NoiseScaleEstimator", "simple_noise_scale_terms"]

# Checkpointed fields besides beta (the averages and the open window's measurements).
_STATE_KEYS = ("windows", "valid", "trace", "grad_sq", "small_sq", "small_n", "small_inv_w")


def simple_noise_scale_terms(small_sq: "Tensor | float", big_sq: "Tensor | float", b_small: "Tensor | float",
                             b_big: "Tensor | float") -> "tuple[Tensor | float, Tensor | float]":
    """Unbiased ``(tr(Sigma), |G|^2)`` from small- and big-batch squared norms (``b_small < b_big``), no host read."""
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    return trace, grad_sq


def _sq_norm(tensors: list[Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
    """Sum of squared 2-norms of ``tensors`` as a 0-dim ``dtype`` tensor on ``device`` (no sync)."""
    by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        t = t.coalesce().values() if t.is_sparse else t
        by_key.setdefault((t.device, t.dtype), []).append(t.detach())
    total = torch.zeros((), device=device, dtype=dtype)
    for (_, tdtype), ts in by_key.items():
        norm_dtype = torch.float64 if tdtype in (torch.float64, torch.complex128) else torch.float32
        norms = torch._foreach_norm(ts, 2, dtype=norm_dtype) if tdtype not in (torch.complex64, torch.complex128) \
            else torch._foreach_norm(ts, 2)
        part = torch.stack([n.to(device, dtype, non_blocking=True) for n in norms])
        total = total + part.square().sum()
    return total


class NoiseScaleEstimator:
    """Exponentially smoothed simple noise scale of an :class:`~accumopt.AccumulatingOptimizer`.

    Turn it on with ``AccumulatingOptimizer(..., noise_scale=True)`` (or pass an instance to choose
    ``beta``); read it with ``opt.noise_scale()`` (a 0-dim device tensor) or ``opt.stats()``.

    Args:
        beta: EMA factor per measured window, in [0, 1). 0 keeps the last window only.
    """

    def __init__(self, beta: float = 0.95) -> None:
        self.beta = check_real("noise_scale beta", beta, nonnegative=True)
        if self.beta >= 1.0:
            raise ValueError(f"Invalid noise_scale beta: {self.beta} (expected a number in [0, 1))")
        self.windows = 0  # windows offered to the estimator (host count; valid ones are counted on device)
        self.valid: Tensor | float = 0.0  # windows that contributed (device)
        self.trace: Tensor | None = None  # EMA of tr(Sigma)
        self.grad_sq: Tensor | None = None  # EMA of |G|^2
        self.discard_window()

    def discard_window(self) -> None:
        """Forget the current window's measurements (at a boundary, or the window was discarded)."""
        self.small_sq: Tensor | float = 0.0  # sum over measured micro-batches of |g_i|^2
        self.small_n: Tensor | float = 0.0  # number of measured (kept) micro-batches
        self.small_inv_w: Tensor | float = 0.0  # sum of 1 / w_i over them

    def on_micro_step(self, store: GradientStore, weight: "float | Tensor", factor: "float | Tensor",
                      found: Tensor | None, *, weight_in_grad: bool = False,
                      loss_scale: Tensor | None = None) -> None:
        """Measure this micro-batch's gradient in ``.grad`` before it enters the window. No sync.

        Only while ``.grad`` holds this micro-batch's gradient alone (not a partial sum, not a
        cross-rank mean), times ``factor`` (keep / external loss scale), ``weight`` when
        ``weight_in_grad`` and ``loss_scale`` (an owned scaler's); ``found``: the dropped flag.
        """
        device, dtype = store.device, store.float_dtype
        sq = None
        for g in store.groups:
            if grads := [p.grad for p in g.params if p.grad is not None]:
                part = _sq_norm(grads, device, dtype)
                part = part if g.weight == 1.0 else part * (g.weight * g.weight)
                sq = part if sq is None else sq + part
        if sq is None:
            return  # no gradient at all this micro-step
        f: "Tensor | float" = factor
        if weight_in_grad:  # the weight multiplied the loss: .grad = w * g
            f = f / weight
        if loss_scale is not None:
            f = f / loss_scale.to(device, dtype, non_blocking=True)
        if isinstance(f, Tensor):
            sq = sq * f.to(device, dtype, non_blocking=True).square()
        elif f != 1.0:
            sq = sq * (f * f)
        keep = 1.0 if found is None else (1.0 - found.to(device, dtype, non_blocking=True))
        w = scalar_tensor(weight, device, dtype)
        inv_w = torch.where(w > 0, keep / w.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(w))
        keep_t = keep if isinstance(keep, Tensor) else torch.ones((), device=device, dtype=dtype)
        keep_t = torch.where(w > 0, keep_t, torch.zeros_like(keep_t))
        self.small_sq = self.small_sq + torch.where(keep_t > 0, sq, torch.zeros_like(sq))
        self.small_n = self.small_n + keep_t
        self.small_inv_w = self.small_inv_w + inv_w

    def on_update(self, store: GradientStore, sync: GradSync, total: "float | Tensor", found: Tensor | None,
                  mean_factor: "float | Tensor" = 1.0) -> None:
        """Fold this window into the averages (after unscaling, before clipping). No sync.

        ``total``: the window's weight total (mean over ranks); ``mean_factor`` turns the applied
        gradient into the window's mean (``1 / total`` with ``reduction="sum"``).
        """
        try:
            device, dtype = store.device, store.float_dtype
            if sync.distributed:  # pool the ranks' small batches: one estimate on every rank
                self._pool(device, dtype, sync.group)
            n, inv_w = self.small_n, self.small_inv_w
            if not isinstance(n, Tensor) or not isinstance(inv_w, Tensor):
                return  # nothing measured in this window
            big_sq = _sq_norm(store.grads(), device, dtype)
            if isinstance(mean_factor, Tensor) or mean_factor != 1.0:
                big_sq = big_sq * scalar_tensor(mean_factor, device, dtype).square()
            world = sync.world_size if sync.distributed else 1
            b_big = scalar_tensor(total, device, dtype) * world
            small_sq = self.small_sq / n.clamp_min(1.0)
            b_small = n / inv_w.clamp_min(torch.finfo(dtype).tiny)
            ok = (n > 0) & (b_big > b_small * (1.0 + 1e-6))  # K=1 (B_small = B_big) carries no information
            safe_small = torch.where(ok, b_small, torch.ones_like(b_small))
            safe_big = torch.where(ok, b_big, torch.full_like(b_big, 2.0))
            trace, grad_sq = (torch.as_tensor(x) for x in simple_noise_scale_terms(small_sq, big_sq, safe_small,
                                                                                    safe_big))
            ok = ok & torch.isfinite(trace) & torch.isfinite(grad_sq)
            if found is not None:
                ok = ok & (found.to(device) == 0)
            if self.trace is None or self.grad_sq is None:
                self.trace, self.grad_sq = (torch.zeros((), device=device, dtype=dtype) for _ in range(2))
            b = self.beta  # each term is smoothed; the EMA's start-up bias cancels in their ratio
            self.trace = torch.where(ok, b * self.trace + (1.0 - b) * trace, self.trace)
            self.grad_sq = torch.where(ok, b * self.grad_sq + (1.0 - b) * grad_sq, self.grad_sq)
            self.valid = self.valid + ok.to(dtype)
            self.windows += 1
        finally:
            self.discard_window()

    def _pool(self, device: torch.device, dtype: torch.dtype, group: Any) -> None:
        """Sum the small-batch terms over the ranks (one ``all_reduce`` of 3 numbers, on every rank)."""
        flat = torch.stack([scalar_tensor(x, device, dtype) for x in (self.small_sq, self.small_n, self.small_inv_w)])
        torch.distributed.all_reduce(flat, group=group)
        self.small_sq, self.small_n, self.small_inv_w = flat[0], flat[1], flat[2]

    def value(self) -> Tensor | None:
        """The smoothed ``tr(Sigma) / |G|^2`` (0-dim device tensor; NaN until a usable window), or None."""
        return None if self.trace is None or self.grad_sq is None else self.trace / self.grad_sq

    def values(self) -> dict[str, Tensor | None]:
        """Device tensors for :meth:`~accumopt.AccumulatingOptimizer.stats`."""
        return {"noise_scale": self.value(), "noise_trace": self.trace, "noise_grad_sq": self.grad_sq,
                "noise_windows": self.valid if isinstance(self.valid, Tensor) else None}

    def state_dict(self) -> dict[str, Any]:
        return dict(clone_tree({k: getattr(self, k) for k in ("beta",) + _STATE_KEYS}))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors copied: the argument is not aliased)."""
        self.validate_state_dict(state)
        self.windows = int(state["windows"])
        for k in _STATE_KEYS[1:]:
            v = state[k]
            setattr(self, k, v.detach().clone() if isinstance(v, Tensor) else None if v is None else float(v))

    @staticmethod
    def validate_state_dict(state: Any, closed: int | None = None) -> None:
        """Raise ``ValueError`` unless ``state`` fits :meth:`state_dict` after ``closed`` windows (changes nothing)."""
        if not isinstance(state, Mapping) or any(k not in state for k in _STATE_KEYS):
            raise ValueError("Invalid state dict: the 'noise' entry is not a noise-scale estimator state")
        check_state_number("noise['windows']", state["windows"], integer=True, minimum=0)
        if closed is not None and state["windows"] > closed:
            raise ValueError(f"Invalid state dict: noise['windows'] is {state['windows']} after {closed} closed "
                             "windows (expected at most that many)")
        for k in _STATE_KEYS[1:]:
            v = state[k]
            if v is not None and not isinstance(v, (Tensor, float, int)) or isinstance(v, bool):
                raise ValueError(f"Invalid state dict: noise entry {k!r} is a {type(v).__name__} "
                                 "(expected a tensor or a number)")
            if v is None or k == "small_sq":  # a window that will be skipped may have measured inf
                continue
            if isinstance(v, Tensor) and (v.numel() != 1 or not v.is_floating_point()):
                raise ValueError(f"Invalid state dict: noise entry {k!r} is a tensor of shape {tuple(v.shape)} and "
                                 f"dtype {v.dtype} (expected a floating-point scalar)")
            x = host_float(v)
            signed = k in ("trace", "grad_sq")  # unbiased estimates: may be negative
            if not math.isfinite(x) or (not signed and x < 0):
                raise ValueError(f"Invalid state dict: noise entry {k!r} is {x!r} (expected a finite number"
                                 f"{'' if signed else ' >= 0'})")
            if k == "valid" and x > state["windows"]:
                raise ValueError(f"Invalid state dict: noise entry 'valid' is {x!r} with {state['windows']} windows "
                                 "(expected at most that many)")

    def __repr__(self) -> str:
        return f"NoiseScaleEstimator(beta={self.beta:g}, windows={self.windows})"


def as_estimator(value: Any) -> NoiseScaleEstimator | None:
    """The wrapper's ``noise_scale=`` argument as an estimator (False/None: off)."""
    if value is None or value is False:
        return None
    if value is True:
        return NoiseScaleEstimator()
    if isinstance(value, NoiseScaleEstimator):
        return value
    if isinstance(value, float) and not isinstance(value, bool) and math.isfinite(value):
        return NoiseScaleEstimator(beta=value)
    raise TypeError(f"Invalid noise_scale: {value!r} (expected True/False, an EMA beta in [0, 1), "
                    "or a NoiseScaleEstimator)")
