"""Loss scaling and the non-finite guard.

One object decides, for each micro-step and each real update, what the
accumulated gradient is scaled by and whether the update is applied:

* an *owned* ``GradScaler`` (``scaler=``): the scale is constant within a window;
  at the boundary: unscale, (clip), one host read of the overflow flag, the inner
  step (or not), ``scaler.update()`` exactly once.
* an *external* ``GradScaler`` driving the wrapper (``scaler.step(opt)`` on every
  micro-batch): the wrapper declares ``_step_supports_amp_scaling``, so GradScaler
  hands over ``grad_scale`` and ``found_inf`` as device tensors and never syncs;
  each micro-batch is unscaled by its own scale into the buffers and an
  overflowing one is dropped (weight 0), as GradScaler skips that step.
* the ``nonfinite`` policy: ``"ignore"``, ``"skip"`` (whole window), ``"drop"``
  (only the bad micro-batch, buffered mode) or ``"raise"``.

Checks are fused per device and dtype with
``torch._amp_foreach_non_finite_check_and_unscale_`` (the kernel GradScaler
uses); the host reads one flag per real update, and only when a scaler or a
policy needs the host to decide. See ``docs/precision.md`` for the table.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import torch
from torch import Tensor

from ._checks import weight_dtype

__all__ = ["NONFINITE_POLICIES", "NonFiniteGradientError", "Precision", "found_nonfinite"]

NONFINITE_POLICIES = ("ignore", "skip", "drop", "raise")
_CHECKABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def host_read(t: Tensor) -> list[float]:
    """The values of ``t`` on the host: the one device-to-host read of a real update."""
    return t.cpu().tolist()


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``nonfinite="raise"`` when an accumulated gradient is NaN or inf."""


def found_nonfinite(tensors: Sequence[Tensor]) -> Tensor | None:
    """A 0-dim float32 tensor, 1.0 where any of ``tensors`` holds NaN/inf, else 0.0.

    One fused check per device and dtype, no host synchronisation. Returns None
    for an empty sequence.
    """
    by_key: dict[tuple, list[Tensor]] = defaultdict(list)
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
    total: Tensor | None = None
    for f in flags.values():
        total = f if total is None else torch.maximum(total, f.to(total.device))
    return total


def _owned_unscale(scaler: "torch.amp.GradScaler", inner: torch.optim.Optimizer) -> dict:
    """``scaler.unscale_(inner)``, also for fp16 gradients (fp16 parameters summed in fp32).

    GradScaler refuses fp16 gradients because unscaling fp16 may underflow; here
    they are the single cast of an fp32 sum whose unscale by a power of two is
    as exact as the cast itself, so the refusal does not apply.
    """
    params = [p for g in inner.param_groups for p in g["params"]]
    has_fp16 = any(p.grad is not None and p.grad.dtype == torch.float16 for p in params)
    if scaler._scale is None:  # e.g. loaded from a state dict: GradScaler creates it lazily, in scale()
        device = next((p.grad.device for p in params if p.grad is not None), params[0].device)
        scaler._lazy_init_scale_growth_tracker(device)
    if not has_fp16:
        scaler.unscale_(inner)
    else:  # mirror of GradScaler.unscale_ with allow_fp16=True
        from torch.amp.grad_scaler import OptState

        scaler._check_scale_growth_tracker("unscale_")
        state = scaler._per_optimizer_states[id(inner)]
        if state["stage"] is not OptState.READY:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        inv_scale = scaler._scale.double().reciprocal().float()
        found_inf = torch.full((), 0.0, dtype=torch.float32, device=scaler._scale.device)
        state["found_inf_per_device"] = scaler._unscale_grads_(inner, inv_scale, found_inf, True)
        state["stage"] = OptState.UNSCALED
    return scaler._found_inf_per_device(inner)


