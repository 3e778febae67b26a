"""Loss scaling and the non-finite guard (user guide and policy table: docs/precision.md).

Decides what the gradient is scaled by and whether the update is applied, for an owned ``GradScaler``, an external
one driving ``scaler.step(opt)`` (device tensors handed over; an overflowing micro-batch is dropped, as GradScaler
skips that step) and the ``nonfinite`` policy. The host reads one flag per update, within the update's HostRead.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ._checks import check_choice, host_float, weight_dtype
from .amp import LossScaler
from .hostread import HostRead

__all__ = ["NONFINITE_POLICIES", "NonFiniteGradientError", "NonFiniteGuard", "found_nonfinite"]

NONFINITE_POLICIES = ("ignore", "skip", "drop", "raise")
_CHECKABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``nonfinite="raise"`` when an accumulated gradient is NaN or inf."""


def found_nonfinite(tensors: Sequence[Tensor]) -> Tensor | None:
    """A 0-dim float32 flag, 1.0 where any of ``tensors`` holds NaN/inf (None if empty); fused, no host sync."""
    by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for t in tensors:
        t = t.detach()
        if t.is_sparse:
            t = t.coalesce()._values()
        if t.is_complex():
            t = torch.view_as_real(t)
        by_key[(t.device, t.dtype)].append(t)
    if not by_key:
        return None
    flags: dict[torch.device, Tensor] = {}
    for (device, dtype), ts in by_key.items():
        if device not in flags:
            flags[device] = torch.zeros((), device=device, dtype=torch.float32)
        found = flags[device]
        if device.type in ("cuda", "cpu") and dtype in _CHECKABLE:
            # Multiplies by 1.0 in place (exact) and sets `found` where a value is NaN/inf.
            one = torch.ones((), device=device, dtype=torch.float32)
            torch._amp_foreach_non_finite_check_and_unscale_(ts, found, one)
        else:  # pragma: no cover - exotic devices or dtypes
            bad = torch.stack([(~torch.isfinite(t)).any() for t in ts]).any().float()
            found.copy_(torch.maximum(found, bad))
    return functools.reduce(lambda total, f: torch.maximum(total, f.to(total.device)), flags.values())


