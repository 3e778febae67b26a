"""Gradient storage for one accumulation window (user guide: docs/core.md).

``"inplace"`` sums in ``.grad`` (bf16/fp16 parameters still get an ``accumulate_dtype`` buffer: bf16 sums lose bits);
``"buffered"`` keeps the window out of ``.grad``, so a failed or dropped micro-batch never touches it. Arithmetic
is ``torch._foreach_*`` over groups of (device, grad dtype, buffer dtype, weight).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, cast

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ._checks import check_choice
from .weights import WeightResolver

__all__ = ["GradientStore", "MODES"]

MODES = ("inplace", "buffered")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class _Group:
    params: list[Tensor]
    weight: float
    buffers: list[Tensor] | None  # None: the sum lives in .grad
    same_dtype: bool = True  # buffer dtype == param dtype
    _device_cache: tuple[Tensor, Tensor] | None = None  # (value, on this device): the latest one
    # Which buffers hold a gradient this window (one that got none keeps ``.grad = None``); host-side only.
    all_seen: bool = False
    seen: set[int] = field(default_factory=set)
    # Sparse gradients (``nn.Embedding(sparse=True)``) are summed as sparse: the optimizer gets a sparse one.
    sparse: dict[int, Tensor] = field(default_factory=dict)
    # Presence in maybe-dropped micro-batches (flag on the device): (micro-step, indices or None: all).
    seen_if_kept: list[tuple[int, list[int] | None]] = field(default_factory=list)
    # Where fresh gradients land during backward (CPU buffered groups; None: ``.grad`` is released).
    landing: "_Landing | None" = None
    # The window's last gradient was left in ``.grad`` (all parameters): :meth:`finalize` adds the sums into it.
    last_in_grad: bool = False
    # The buffers hold an earlier window, read as zeros: the first micro-step writes them (no zeroing pass).
    stale: bool = False
    # Parameters that had a dense gradient at an update so far (torch keeps their .grad, zeroed, under
    # ``zero_grad(set_to_none=False)``); ``had_grad_all``: every one of them.
    had_grad: set[int] = field(default_factory=set)
    had_grad_all: bool = False
    dtype: torch.dtype | None = None  # the parameters' dtype and device when planned (for layout_changed)
    device: torch.device | None = None

    def seen_indices(self) -> list[int] | None:
        """Indices of the buffers that (may have) received a dense gradient this window (None: all)."""
        if self.all_seen or any(idx is None for _, idx in self.seen_if_kept):
            return None
        return sorted(self.seen.union(*(idx for _, idx in self.seen_if_kept if idx is not None)))

    def mark(self, idx: list[int] | None) -> None:
        if idx is None:
            self.all_seen = True
        else:
            self.seen.update(idx)

    def clear(self) -> None:
        self.all_seen = self.last_in_grad = False
        self.seen.clear()
        self.sparse.clear()
        self.seen_if_kept.clear()

    def zero_buffers(self) -> None:
        """Make stale buffers hold the zeros they stand for."""
        if self.stale and self.buffers is not None:
            torch._foreach_zero_(self.buffers)
        self.stale = False

    def start(self, grads: list[Tensor], scale: "float | Tensor") -> None:
        """Write ``scale`` times the window's first gradients into the buffers (as adding into zeros, one pass less)."""
        self.stale = False
        bufs = cast(list[Tensor], self.buffers)
        torch._foreach_copy_(bufs, grads)
        _mul_(bufs, self.factor(scale, bufs[0].dtype))

    def factor(self, scale: "float | Tensor", dtype: torch.dtype) -> "float | Tensor":
        """``scale`` as a factor for this group's tensors of ``dtype``."""
        return self.to_device(scale).to(dtype) if isinstance(scale, Tensor) else float(scale)

    def to_device(self, value: Tensor) -> Tensor:
        """``value`` on this group's device (cached for the lifetime of ``value``)."""
        device = self.params[0].device
        if value.device == device:
            return value
        hit = self._device_cache
        if hit is None or hit[0] is not value:
            hit = self._device_cache = (value, value.to(device, non_blocking=True))
        return hit[1]


