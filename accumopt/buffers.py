"""Gradient storage for one accumulation window.

Two modes, chosen per wrapper:

* ``"inplace"`` (default): the window's sum lives in ``param.grad`` itself, where
  autograd adds each micro-batch's gradient. No memory beyond what a hand-written
  loop uses. Parameters whose dtype is below ``accumulate_dtype`` (bf16/fp16
  parameters) still get an fp32 buffer, because summing in bf16 loses bits.
* ``"buffered"``: every parameter has a buffer, allocated once. At each micro-step
  the fresh ``.grad`` is added into it (scaled by the micro-batch weight) and
  released, so a micro-batch that fails half-way never touches the window, a bad
  micro-batch can be dropped, and weights may be given after the backward pass.

All arithmetic is ``torch._foreach_*`` over parameters grouped once by
(device, gradient dtype, buffer dtype, parameter weight).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["GradientStore", "MODES"]

MODES = ("inplace", "buffered")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
Scale = "float | Tensor"


@dataclass
class _Group:
    params: list[Tensor]
    weight: float
    buffers: list[Tensor] | None  # None: the sum lives in .grad
    same_dtype: bool = True  # buffer dtype == param dtype
    _device_cache: dict = field(default_factory=dict)

    def to_device(self, value: Tensor) -> Tensor:
        """``value`` on this group's device (cached for the lifetime of ``value``)."""
        device = self.params[0].device
        if value.device == device:
            return value
        key = id(value)
        hit = self._device_cache.get(key)
        if hit is None or hit[0] is not value:
            hit = (value, value.to(device, non_blocking=True))
            self._device_cache.clear()
            self._device_cache[key] = hit
        return hit[1]


def _present(params: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[int] | None]:
    """The params with a gradient, their gradients, and their indices (None: all)."""
    grads = [p.grad for p in params]
    if all(g is not None for g in grads):
        return params, grads, None  # type: ignore[return-value]
    idx = [i for i, g in enumerate(grads) if g is not None]
    return [params[i] for i in idx], [grads[i] for i in idx], idx  # type: ignore[misc]


def _mul_(tensors: list[Tensor], factor: "float | Tensor") -> None:
    if isinstance(factor, Tensor):
        torch._foreach_mul_(tensors, factor)
    elif factor != 1.0:
        torch._foreach_mul_(tensors, factor)


