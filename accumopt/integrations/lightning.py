"""Lightning (``lightning.pytorch``) with accumopt doing the gradient accumulation.

The recipe: ``configure_optimizers`` returns an :class:`~accumopt.AccumulatingOptimizer`
that owns the LR scheduler and the clipping, and the Trainer gets
:class:`AccumulationCallback` with ``accumulate_grad_batches=1`` and no
``gradient_clip_val``::

    def configure_optimizers(self):
        inner = torch.optim.AdamW(self.parameters(), lr=1e-3)
        return AccumulatingOptimizer(
            inner, 8,
            scheduler=torch.optim.lr_scheduler.OneCycleLR(inner, max_lr=1e-3, total_steps=n_updates),
            max_grad_norm=1.0)

    trainer = L.Trainer(callbacks=[AccumulationCallback()], ...)

What this gives, compared with ``accumulate_grad_batches=K``:

* the scheduler steps once per real update (Lightning's ``interval="step"`` would
  step it on every micro-batch, and a scheduler built on the inner optimizer is
  refused by Lightning: accumopt owns it instead);
* ``max_grad_norm`` clips the accumulated window once (``gradient_clip_val``
  would clip every micro-batch's partial sum);
* the last, partial window of an epoch is averaged over the micro-batches (or
  weights) it saw and applied right after the epoch's last batch, before
  ``interval="epoch"`` schedulers and the epoch-end validation (Lightning divides
  the short last window by K);
* validation keeps the pending window (Lightning clears gradients before each
  validation run, where ``mode="inplace"`` keeps the window's sum);
* micro-batches weighted by their tokens or samples with
  :class:`WeightedBackwardMixin`;
* Lightning checkpoints hold the pending window (``optimizer_states``), so a
  checkpoint saved mid-window resumes it exactly.

Lightning's ``global_step`` and ``max_steps`` count micro-batches here (every
``optimizer.step()`` call); ``opt.num_updates`` counts real updates.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from lightning.pytorch import Callback

from ..optimizer import AccumulatingOptimizer
from ._common import unwrap_optimizer

__all__ = ["AccumulationCallback", "WeightedBackwardMixin", "accumulating_optimizers"]


def accumulating_optimizers(trainer: Any) -> list[AccumulatingOptimizer]:
    """The :class:`~accumopt.AccumulatingOptimizer` objects among ``trainer.optimizers``."""
    found = [unwrap_optimizer(o) for o in trainer.optimizers]
    return [o for o in found if isinstance(o, AccumulatingOptimizer)]


def _zero_grad_keeping_windows(pl_module: Any, optimizers: list[AccumulatingOptimizer]) -> None:
    """``model.zero_grad()`` that keeps the pending windows: each wrapper clears what is not part of its window."""
    kept: set[int] = set()
    for opt in optimizers:
        opt.zero_grad()  # keeps in-place sums in .grad
        kept.update(id(p) for group in opt.param_groups for p in group["params"])
    for p in pl_module.parameters():
        if id(p) not in kept:
            p.grad = None


class AccumulationCallback(Callback):
    """Checks the Trainer's settings for accumopt and applies the partial window at each epoch's end.

    The partial window is applied right after the epoch's last micro-batch, before
    Lightning steps ``interval="epoch"`` schedulers and runs the epoch-end validation.
    Lightning clears gradients before every validation run
    (``on_validation_model_zero_grad``), which would delete a pending window's sum in
    ``mode="inplace"``: while a window is pending, the callback has the wrappers clear
    only what is not part of it. It also restores a mid-window checkpoint's pending sums
    after Lightning's ``model.zero_grad()`` at the start of ``fit``.

    At ``fit`` start it raises ``ValueError`` when Lightning would accumulate or clip too
    (``accumulate_grad_batches`` other than 1, a ``gradient_clip_val``), when no optimizer
    returned by ``configure_optimizers`` is an ``AccumulatingOptimizer``, and when a
    scheduler with ``interval="step"`` is attached to one (it would step on every
    micro-batch: give it to the wrapper as ``scheduler=`` instead).

    Args:
        flush_on_epoch_end: apply the last, partial window of every epoch (default).
            False lets windows span epochs.
    """

    def __init__(self, flush_on_epoch_end: bool = True) -> None:
        if not isinstance(flush_on_epoch_end, bool):
            raise TypeError(f"Invalid flush_on_epoch_end: {flush_on_epoch_end!r} (expected a bool)")
        self.flush_on_epoch_end = flush_on_epoch_end
        self._optimizer_states: list[Any] | None = None
        self._patched: list[tuple[Any, str, Any]] = []  # (module, hook name, the module's own attribute or None)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"Invalid Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) with accumopt "
                "(expected 1: the AccumulatingOptimizer accumulates; Lightning would accumulate on top of it)")
        if trainer.gradient_clip_val:
            raise ValueError(
                f"Invalid Trainer(gradient_clip_val={trainer.gradient_clip_val}) with accumopt (it clips every "
                "micro-batch's partial sum): pass max_grad_norm= to the AccumulatingOptimizer, which clips the "
                "whole window once")
        optimizers = accumulating_optimizers(trainer)
        if not optimizers:
            raise ValueError("AccumulationCallback: configure_optimizers returned no AccumulatingOptimizer")
        for config in trainer.lr_scheduler_configs:
            target = unwrap_optimizer(config.scheduler.optimizer)
            if config.interval == "step" and any(target is o for o in optimizers):
                raise ValueError(
                    f"Invalid lr scheduler {type(config.scheduler).__name__} with interval='step' on an "
                    "AccumulatingOptimizer (Lightning would step it on every micro-batch): build it on the "
                    "wrapped optimizer and pass it as AccumulatingOptimizer(..., scheduler=...), which steps it "
                    "once per real update")
        self._patch_module_hooks(trainer, pl_module)

    def _patch_module_hooks(self, trainer: Any, pl_module: Any) -> None:
        """Wrap two of the module's hooks for the duration of ``fit`` (undone in :meth:`teardown`).

        ``on_validation_model_zero_grad`` keeps pending windows; ``optimizer_step`` applies the
        epoch's partial window right after its last micro-batch, before Lightning steps
        ``interval="epoch"`` schedulers and validates.
        """
        self._restore_module_hooks()
        zero_grad: Callable[[], None] = pl_module.on_validation_model_zero_grad
        optimizer_step: Callable[..., Any] = pl_module.optimizer_step

        def on_validation_model_zero_grad() -> None:
            optimizers = accumulating_optimizers(trainer)
            if any(opt.pending for opt in optimizers):
                _zero_grad_keeping_windows(pl_module, optimizers)
            else:
                zero_grad()

        def optimizer_step_then_flush(epoch: int, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
            result = optimizer_step(epoch, batch_idx, *args, **kwargs)
            self._flush_if_last_batch(trainer, batch_idx)
            return result

        for name, hook in (("on_validation_model_zero_grad", on_validation_model_zero_grad),
                           ("optimizer_step", optimizer_step_then_flush)):
            self._patched.append((pl_module, name, pl_module.__dict__.get(name)))
            setattr(pl_module, name, hook)

    def _restore_module_hooks(self) -> None:
        patched, self._patched = self._patched, []
        for module, name, own in patched:
            if own is None:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, own)

    def _flush_if_last_batch(self, trainer: Any, batch_idx: int) -> None:
        """Apply the partial windows after the epoch's last micro-batch (``flush_on_epoch_end``)."""
        if trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches:
            self._flush(trainer)

    def _flush(self, trainer: Any) -> None:
        """Apply the pending partial windows (``flush_on_epoch_end``); an empty window is left alone, so that
        ``opt.stepped`` still tells whether the epoch's last micro-batch applied an update."""
        if self.flush_on_epoch_end:
            for opt in accumulating_optimizers(trainer):
                if opt.pending:
                    opt.flush()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._restore_module_hooks()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore_module_hooks()  # Lightning does not call teardown after an exception

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._optimizer_states = checkpoint.get("optimizer_states")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Lightning restores the optimizers from a checkpoint, then calls model.zero_grad() before
        # training: in mode="inplace" that wipes a restored mid-window sum (it lives in .grad).
        # Restore those optimizers once more, now that nothing else clears gradients.
        states, self._optimizer_states = self._optimizer_states, None
        if not states:
            return
        for optimizer, state in zip(trainer.optimizers, states):
            opt = unwrap_optimizer(optimizer)
            if isinstance(opt, AccumulatingOptimizer) and opt.pending:
                opt.load_state_dict(state)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Manual optimization (or a module's own optimizer_step): still before the epoch-end validation.
        self._flush_if_last_batch(trainer, batch_idx)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # An epoch that ended some other way (a batch returned -1, the Trainer stopped): nothing pending otherwise.
        self._flush(trainer)


class WeightedBackwardMixin:
    """A ``LightningModule`` mixin: weight each micro-batch by its tokens or samples.

    Call :meth:`set_micro_batch_weight` in ``training_step`` with the micro-batch's
    count (a number or a 0-dim tensor, which stays on the device) and return its mean
    loss; the backward then goes through ``opt.backward(loss, weight=n)``, so each real
    update is the mean over all the tokens (or samples) of its window, partial windows
    included. Put the mixin before ``LightningModule``::

        class Model(WeightedBackwardMixin, L.LightningModule):
            def training_step(self, batch, batch_idx):
                loss = token_mean_loss(self(batch["input_ids"]), batch["labels"])
                self.set_micro_batch_weight((batch["labels"] != -100).sum())
                return loss

    With several optimizers, the weight goes to the first ``AccumulatingOptimizer``.
    """

    _micro_batch_weight: Any = None

    def set_micro_batch_weight(self, weight: "float | torch.Tensor") -> None:
        """How much the current micro-batch counts (its token or sample count)."""
        self._micro_batch_weight = weight

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        weight, self._micro_batch_weight = self._micro_batch_weight, None
        if weight is None:
            super().backward(loss, *args, **kwargs)  # type: ignore[misc]
            return
        optimizers = accumulating_optimizers(self.trainer)  # type: ignore[attr-defined]
        if not optimizers:
            raise ValueError("set_micro_batch_weight() needs an AccumulatingOptimizer from configure_optimizers")
        if args:
            raise TypeError("set_micro_batch_weight(): positional backward arguments are not supported "
                            "(pass them by keyword)")
        optimizers[0].backward(loss, weight=weight, **kwargs)