def _present(params: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[int] | None]:
    """The params with a gradient, their gradients, and their indices (None: all)."""
    grads = [p.grad for p in params]
    if all(g is not None for g in grads):
        return params, grads, None  # type: ignore[return-value]
    idx = [i for i, g in enumerate(grads) if g is not None]
    return [params[i] for i in idx], [grads[i] for i in idx], idx  # type: ignore[misc]


@dataclass(slots=True, eq=False)
class _LandingHook:
    """Post-accumulate-grad hook of one parameter: moves a fresh gradient into its kept tensor."""

    tensors: list[Tensor | None]  # never the store: a hook on a parameter must not keep the wrapper alive
    i: int

    def __call__(self, param: Tensor) -> None:
        grad, kept = param.grad, self.tensors[self.i]
        if grad is kept or grad is None or grad.requires_grad or grad.is_sparse:
            return  # added into in place (a second backward), or a gradient with a graph / sparse: left as is
        if kept is None or (kept.shape, kept.dtype, kept.device, kept.stride()) != (
                grad.shape, grad.dtype, grad.device, grad.stride()):
            kept = self.tensors[self.i] = torch.empty_like(grad, memory_format=torch.preserve_format)
        kept.copy_(grad)  # while the fresh gradient is still in cache; it is freed right after
        param.grad = kept


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class _Landing:
    """Tensors that receive a CPU buffered group's fresh gradients during the backward pass.

    On CPU, freeing every fresh gradient at ``step()`` hands that much back to the system, and the next backward pays
    page faults on each (a caching allocator does not): a hook per parameter copies the fresh gradient into a tensor
    kept from the last micro-step and points ``.grad`` at it, so the fresh one is freed at once, as in a plain loop.
    The hooks are removed with the store (or a new plan) and installed again in a copy.
    """

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.tensors: list[Tensor | None] = [None] * len(params)
        self.handles: list[RemovableHandle] = [
            p.register_post_accumulate_grad_hook(_LandingHook(self.tensors, i))  # type: ignore[no-untyped-call]
            for i, p in enumerate(params) if p.requires_grad]  # torch refuses hooks on frozen parameters
        self.remove = weakref.finalize(self, _remove, self.handles)  # also at collection: no hook outlives the store

    def __getstate__(self) -> dict[str, Any]:
        return {"params": self.params}  # hooks stay on the original parameters; kept tensors are not state

    def __setstate__(self, state: dict[str, Any]) -> None:
        _Landing.__init__(self, state["params"])


def _mul_(tensors: list[Tensor], factor: "float | Tensor") -> None:
    if tensors and (isinstance(factor, Tensor) or factor != 1.0):
        torch._foreach_mul_(tensors, factor)