class GradientStore:
    """Holds the running, weighted sum of a window's gradients.

    Args:
        param_groups: the wrapped optimizer's ``param_groups`` (read, never copied).
        mode: ``"inplace"`` or ``"buffered"``.
        accumulate_dtype: dtype of the sum for low-precision parameters.
        weight_of: ``(group_index, param) -> float`` accumulation weight; 0 excludes.
    """

    def __init__(
        self,
        param_groups: list[dict],
        *,
        mode: str,
        accumulate_dtype: torch.dtype,
        weight_of: Callable[[int, Tensor], float],
    ) -> None:
        self.mode = mode
        self.accumulate_dtype = accumulate_dtype
        self._weight_of = weight_of
        self._param_groups = param_groups
        self.groups: list[_Group] = []
        self.excluded: list[Tensor] = []
        self._known: set[int] = set()
        self.refresh()

    # ------------------------------------------------------------------ layout
    def refresh(self) -> None:
        """Take in parameters added to the optimizer since the last call."""
        keyed: dict[tuple, list[Tensor]] = {}
        for gi, group in enumerate(self._param_groups):
            for p in group["params"]:
                if id(p) in self._known:
                    continue
                self._known.add(id(p))
                weight = float(self._weight_of(gi, p))
                if weight == 0.0:
                    self.excluded.append(p)
                    continue
                buffered = self.mode == "buffered" or (
                    p.dtype in _LOW_PRECISION and self.accumulate_dtype != p.dtype
                )
                buf_dtype = self.accumulate_dtype if p.dtype in _LOW_PRECISION else p.dtype
                key = (p.device, p.dtype, buf_dtype if buffered else None, weight)
                keyed.setdefault(key, []).append(p)
        for (_, dtype, buf_dtype, weight), params in keyed.items():
            buffers = None
            if buf_dtype is not None:
                buffers = [torch.zeros_like(p, dtype=buf_dtype, memory_format=torch.preserve_format) for p in params]
            self.groups.append(_Group(params, weight, buffers, same_dtype=buf_dtype in (None, dtype)))

    @property
    def params(self) -> Iterable[Tensor]:
        for g in self.groups:
            yield from g.params

    def buffer_bytes(self) -> int:
        """Bytes held by accumulation buffers (0 in pure in-place mode)."""
        return sum(b.numel() * b.element_size() for g in self.groups if g.buffers for b in g.buffers)

    # --------------------------------------------------------------- micro-step
    def micro_grads(self) -> list[list[Tensor]]:
        """Fresh gradients of this micro-batch that will move into buffers."""
        return [_present(g.params)[1] for g in self.groups if g.buffers is not None]

    def accumulate(self, scale: "float | Tensor") -> None:
        """Add this micro-batch (times ``scale``) into the window and release ``.grad``.

        ``scale`` is the micro-batch weight, possibly times an inverse loss scale.
        In-place groups cannot rescale one micro-batch after backward, so they
        require ``scale == 1`` (weights are then applied to the loss instead).
        """
        for p in self.excluded:
            p.grad = None
        for g in self.groups:
            if g.buffers is None:
                continue
            params, grads, idx = _present(g.params)
            if not grads:
                continue
            bufs = g.buffers if idx is None else [g.buffers[i] for i in idx]
            if isinstance(scale, Tensor):
                torch._foreach_mul_(grads, g.to_device(scale))
                torch._foreach_add_(bufs, grads)
            elif scale == 1.0:
                torch._foreach_add_(bufs, grads)
            else:
                torch._foreach_add_(bufs, grads, alpha=scale)
            for p in params:
                p.grad = None

    def has_inplace(self) -> bool:
        """Whether any parameter accumulates in its own ``.grad``."""
        return any(g.buffers is None for g in self.groups)

    # ----------------------------------------------------------------- boundary
    def finalize(self, inv_total: "float | Tensor") -> None:
        """Put ``weight * sum / total`` into every ``.grad``, ready for ``optimizer.step``."""
        for g in self.groups:
            factor = inv_total * g.weight if g.weight != 1.0 else inv_total
            if isinstance(factor, Tensor):
                factor = g.to_device(factor)
            if g.buffers is None:
                _, grads, _ = _present(g.params)
                if grads:
                    _mul_(grads, factor)
            elif g.same_dtype:
                _mul_(g.buffers, factor)
                for p, b in zip(g.params, g.buffers):
                    p.grad = b
            else:
                scaled = torch._foreach_mul(g.buffers, factor) if isinstance(factor, Tensor) or factor != 1.0 else g.buffers
                for p, s in zip(g.params, scaled):
                    p.grad = s.to(p.dtype)

    def grads(self) -> list[Tensor]:
        """The ``.grad`` of every accumulated parameter that has one."""
        return [p.grad for p in self.params if p.grad is not None]

    def reset(self) -> None:
        """Empty the window: zero the buffers and release ``.grad``."""
        for g in self.groups:
            if g.buffers is not None:
                torch._foreach_zero_(g.buffers)
            for p in g.params:
                p.grad = None
        for p in self.excluded:
            p.grad = None

    # -------------------------------------------------------------------- state
    def state(self) -> list[Tensor | None]:
        """The window's pending sums, one entry per accumulated parameter, cloned."""
        out: list[Tensor | None] = []
        for g in self.groups:
            if g.buffers is None:
                out.extend(None if p.grad is None else p.grad.detach().clone() for p in g.params)
            else:
                out.extend(b.detach().clone() for b in g.buffers)
        return out

    def expected(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of each entry of :meth:`state` (buffers or grads)."""
        out = []
        for g in self.groups:
            if g.buffers is None:
                out.extend((tuple(p.shape), p.dtype) for p in g.params)
            else:
                out.extend((tuple(b.shape), b.dtype) for b in g.buffers)
        return out

    def load(self, entries: list[Tensor | None]) -> None:
        """Restore :meth:`state` (already validated against :meth:`expected`)."""
        it = iter(entries)
        for g in self.groups:
            if g.buffers is None:
                for p in g.params:
                    e = next(it)
                    p.grad = None if e is None else e.detach().to(p.device, p.dtype).clone()
            else:
                for p, b in zip(g.params, g.buffers):
                    e = next(it)
                    if e is None:
                        b.zero_()
                    else:
                        b.copy_(e)
                    p.grad = None
