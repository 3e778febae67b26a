"""Loss scaling and the non-finite guard.

One object decides, for each micro-step and each real update, what the
accumulated gradient is scaled by and whether the update is applied:

* an *owned* ``GradScaler`` (``scaler=``): the scale is constant within a window;
  at the boundary: unscale, (clip), ``scaler.step``, ``scaler.update``.
* an *external* ``GradScaler`` driving the wrapper (``scaler.step(opt)`` on every
  micro-batch): the wrapper declares ``_step_supports_amp_scaling``, so GradScaler
  hands over ``grad_scale`` and ``found_inf`` as device tensors and never syncs;
  each micro-batch is unscaled into the buffers and an overflowing one is dropped.
* the ``nonfinite`` policy: ``"ignore"``, ``"skip"`` (whole window), ``"drop"``
  (only the bad micro-batch, buffered mode) or ``"raise"``.

Checks are fused per device with ``torch._amp_foreach_non_finite_check_and_unscale_``;
the host reads a flag only at a real update, and only when a policy needs it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["NONFINITE_POLICIES", "NonFiniteGradientError", "Precision"]

NONFINITE_POLICIES = ("ignore", "skip", "drop", "raise")


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``nonfinite="raise"`` when an accumulated gradient is NaN or inf."""


def found_nonfinite(tensors: Sequence[Tensor]) -> Tensor | None:
    """A 0-dim float tensor, 1.0 where any of ``tensors`` holds NaN/inf (one fused check per device and dtype)."""
    by_key: dict[tuple, list[Tensor]] = defaultdict(list)
    for t in tensors:
        by_key[(t.device, t.dtype)].append(t.detach())
    if not by_key:
        return None
    total: Tensor | None = None
    for (device, _), ts in by_key.items():
        found = torch.zeros((), device=device, dtype=torch.float32)
        one = torch.ones((), device=device, dtype=torch.float32)
        if device.type in ("cuda", "cpu") and all(t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) for t in ts):
            torch._amp_foreach_non_finite_check_and_unscale_(ts, found, one)
        else:  # pragma: no cover - exotic devices or dtypes
            found = torch.stack([(~torch.isfinite(t)).any() for t in ts]).any().float()
        total = found if total is None else torch.maximum(total, found.to(total.device))
    return total


class Precision:
    """Loss scale and non-finite handling for one wrapper."""

    def __init__(self, *, scaler: "torch.amp.GradScaler | None", policy: str) -> None:
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.policy = policy
        self.last_found: Tensor | None = None  # flag of the last real update, on device

    # ------------------------------------------------------------ micro-step
    def micro_factor(self, optimizer: torch.optim.Optimizer, micro_grads: Callable[[], list[list[Tensor]]]) -> "tuple[float | Tensor, Tensor | None]":
        """Factor by which this micro-batch enters the window, and its non-finite flag.

        The factor is ``keep / external_scale``: 0 for a dropped micro-batch.
        Dropped micro-batches have their gradients zeroed in place, so NaN never
        reaches the buffers.
        """
        grad_scale = getattr(optimizer, "grad_scale", None) if hasattr(optimizer, "found_inf") else None
        found = getattr(optimizer, "found_inf", None)
        if found is not None and self.scaler is not None:
            raise RuntimeError(
                "The wrapper owns a GradScaler (scaler=...), so call opt.step() directly, "
                "not scaler.step(opt): the owned scaler unscales once per real update."
            )
        if found is None and self.policy != "drop":
            return 1.0, None
        grads = micro_grads()
        if found is None:
            found = found_nonfinite([g for gs in grads for g in gs])
            if found is None:
                return 1.0, None
        found = found.float()
        bad = found.bool()
        for gs in grads:
            for g in gs:  # only on this non-default path: one masked fill per tensor, no sync
                g.masked_fill_(bad.to(g.device), 0.0)
        keep = 1.0 - found
        if grad_scale is not None:
            keep = keep / grad_scale.to(keep.device)
        return keep, found

    # -------------------------------------------------------------- boundary
    def unscale_and_check(self, inner: torch.optim.Optimizer, grads: Callable[[], list[Tensor]]) -> Tensor | None:
        """Unscale the final gradient (owned scaler) and return its non-finite flag."""
        if self.scaler is not None:
            self.scaler.unscale_(inner)
            per_device = self.scaler._found_inf_per_device(inner)
            found = None
            for f in per_device.values():
                found = f if found is None else found + f.to(found.device)
            return found
        if self.policy in ("skip", "raise"):
            return found_nonfinite(grads())
        return None

    def apply(self, inner: torch.optim.Optimizer, found: Tensor | None, describe_bad: Callable[[], str]) -> bool:
        """Step ``inner`` unless the policy skips this window; return whether it stepped."""
        self.last_found = found
        if self.scaler is not None:
            self.scaler.step(inner)  # reads found_inf itself (its one sync)
            return not bool(found.item()) if found is not None else True
        if found is None:
            inner.step()
            return True
        if bool(found.item()):  # the one sync of this update, needed by the policy
            if self.policy == "raise":
                raise NonFiniteGradientError(
                    f"Non-finite accumulated gradient in {describe_bad()}; the window was discarded "
                    "and the parameters were not updated (nonfinite='raise')."
                )
            return False
        inner.step()
        return True

    def after_update(self) -> None:
        """Advance the owned scaler once per real update."""
        if self.scaler is not None:
            self.scaler.update()

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss`` multiplied by the owned scaler's scale (identity without one)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss
