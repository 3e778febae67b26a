"""Gradient synchronisation for data-parallel models: one reduction per real update (see docs/distributed.md).

:class:`GradSync` turns the model's own synchronisation on only for the backward that closes the window
(**native**: DDP in ``mode="inplace"`` with full-precision parameters, FSDP2), or, with accumulation buffers,
averages the window's sums at the boundary with bucketed ``all_reduce`` calls (**explicit**). Gradients and the
weight total are both averaged over ranks, so uneven weights stay exact.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor

from .buffers import GradientStore
from .distributed import all_reduce_mean_, all_reduce_mean_scalar, is_distributed
from .schedule import Window

__all__ = ["GradSync", "unwrap_model"]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside a DDP/DataParallel wrapper (for parameter names)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) and hasattr(model, "require_backward_grad_sync") else model


class GradSync:
    """Switches a model's gradient synchronisation on for the closing backward only; reduces what it did not.

    ``model`` is the model given to the wrapper (DDP, FSDP2, anything else: no-op), ``store`` its gradient store.
    """

    def __init__(self, model: Any, store: GradientStore | None = None) -> None:
        self.model = model
        self.store = store
        self.kind = self.kind_of(model)
        self.group = getattr(model, "process_group", None) if self.kind == "ddp" else None
        self.world_size = torch.distributed.get_world_size(self.group) if self.distributed else 1
        if self.kind == "fsdp" and store is not None and any(g.buffers is not None for g in store.groups):
            raise ValueError(f"Invalid mode for an FSDP2 model: mode={store.mode!r} with accumulation buffers (FSDP2 "
                             "keeps a window's gradients inside the model until the synchronising backward, so they "
                             "never pass through buffers). Use mode='inplace' with full-precision sharded parameters "
                             "(for bf16 compute: fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype="
                             "torch.bfloat16, reduce_dtype=torch.float32))), or accumulate_dtype equal to the "
                             "parameter dtype.")
        self._armed = False  # whether the next backward synchronises
        # DDP: whether each forward since ran with synchronisation on (its backward reduces), oldest first,
        # and the record taken by the current micro-step (None: no forward seen through the model).
        self._forwards: deque[bool] = deque()
        self._this_forward: bool | None = None
        # DDP decides when a *forward* runs whether its backward reduces: with forwards run ahead of their backwards
        # the closing one may not, and that window is then reduced explicitly (harmless if DDP reduced it too).
        self._hook = model.register_forward_pre_hook(self._on_forward) if self.kind == "ddp" else None
        self._reduced_window = -1  # index of the window already reduced

    def close(self) -> None:
        """Remove the DDP forward pre-hook (when the wrapper goes: the model must not keep this object alive)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @staticmethod
    def kind_of(model: Any) -> str:
        """``"ddp"``, ``"fsdp"`` (FSDP2) or ``"none"``: how ``model`` synchronises gradients."""
        if hasattr(model, "require_backward_grad_sync"):
            return "ddp"
        if hasattr(model, "set_requires_gradient_sync"):
            return "fsdp"
        return "none"

    @property
    def active(self) -> bool:
        """Whether a data-parallel model is attached."""
        return self.kind != "none"

    @property
    def distributed(self) -> bool:
        """Whether reductions across ranks are needed (a DDP/FSDP2 model and a process group)."""
        return self.kind != "none" and is_distributed()

    @property
    def native(self) -> bool:
        """Whether the model's own synchronising backward reduces the window (else: explicit reduction)."""
        if self.kind != "ddp":
            return self.kind == "fsdp"
        # Read when a window is armed or reduced, not per micro-step; derived, so a re-plan (model.to) counts.
        return self.store is None or all(g.buffers is None for g in self.store.groups)

    def set(self, sync: bool) -> None:
        """Whether the next backward pass closes the window (and so reduces gradients natively)."""
        if self.kind == "none":
            return
        flag = bool(sync) and self.native
        if self.kind == "ddp":
            self.model.require_backward_grad_sync = flag
        else:
            self.model.set_requires_gradient_sync(flag)
        self._armed = flag

    def _on_forward(self, module: torch.nn.Module, args: Any) -> None:
        """DDP forward pre-hook: remember whether this forward's backward will reduce (DDP reads the flag now)."""
        if torch.is_grad_enabled():  # DDP prepares its reduction only then
            if len(self._forwards) > 256:  # forwards that never reach a step(): the pairing is lost
                self._forwards.clear()
            self._forwards.append(bool(getattr(module, "require_backward_grad_sync", False)))

    def end_micro_batch(self) -> None:
        """A micro-step ends: take the record of its forward (forwards and micro-steps pair in order)."""
        self._this_forward = self._forwards.popleft() if self._forwards else None

    def prepare_flush(self) -> None:
        """The window is about to close without a synchronising backward (``flush()``)."""
        self._armed = False

    def reduce(self, store: GradientStore, window: Window) -> None:
        """Make the window's sums and weight total the mean over ranks, once per window (before anything reads them).

        The reduced gradient is bit-identical on every rank, so non-finite checks decide alike everywhere.
        """
        self._forwards.clear()  # records left over (forwards that reached no step()) must not pair later
        if not self.distributed or self._reduced_window == window.closed:
            return
        if not (self.native and self._armed and (self.kind == "fsdp" or self._this_forward is True)):
            if self.kind == "fsdp":
                raise RuntimeError(f"Cannot apply a partial window of {window.count} micro-batches with FSDP2: FSDP2 "
                                   "holds the gradients of backward passes that did not synchronise inside the model, "
                                   "and only a synchronising backward reduces them. Give every rank a number of "
                                   "micro-batches that is a multiple of accumulation_steps (e.g. "
                                   "DataLoader(drop_last=True)); the window was kept.")
            self._reduce_sums(store)
        if isinstance(window.total, Tensor) or window.weighted or window.count != window.k:
            # weights, drops or a partial window: totals may differ across ranks. Without any of them
            # every rank's total is K (the same schedule everywhere), so the mean needs no collective.
            window.total = all_reduce_mean_scalar(window.total, store.device, self.group, self.world_size)
        self._reduced_window = window.closed

    def consolidate(self, store: GradientStore, window: Window) -> None:
        """Replace each rank's pending sums by their mean over ranks (before a mid-window checkpoint).

        Collective while a window is pending (``opt.state_dict()`` on every rank), so rank 0's checkpoint resumes all.
        """
        if not self.distributed or window.count == 0:
            return
        if self.kind == "fsdp":
            raise RuntimeError(f"Cannot save a checkpoint in the middle of a window ({window.count} of {window.k} "
                               "micro-batches) with FSDP2: the pending gradients live inside the model. Save at a "
                               "window boundary (opt.pending == 0).")
        self._reduce_sums(store)
        window.total = all_reduce_mean_scalar(window.total, store.device, self.group, self.world_size)

    def _reduce_sums(self, store: GradientStore) -> None:
        tensors: list[Tensor] = []
        for g in store.groups:
            if g.buffers is not None:
                tensors.extend(g.buffers)
                continue
            for p in g.params:
                if p.grad is None:  # unused on this rank: it still takes part, with zeros
                    p.grad = torch.zeros_like(p)
                tensors.append(p.grad)
        all_reduce_mean_(tensors, self.group, self.world_size)
        store.mark_seen()  # a parameter used on another rank has a reduced gradient here too