class GradientStore:
    """Holds the running, weighted sum of a window's gradients (``weight_of``: per-parameter weights, 0 excludes)."""

    def __init__(self, param_groups: list[dict[str, Any]], *, mode: str = "inplace",
                 accumulate_dtype: torch.dtype = torch.float32, weight_of: WeightResolver) -> None:
        self.mode = check_choice("mode", mode, MODES)
        if not isinstance(accumulate_dtype, torch.dtype) or accumulate_dtype not in _FLOAT_DTYPES:
            raise TypeError(f"Invalid accumulate_dtype: {accumulate_dtype!r} (expected one of {_FLOAT_DTYPES})")
        self.accumulate_dtype = accumulate_dtype
        self._weight_of = weight_of
        self._param_groups = param_groups
        self.groups: list[_Group] = []
        self.excluded: list[Tensor] = []
        self._drops: list[Tensor] = []  # dropped flags (device) of this window's maybe-dropped micro-batches
        self.refresh()

    def check_new_group(self, param_group: Mapping[str, Any], param_groups: list[dict[str, Any]]) -> None:
        """Raise before ``add_param_group`` if ``param_group``'s ``accumulation_weight`` is invalid."""
        self._param_groups = param_groups
        self._weight_of.rebind(param_groups)
        self._weight_of.check_new_group(param_group)

    def refresh(self, param_groups: list[dict[str, Any]] | None = None) -> None:
        """Take in new parameters (``param_groups``: the current list, which torch's load_state_dict replaces)."""
        if param_groups is not None:
            self._param_groups = param_groups
        keyed: dict[tuple[torch.device, torch.dtype, torch.dtype | None, float], list[Tensor]] = {}
        # Known parameters are recomputed (not remembered by id): ids change across deepcopy/pickle.
        known = {id(p) for p in self.params} | {id(p) for p in self.excluded}
        for gi, group in enumerate(self._param_groups):
            for p in group["params"]:
                if id(p) in known:
                    continue
                known.add(id(p))
                weight = float(self._weight_of(gi, p))
                if weight == 0.0:
                    self.excluded.append(p)
                    continue
                buf_dtype = self.accumulate_dtype if p.dtype in _LOW_PRECISION else p.dtype
                buffered = self.mode == "buffered" or buf_dtype != p.dtype
                key = (p.device, p.dtype, buf_dtype if buffered else None, weight)
                keyed.setdefault(key, []).append(p)
        for (device, dtype, buf_dtype, weight), params in keyed.items():
            buffers = None if buf_dtype is None else [
                torch.zeros_like(p, dtype=buf_dtype, memory_format=torch.preserve_format) for p in params]
            landing = _Landing(params) if buffers is not None and device.type == "cpu" else None
            self.groups.append(_Group(params, weight, buffers, same_dtype=buf_dtype in (None, dtype),
                                      landing=landing, dtype=dtype, device=device))

    def layout_changed(self) -> bool:
        """Whether a parameter's dtype or device changed since it was planned (``model.to(...)``); no device access."""
        # A device move (model.to(device)) moves every parameter: the first one tells.
        return any(g.params[0].device != g.device or any(p.dtype is not g.dtype for p in g.params) for g in self.groups)

    def replan(self) -> None:
        """Plan the storage again for the parameters' current dtypes and devices (no window pending: sums dropped)."""
        for g in self.groups:
            if g.landing is not None:
                g.landing.remove()
        self.groups, self.excluded = [], []
        self._drops.clear()
        self.refresh()

    @property
    def params(self) -> Iterator[Tensor]:
        for g in self.groups:
            yield from g.params

    @property
    def device(self) -> torch.device:
        """The device of the first accumulated parameter."""
        return self.groups[0].params[0].device

    @property
    def float_dtype(self) -> torch.dtype:
        """float64 if the first accumulated parameter is double precision, else float32."""
        return torch.float64 if self.groups[0].params[0].dtype in (torch.float64, torch.complex128) else torch.float32

    def buffer_bytes(self) -> int:
        """Bytes held by accumulation buffers (0 in pure in-place mode)."""
        return sum(b.numel() * b.element_size() for g in self.groups if g.buffers for b in g.buffers)

    def micro_grads(self) -> list[list[Tensor]]:
        """Fresh gradients of this micro-batch that will move into buffers."""
        return [_present(g.params)[1] for g in self.groups if g.buffers is not None]

    def accumulate(self, scale: "float | Tensor", dropped: Tensor | None = None, *, closing: bool = False) -> None:
        """Add this micro-batch (times ``scale``: 1 for in-place groups) into the window, out of ``.grad``.

        ``dropped``: its device flag (> 0: dropped) if it may be dropped; ``closing``: the window closes right after.
        """
        for p in self.excluded:
            p.grad = None
        step = None if dropped is None else len(self._drops)  # settled by resolve()
        if dropped is not None:
            self._drops.append(dropped)
        for g in self.groups:
            if g.buffers is None:
                continue
            params, grads, idx = _present(g.params)
            if any(t.is_sparse for t in grads):  # rare: nn.Embedding(sparse=True); leaves idx a list
                idx, grads = self._accumulate_sparse(g, idx, grads, scale)
            if idx is not None or step is not None:  # idx == []: no gradient at all
                # Only a micro-step giving every parameter a dense, surely kept gradient writes stale buffers
                # whole (start); otherwise they become the zeros they stand for (a cross-rank reduction reads all).
                g.zero_buffers()
            if not params:
                continue
            if step is None:
                g.mark(idx)
            else:
                g.seen_if_kept.append((step, idx))
            if closing and step is None and idx is None and g.same_dtype and (isinstance(scale, Tensor) or scale == 1):
                # The window closes now: its last gradient stays in .grad, where finalize adds the sums
                # (the same sum, without a buffer pass or freeing .grad just before the optimizer step).
                _mul_(grads, g.factor(scale, grads[0].dtype))
                g.last_in_grad = True
                continue
            bufs = g.buffers if idx is None else [g.buffers[i] for i in idx]
            if not grads:
                pass  # only sparse gradients
            elif g.stale:  # the window's first gradients: they become the sums
                g.start(grads, scale)
            elif isinstance(scale, Tensor) and g.same_dtype:
                torch._foreach_mul_(grads, g.factor(scale, grads[0].dtype))
                torch._foreach_add_(bufs, grads)
            elif isinstance(scale, Tensor):  # bf16/fp16 grads: multiply in the buffer's precision, not in theirs
                s = cast(Tensor, g.factor(scale, bufs[0].dtype))
                torch._foreach_addcmul_(bufs, grads, [s.expand_as(x) for x in grads])
            else:
                torch._foreach_add_(bufs, grads, alpha=float(scale))
            for p in params:
                p.grad = None

    @staticmethod
    def _accumulate_sparse(g: _Group, idx: list[int] | None, grads: list[Tensor],
                           scale: "float | Tensor") -> tuple[list[int], list[Tensor]]:
        """Sum the sparse gradients of ``grads`` into ``g.sparse``; return the dense rest."""
        positions = range(len(g.params)) if idx is None else idx
        buffers = cast(list[Tensor], g.buffers)  # only buffered groups hold sparse sums
        for i, t in zip(positions, grads):
            if t.is_sparse:
                t = t.to(buffers[i].dtype) * (g.to_device(scale) if isinstance(scale, Tensor) else scale)
                g.sparse[i] = t if i not in g.sparse else g.sparse[i] + t
        dense = [(i, t) for i, t in zip(positions, grads) if not t.is_sparse]
        return [i for i, _ in dense], [t for _, t in dense]

    def mark_seen(self) -> None:
        """Count every buffer as holding a gradient (after a cross-rank reduction filled them all)."""
        for g in self.groups:
            g.all_seen = True
            g.seen_if_kept.clear()
        self._drops.clear()

    def pending_drops(self) -> Tensor | None:
        """Dropped flags (device, one per maybe-dropped micro-batch) that :meth:`resolve` needs, or None."""
        if not any(g.seen_if_kept for g in self.groups):
            return None
        return torch.stack([d.to(self._drops[0].device, torch.float32) for d in self._drops])

    def drop_resolver(self) -> "tuple[Tensor, Callable[[list[bool]], None]] | None":
        """For the boundary: the pending dropped flags and what to do with their host values, or None."""
        drops = self.pending_drops()
        return None if drops is None else (drops, lambda kept: self.resolve(kept, release=True))

    def resolve(self, kept: list[bool], *, release: bool) -> None:
        """Settle which parameters got a gradient from a kept micro-batch (``release``: free the rest's ``.grad``)."""
        for g in self.groups:
            if not g.seen_if_kept:
                continue
            before = g.seen_indices()
            for step, idx in g.seen_if_kept:
                if kept[step]:
                    g.mark(idx)
            g.seen_if_kept.clear()
            if release and (after := g.seen_indices()) is not None:  # None: every one has a gradient
                for i in set(range(len(g.params)) if before is None else before).difference(after):
                    g.params[i].grad = None
        self._drops.clear()

    def has_inplace(self) -> bool:
        """Whether any parameter accumulates in its own ``.grad``."""
        return any(g.buffers is None for g in self.groups)

    def finalize(self, inv_total: "float | Tensor") -> None:
        """Put ``weight * sum / total`` into every ``.grad``, ready for ``optimizer.step``."""
        for g in self.groups:
            factor = inv_total * g.weight if g.weight != 1.0 else inv_total
            if isinstance(factor, Tensor):
                factor = g.to_device(factor)
            if g.buffers is None:
                _mul_(_present(g.params)[1], factor)
                continue
            idx = g.seen_indices()
            params = g.params if idx is None else [g.params[i] for i in idx]
            bufs = g.buffers if idx is None else [g.buffers[i] for i in idx]
            if not params and not g.sparse:
                continue  # no gradient this window: .grad stays None, as without accumulation
            scaled: Sequence[Tensor] = bufs
            if params and g.last_in_grad:
                scaled = [p.grad for p in params if p.grad is not None]
                if not g.stale:  # stale: the window's only micro-batch is in .grad
                    torch._foreach_add_(scaled, bufs)
                _mul_(scaled, factor)
            elif g.same_dtype:
                _mul_(bufs, factor)
            elif params and (isinstance(factor, Tensor) or factor != 1.0):
                scaled = torch._foreach_mul(bufs, factor)
            for p, s in zip(params, scaled):
                p.grad = s if s.dtype == p.dtype else s.to(p.dtype)
            for i, sp in g.sparse.items():
                total = sp * factor
                dense = g.params[i].grad
                if dense is not None and (g.all_seen or i in g.seen):  # dense and sparse: a dense sum
                    total = dense.to(total.dtype) + total
                g.params[i].grad = total.to(g.params[i].dtype)

    def grads(self) -> list[Tensor]:
        """The ``.grad`` of every accumulated parameter that has one."""
        return [p.grad for p in self.params if p.grad is not None]

    def reset(self) -> None:
        """Empty the window: release ``.grad`` (remembering which had a dense one); the buffers become ``stale``."""
        for g in self.groups:
            if not g.had_grad_all:  # maybe-dropped ones too: their backward allocated a .grad, in torch
                seen = g.seen_indices() if g.buffers is not None else [
                    i for i, p in enumerate(g.params) if p.grad is not None and not p.grad.is_sparse]
                g.had_grad.update(range(len(g.params)) if seen is None else seen)
                g.had_grad_all = len(g.had_grad) == len(g.params)
            if g.buffers is not None:
                g.stale = True
                g.clear()
        for p in (*self.params, *self.excluded):
            p.grad = None
        self._drops.clear()

    def clear_micro_grads(self, set_to_none: bool) -> None:
        """``zero_grad`` within a pending window: clear buffered ``.grad`` and excluded parameters as torch does."""
        params = [p for p in (*self._buffered_params(), *self.excluded) if p.grad is not None]
        stale = [cast(Tensor, p.grad) for p in params]
        for p, t in zip(params, stale):
            if set_to_none:
                p.grad = None
            elif t.grad_fn is not None:
                t.detach_()
            else:
                t.requires_grad_(False)
        if stale and not set_to_none:
            torch._foreach_zero_(stale)

    def zero_grads(self, set_to_none: bool) -> None:
        """Follow ``zero_grad(set_to_none)`` as torch does for parameters outside the pending sums.

        ``False``: one that had a gradient at an earlier update gets a zero one again (the optimizer steps it).
        """
        for g in self.groups:
            if set_to_none:
                g.had_grad.clear()
                g.had_grad_all = False
                continue
            idx = range(len(g.params)) if g.had_grad_all else g.had_grad
            if g.buffers is not None:
                g.zero_buffers()
                g.mark(None if g.had_grad_all else list(idx))
            else:
                for p in [g.params[i] for i in idx if g.params[i].grad is None]:
                    p.grad = torch.zeros_like(p, memory_format=torch.preserve_format)

    def state_dict(self) -> list[Tensor | None]:
        """The window's pending sums, one entry per accumulated parameter (None: no gradient), cloned."""
        drops = self.pending_drops()
        if drops is not None:  # a checkpoint may read the device: settle what the drops left
            self.resolve([d == 0 for d in drops.tolist()], release=False)
        sums = {id(p): t for p, t in self.pending_sums()}
        return [None if id(p) not in sums else sums[id(p)].clone() for p in self.params]

    def has_fresh_grads(self) -> bool:
        """Whether a backward pass since the last ``step()`` left a ``.grad`` that :meth:`state_dict` cannot hold."""
        return any(p.grad is not None for p in self._buffered_params())

    def _buffered_params(self) -> Iterator[Tensor]:
        for g in self.groups:
            if g.buffers is not None:
                yield from g.params

    def pending_sums(self) -> list[tuple[Tensor, Tensor]]:
        """``(param, sum)`` for every parameter holding a pending sum: read-only views (no copy, no sync).

        Sparse plus dense gets a new tensor; maybe-dropped micro-batches are included (a dropped one added zeros).
        """
        out: list[tuple[Tensor, Tensor]] = []
        for g in self.groups:
            if g.buffers is None:
                out.extend((p, p.grad.detach()) for p in g.params if p.grad is not None)
                continue
            if g.stale:
                continue  # no micro-batch in this window yet
            idx = g.seen_indices()
            seen = set(range(len(g.params))) if idx is None else set(idx)
            for i, (p, b) in enumerate(zip(g.params, g.buffers)):
                sparse = g.sparse.get(i)
                if sparse is not None:
                    sparse = sparse.detach().coalesce()
                    out.append((p, b.detach() + sparse if i in seen else sparse))
                elif i in seen:
                    out.append((p, b.detach()))
        return out

    def validate_state_dict(self, sums: Any) -> None:
        """Raise ``ValueError`` unless ``sums`` fits this store (one entry per parameter, shapes, dtypes)."""
        expected = [(tuple(t.shape), t.dtype) for g in self.groups for t in (g.buffers or g.params)]
        if not isinstance(sums, list):
            raise ValueError(f"Invalid state dict: accumulation sums are a {type(sums).__name__} (expected a list)")
        if len(sums) != len(expected):
            raise ValueError(f"Invalid state dict: {len(sums)} accumulation sums (expected {len(expected)})")
        for i, (t, (shape, dtype)) in enumerate(zip(sums, expected)):
            if t is not None and not isinstance(t, Tensor):
                raise ValueError(f"Invalid state dict: accumulation sum {i} is a {type(t).__name__} "
                                 "(expected a tensor)")
            if isinstance(t, Tensor) and (tuple(t.shape) != shape or t.dtype != dtype):
                raise ValueError(f"Invalid state dict: accumulation sum {i} has shape {tuple(t.shape)} and dtype "
                                 f"{t.dtype} (expected {shape} and {dtype})")

    def load_state_dict(self, sums: list[Tensor | None]) -> None:
        """Restore :meth:`state_dict` (copied: the argument is not aliased)."""
        self.validate_state_dict(sums)
        it = iter(sums)
        self._drops.clear()
        for g in self.groups:
            if g.buffers is None:
                for p, e in zip(g.params, it):
                    p.grad = None if e is None else e.detach().to(p.device, p.dtype, copy=True)
            else:
                g.clear()
                g.stale = False
                for i, (p, b, e) in enumerate(zip(g.params, g.buffers, it)):
                    b.zero_()
                    if e is not None and e.is_sparse:
                        g.sparse[i] = e.detach().to(b.device, b.dtype).clone()
                    elif e is not None:
                        b.copy_(e)
                        g.seen.add(i)
                    p.grad = None