class Precision:
    """Loss scale and non-finite handling for one wrapper.

    Args:
        scaler: the owned ``GradScaler`` or None.
        policy: one of :data:`NONFINITE_POLICIES`.
    """

    def __init__(self, *, scaler: "torch.amp.GradScaler | None", policy: str) -> None:
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.policy = policy
        self.last_found: Tensor | None = None  # flag of the last real update, on device
        self._dropped: Tensor | None = None  # owned scaler + "drop": a micro-batch overflowed this window
        self._empty: Tensor | None = None  # every micro-batch of the window was dropped
        self._scaler_found: Tensor | None = None  # the owned scaler's own found_inf tensor of this update
        self._unscaled: int | None = None  # id of the optimizer the owned scaler unscaled this update
        self._external: torch.optim.Optimizer | None = None  # the wrapper, while an external scaler drives it
        self._external_seen = False  # an external GradScaler has driven this wrapper (it drops micro-batches)

    @property
    def may_drop(self) -> bool:
        """Whether micro-batches may be dropped (weight 0 on the device) in this run."""
        return self.policy == "drop" or (self._external_seen and self.policy == "ignore")

    # ------------------------------------------------------------ micro-step
    def micro_factor(
        self, optimizer: torch.optim.Optimizer, micro_grads: Callable[[], list[list[Tensor]]]
    ) -> "tuple[float | Tensor, Tensor | None]":
        """Factor by which this micro-batch enters the window, and its dropped flag.

        The factor is ``keep / external_scale`` (``keep`` is 0 for a dropped
        micro-batch). A dropped micro-batch's gradients are zeroed in place first,
        so NaN/inf never reach the buffers. Under ``"skip"``/``"raise"`` an
        external scaler's overflow is *kept* in the sum, so the boundary check
        sees it and skips (or raises for) the whole window. No host sync.
        """
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and self.scaler is not None:
            raise RuntimeError(
                "The wrapper owns a GradScaler (scaler=...), so call opt.step() directly, "
                "not scaler.step(opt): the owned scaler unscales once per real update."
            )
        if found_inf is None and self.policy != "drop":
            return 1.0, None
        grad_scale = getattr(optimizer, "grad_scale", None) if found_inf is not None else None
        inv_scale = None if grad_scale is None else grad_scale.detach().double().reciprocal().float()
        self._external = optimizer if found_inf is not None else None
        self._external_seen = self._external_seen or found_inf is not None
        if found_inf is not None and self.policy in ("skip", "raise"):
            return (1.0 if inv_scale is None else inv_scale), None
        grads = [g for gs in micro_grads() for g in gs]
        if found_inf is None:
            found = found_nonfinite(grads)
            if found is None:
                return 1.0, None
        else:
            found = found_inf.detach() > 0  # GradScaler sums flags over devices: may exceed 1
        # float64: the flag also scales the window's weight total, whose reciprocal must stay exact
        found = found.to(weight_dtype(found.device))
        bad = found > 0
        for g in grads:  # one masked fill per tensor, only on this path; no sync
            (g._values() if g.is_sparse else g).masked_fill_(bad.to(g.device), 0.0)
        keep = 1.0 - found
        if inv_scale is not None:
            keep = keep * inv_scale.to(keep.device, keep.dtype)
        if self.scaler is not None:  # owned scaler + "drop": the scale must still back off
            self._dropped = found if self._dropped is None else torch.maximum(self._dropped, found)
        return keep, found

    # -------------------------------------------------------------- boundary
    def unscale_and_check(
        self, inner: torch.optim.Optimizer, grads: Callable[[], list[Tensor]], total: "float | Tensor | None" = None
    ) -> Tensor | None:
        """Unscale the final gradient (owned scaler) and return its non-finite flag (device tensor or None).

        ``total`` is the window's summed weight; a device total of 0 (every
        micro-batch dropped) makes :meth:`apply` skip the window.
        """
        # Only where micro-batches can be dropped (weight 0) may the total be 0 without the user's doing:
        # tensor weights given by the user cost no sync here.
        self._empty = (total <= 0).float() if self.may_drop and isinstance(total, Tensor) else None
        if self.scaler is not None:
            per_device = _owned_unscale(self.scaler, inner)
            self._unscaled = id(inner)
            if not per_device:  # no gradient at all
                return None
            self._scaler_found = next(iter(per_device.values()))
            found: Tensor | None = None
            for f in per_device.values():
                found = f.clone() if found is None else found + f.to(found.device)
            return found
        if self.policy in ("skip", "raise", "drop"):
            return found_nonfinite(grads())
        return None

    def apply(
        self,
        inner: torch.optim.Optimizer,
        found: Tensor | None,
        describe_bad: Callable[[], str],
        drops: "tuple[Tensor, Callable[[list[bool]], None]] | None" = None,
    ) -> bool:
        """Step ``inner`` unless the window must be skipped; return whether it stepped.

        At most one host sync, reading together ``found``, the empty-window flag and
        ``drops``: flags of micro-batches that may have been dropped, whose host
        values go to its callback (``True``: kept) before the step. With an owned
        scaler, ``scaler.update()`` runs exactly once here, whether the window is
        applied, skipped or raises.
        """
        self.last_found = found
        try:
            code: Tensor | None = None
            if found is not None:
                code = (found > 0).float() * 2.0
            if self._empty is not None:
                empty = self._empty if code is None else self._empty.to(code.device)
                code = empty if code is None else code + empty
            if code is None and drops is not None:
                code = torch.zeros((), device=drops[0].device)
            if code is not None:
                flags = code.reshape(1).float()
                if drops is not None:
                    flags = torch.cat([flags, drops[0].to(flags.device, torch.float32)])
                host = host_read(flags)  # the one sync of this update
                value = int(host[0])
                if drops is not None:
                    drops[1]([d == 0 for d in host[1:]])
                if value & 2 and self.policy == "raise":
                    self._forget_external()
                    raise NonFiniteGradientError(
                        f"Non-finite accumulated gradient in {describe_bad()}; the window was discarded "
                        "and the parameters were not updated (nonfinite='raise')."
                    )
                if value:
                    return False
            inner.step()
            return True
        finally:
            self._end_window()

    def _forget_external(self) -> None:
        """Before raising out of ``scaler.step(opt)``: GradScaler will not delete what it set on the wrapper,
        and a stale ``grad_scale`` would be multiplied into the next micro-step's."""
        if self._external is not None:
            for attr in ("grad_scale", "found_inf"):
                if attr in vars(self._external):
                    delattr(self._external, attr)
        self._external = None

    def _end_window(self) -> None:
        if self.scaler is not None:
            if self._dropped is not None and self._scaler_found is not None:
                # A dropped micro-batch overflowed: let the scaler back off as for a skipped step.
                self._scaler_found.add_(self._dropped.to(self._scaler_found.device))
            if self._scaler_found is not None:
                self.scaler.update()
            elif self._unscaled is not None:  # no gradient at all: nothing to update, but unscale_ was recorded
                self.scaler._per_optimizer_states.pop(self._unscaled, None)
        self._dropped = None
        self._empty = None
        self._scaler_found = None
        self._unscaled = None

    def discard_window(self) -> None:
        """Forget the window's flags (the window was discarded, nothing of it applied).

        If the owned scaler already unscaled this window (an error between unscale and
        step), its per-optimizer record is dropped too: the scale stays as it was.
        """
        if self.scaler is not None and self._unscaled is not None:
            self.scaler._per_optimizer_states.pop(self._unscaled, None)
        self._dropped = None
        self._empty = None
        self._scaler_found = None
        self._unscaled = None

    def forget_external(self, optimizer: torch.optim.Optimizer) -> None:
        """After an error inside ``step()``: drop what GradScaler set on ``optimizer``.

        GradScaler deletes ``grad_scale``/``found_inf`` only after a successful step, and
        multiplies a stale ``grad_scale`` into the next micro-step's.
        """
        for attr in ("grad_scale", "found_inf"):
            optimizer.__dict__.pop(attr, None)
        self._external = None

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss`` multiplied by the owned scaler's scale (identity without one)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