class NonFiniteGuard:
    """Loss scale (owned ``GradScaler``; a disabled one means none) and non-finite policy of one wrapper."""

    def __init__(self, *, scaler: "torch.amp.GradScaler | None" = None, policy: str = "ignore") -> None:
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"Invalid scaler: {type(scaler).__name__} (expected a torch.amp.GradScaler)")
        self.policy = check_choice("nonfinite", policy, NONFINITE_POLICIES)
        # A disabled scaler means no loss scaling (``GradScaler(enabled=use_amp)``). torch has already warned
        # if it disabled one itself (device "cuda" without CUDA): the two cannot be told apart.
        self.scaler = LossScaler(scaler) if scaler is not None and scaler.is_enabled() else None
        self._dropped: Tensor | None = None  # owned scaler + "drop": a micro-batch overflowed this window
        self._empty: Tensor | None = None  # every micro-batch of the window was dropped
        self._scaler_found: Tensor | None = None  # the owned scaler's own found_inf tensor of this update
        self._external_seen = False  # an external GradScaler has driven this wrapper (it drops micro-batches)
        self._drops: "tuple[Tensor, Callable[[list[bool]], None]] | None" = None  # requested, decided in apply

    @property
    def may_drop(self) -> bool:
        """Whether micro-batches may be dropped (weight 0 on the device) in this run."""
        return self.policy == "drop" or (self._external_seen and self.policy == "ignore")

    def loss_scale(self) -> Tensor | None:
        """The owned scaler's current scale (device tensor), or None."""
        return None if self.scaler is None else self.scaler.scale_tensor()

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss`` multiplied by the owned scaler's scale (identity without one)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def micro_factor(self, found_inf: Tensor | None, grad_scale: Tensor | None,
                     micro_grads: Callable[[], list[list[Tensor]]]) -> "tuple[float | Tensor, Tensor | None]":
        """Factor ``keep / external_scale`` by which this micro-batch enters the window, and its dropped flag (no sync).

        ``found_inf``/``grad_scale``: what an external ``scaler.step(opt)`` handed over (None otherwise).
        """
        if found_inf is not None and self.scaler is not None:
            raise RuntimeError("The wrapper owns a GradScaler (scaler=...), so call opt.step() directly, "
                               "not scaler.step(opt): the owned scaler unscales once per real update.")
        if found_inf is None and self.policy != "drop":
            return 1.0, None
        inv_scale = None if grad_scale is None else grad_scale.detach().double().reciprocal().float()
        self._external_seen = self._external_seen or found_inf is not None
        # "skip"/"raise": an external overflow stays in the sum, so the boundary check skips (or raises for) the window
        if found_inf is not None and self.policy in ("skip", "raise"):
            return (1.0 if inv_scale is None else inv_scale), None
        grads = [g for gs in micro_grads() for g in gs]
        # found_inf > 0: GradScaler sums it over devices (it may exceed 1)
        found = found_nonfinite(grads) if found_inf is None else found_inf.detach() > 0
        if found is None:
            return 1.0, None
        # float64: the flag also scales the window's weight total, whose reciprocal must stay exact
        found = found.to(weight_dtype(found.device))
        bad = found > 0
        for g in grads:  # zeroed in place, so NaN/inf never reach the buffers; one fill per tensor, no sync
            (g._values() if g.is_sparse else g).masked_fill_(bad.to(g.device), 0.0)
        keep = 1.0 - found
        if inv_scale is not None:
            keep = keep * inv_scale.to(keep.device, keep.dtype)
        if self.scaler is not None:  # owned scaler + "drop": the scale must still back off
            self._dropped = found if self._dropped is None else torch.maximum(self._dropped, found)
        return keep, found

    def unscale_and_check(self, inner: torch.optim.Optimizer, grads: Callable[[], list[Tensor]],
                          total: "float | Tensor | None" = None) -> Tensor | None:
        """Unscale the final gradient (owned scaler) and return its non-finite flag (device tensor or None).

        ``total``: the window's summed weight; a device total of 0 (all dropped) makes :meth:`apply` skip it.
        """
        # Only where micro-batches can be dropped (weight 0) may the total be 0 without the user's doing:
        # tensor weights given by the user cost no sync here.
        self._empty = (total <= 0).float() if self.may_drop and isinstance(total, Tensor) else None
        if self.scaler is not None:
            per_device = self.scaler.unscale_(inner)
            if not per_device:  # no gradient at all
                return None
            first, *rest = per_device.values()
            self._scaler_found = first
            return sum((f.to(first.device) for f in rest), first.clone())
        if self.policy in ("skip", "raise", "drop"):
            return found_nonfinite(grads())
        return None

    def request(self, read: HostRead, found: Tensor | None,
                drops: "tuple[Tensor, Callable[[list[bool]], None]] | None" = None) -> None:
        """Ask ``read`` for what the host needs to decide this update (nothing when it needs nothing); no sync.

        The found-inf flag, the every-micro-batch-dropped flag, and the flags of ``drops`` (their host values go
        to its callback).
        """
        self._drops = drops
        for key, value in (("nonfinite", found), ("empty_window", self._empty),
                           ("drops", None if drops is None else drops[0])):
            if value is not None:
                read.add(key, value)

    def apply(self, inner: torch.optim.Optimizer, read: HostRead, describe_bad: Callable[[], str]) -> bool:
        """Step ``inner`` unless :meth:`request`'s host values skip the window; return whether it stepped."""
        drops, self._drops = self._drops, None
        try:
            if drops is not None:
                drops[1]([d == 0 for d in read.get("drops")])
            nonfinite = (read.scalar("nonfinite") or 0.0) > 0  # GradScaler sums found-inf over devices
            if nonfinite and self.policy == "raise":
                raise NonFiniteGradientError(f"Non-finite accumulated gradient in {describe_bad()}; the window was "
                                             "discarded and the parameters were not updated (nonfinite='raise').")
            if nonfinite or (read.scalar("empty_window") or 0.0) > 0:
                return False
            inner.step()
            return True
        finally:  # an owned scaler updates exactly once, whether the window is applied, skipped or raises
            self._end_window()

    def _end_window(self) -> None:
        if self.scaler is not None and self._scaler_found is not None:
            if self._dropped is not None:  # a dropped micro-batch overflowed: back off as for a skipped step
                self._scaler_found.add_(self._dropped.to(self._scaler_found.device))
            self.scaler.update()
        self.discard_window()  # no gradient at all: nothing to update, but an unscale_ may have been recorded

    def discard_window(self) -> None:
        """Forget the discarded window's flags, and the owned scaler's unscale of it (the scale stays as it was)."""
        if self.scaler is not None:
            self.scaler.forget_unscale()
        self._dropped = self._empty = self._scaler_found = self._drops = None

    def state_dict(self) -> dict[str, Any]:
        """The window's dropped-overflow flag (the scaler's own state is the ``"scaler"`` entry)."""
        return {"dropped": None if self._dropped is None else self._dropped.detach().clone()}

    @staticmethod
    def validate_state_dict(state: Any) -> None:
        """Raise ``ValueError`` unless ``state`` looks like :meth:`state_dict`."""
        dropped = state.get("dropped") if isinstance(state, Mapping) else None
        if not isinstance(state, Mapping) or not (dropped is None or isinstance(dropped, Tensor)):
            raise ValueError("Invalid state dict: malformed 'precision' entry")
        if dropped is not None:
            if dropped.numel() != 1 or not dropped.is_floating_point():
                raise ValueError(f"Invalid state dict: precision['dropped'] is a tensor of shape "
                                 f"{tuple(dropped.shape)} and dtype {dropped.dtype} (expected a float scalar)")
            value = host_float(dropped)  # load time: a read is fine
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Invalid state dict: precision['dropped'] is {value!r} (expected a flag in [0, 1])")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.validate_state_dict(state)
        dropped = state.get("dropped")
        self._dropped = None if dropped is None else dropped.detach().clone()
