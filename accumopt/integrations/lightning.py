"""Lightning (``lightning.pytorch``) with accumopt doing the gradient accumulation (docs/integrations.md).

``configure_optimizers`` returns an :class:`~accumopt.AccumulatingOptimizer` that owns the LR scheduler and the
clipping; the Trainer gets :class:`AccumulationCallback`, ``accumulate_grad_batches=1`` and no
``gradient_clip_val``. Lightning's ``global_step`` and ``max_steps`` then count micro-batches (every
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
    return [o for o in map(unwrap_optimizer, trainer.optimizers) if isinstance(o, AccumulatingOptimizer)]


class AccumulationCallback(Callback):
    """Checks the Trainer's settings for accumopt and applies the partial window at each epoch's end.

    The partial window is applied right after the epoch's last micro-batch, before ``interval="epoch"``
    schedulers and the epoch-end validation. A pending window survives Lightning's ``model.zero_grad()`` before
    validation and, restored from a mid-window checkpoint, at the start of ``fit``. At ``fit`` start it raises
    ``ValueError`` for ``accumulate_grad_batches`` other than 1, a ``gradient_clip_val``, no
    ``AccumulatingOptimizer`` among the optimizers, or an ``interval="step"`` scheduler on one.

    Args:
        flush_on_epoch_end: apply the last, partial window of every epoch (default); False lets windows span
            epochs.
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
            raise ValueError(f"Invalid Trainer(gradient_clip_val={trainer.gradient_clip_val}) with accumopt (it clips "
                             "every micro-batch's partial sum): pass max_grad_norm= to the AccumulatingOptimizer, "
                             "which clips the whole window once")
        optimizers = accumulating_optimizers(trainer)
        if not optimizers:
            raise ValueError("AccumulationCallback: configure_optimizers returned no AccumulatingOptimizer")
        for config in trainer.lr_scheduler_configs:
            if config.interval == "step" and any(unwrap_optimizer(config.scheduler.optimizer) is o for o in optimizers):
                raise ValueError(f"Invalid lr scheduler {type(config.scheduler).__name__} with interval='step' on an "
                                 "AccumulatingOptimizer (Lightning would step it on every micro-batch): build it on "
                                 "the wrapped optimizer and pass it as AccumulatingOptimizer(..., scheduler=...), "
                                 "which steps it once per real update")
        self._patch_module_hooks(trainer, pl_module)

    def _patch_module_hooks(self, trainer: Any, pl_module: Any) -> None:
        """Wrap two of the module's hooks for ``fit`` (undone in :meth:`teardown`): ``on_validation_model_zero_grad``
        keeps pending windows; ``optimizer_step`` flushes right after the epoch's last micro-batch."""
        self._restore_module_hooks()
        zero_grad: Callable[[], None] = pl_module.on_validation_model_zero_grad
        optimizer_step: Callable[..., Any] = pl_module.optimizer_step

        def on_validation_model_zero_grad() -> None:
            optimizers = accumulating_optimizers(trainer)
            if not any(opt.pending for opt in optimizers):
                zero_grad()
                return
            kept: set[int] = set()  # keep the pending windows: each wrapper clears what is not part of its window
            for opt in optimizers:
                opt.zero_grad()  # keeps in-place sums in .grad
                kept.update(id(p) for group in opt.param_groups for p in group["params"])
            for p in pl_module.parameters():
                if id(p) not in kept:
                    p.grad = None

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
        if trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches:
            self._flush(trainer)

    def _flush(self, trainer: Any) -> None:
        # An empty window is left alone: opt.stepped still tells whether the last micro-batch applied an update.
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
        for optimizer, state in zip(trainer.optimizers, states or []):
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
    """A ``LightningModule`` mixin (put before ``LightningModule``): weight each micro-batch by its tokens or samples.

    Call :meth:`set_micro_batch_weight` in ``training_step`` with the micro-batch's count (a number or a 0-dim
    tensor, which stays on the device) and return its mean loss: the backward goes through
    ``opt.backward(loss, weight=n)`` of the first ``AccumulatingOptimizer``, so each update is the mean over all
    the tokens (or samples) of its window.
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
