"""Hugging Face ``Trainer`` with accumopt doing the gradient accumulation (docs/integrations.md).

``AccumulatingTrainer`` is a drop-in ``transformers.Trainer`` that hands ``gradient_accumulation_steps`` to an
:class:`~accumopt.AccumulatingOptimizer`; the Trainer itself runs on a copy of the arguments with
``gradient_accumulation_steps=1`` and ``max_grad_norm=0``. Windows never span epochs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, cast

import torch
from transformers import Trainer, TrainingArguments, __version__ as transformers_version
from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState

from .._checks import weight_dtype
from ..optimizer import AccumulatingOptimizer
from ._common import unwrap_optimizer

__all__ = ["AccumulatingTrainer"]

# Trainer methods this adapter relies on (transformers 5.x); checked at construction.
_REQUIRED = ("_init_training_state", "_run_epoch", "set_initial_training_values", "create_optimizer",
             "create_scheduler", "training_step", "compute_loss", "_prepare_inputs")


class _PerUpdateScheduler:
    """The Trainer's ``lr_scheduler``, called after every micro-batch: steps the real scheduler only after a real
    update; everything else (``get_last_lr``, ``state_dict``, ...) is the real scheduler's."""

    def __init__(self, scheduler: Any, optimizer: AccumulatingOptimizer) -> None:
        self.scheduler = scheduler
        self._accumulating = optimizer

    def step(self, *args: Any, **kwargs: Any) -> None:
        if self._accumulating.stepped:
            self.scheduler.step(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.scheduler.state_dict())  # a copy: the caller may change it

    def __getattr__(self, name: str) -> Any:
        if name == "scheduler":  # not set yet (unpickling): do not recurse
            raise AttributeError(name)
        return getattr(self.scheduler, name)


class _WindowCallbackHandler(CallbackHandler):
    """Dispatches the per-step callback events once per window, not once per micro-batch.

    ``on_step_begin`` runs at a window's first micro-batch, the other step events at the one that closes it; the
    other micro-batches get ``on_substep_end``, and their ``global_step`` increment is taken back.
    """

    trainer: "AccumulatingTrainer"

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> Any:
        opt = self.trainer.accumulating_optimizer
        first = opt is None or opt.pending == 0  # the first micro-batch of a window
        return super().on_step_begin(args, state, control) if first else control

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> Any:
        return super().on_pre_optimizer_step(args, state, control) if self.trainer._closing else control

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> Any:
        trainer = self.trainer
        if not trainer._closing:
            return control
        opt = trainer.accumulating_optimizer
        if opt is not None and opt.pending:
            opt.flush()  # the last, partial window of the epoch
        trainer._fill_grad_norm()
        return super().on_optimizer_step(args, state, control)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> Any:
        if self.trainer._closing:
            return super().on_step_end(args, state, control)
        state.global_step -= 1  # the Trainer counted a micro-batch; global_step counts updates
        return super().on_substep_end(args, state, control)


class AccumulatingTrainer(Trainer):
    """A ``transformers.Trainer`` whose gradient accumulation is done by accumopt.

    Args:
        *args: the ``Trainer``'s positional arguments (``model``, ``args``, ...).
        accumulation_steps: K, the micro-batches per real update. Default: the ``TrainingArguments``'
            ``gradient_accumulation_steps``.
        accumulation_kwargs: further :class:`~accumopt.AccumulatingOptimizer` arguments (``nonfinite=``, ...).
            ``track_grad_norm`` defaults to True (the logged ``grad_norm`` is the window's pre-clip norm);
            ``mode`` is always ``"buffered"`` (the Trainer calls ``model.zero_grad()`` after every optimizer
            step); clipping comes from ``TrainingArguments.max_grad_norm``.
        **kwargs: the ``Trainer``'s keyword arguments; ``optimizers=(optimizer, scheduler)`` takes a plain torch
            optimizer and a scheduler built on it.

    Attributes:
        accumulating_optimizer: the :class:`~accumopt.AccumulatingOptimizer` (once training started).
    """

    def __init__(self, *args: Any, accumulation_steps: int | None = None,
                 accumulation_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        missing = [name for name in _REQUIRED if not hasattr(Trainer, name)]
        if missing:
            raise ImportError(f"AccumulatingTrainer needs the transformers 5 Trainer (missing {missing} in "
                              f"transformers {transformers_version})")
        positional = list(args)
        training_args = positional[1] if len(positional) > 1 else kwargs.get("args")
        if training_args is None:
            training_args = TrainingArguments(output_dir="trainer_output")
        if not isinstance(training_args, TrainingArguments):
            raise TypeError(f"Invalid args: {type(training_args).__name__} (expected transformers.TrainingArguments)")
        self._k = _resolve_k(accumulation_steps, training_args.gradient_accumulation_steps)
        # The Trainer logs grad_norm: the window's, here.
        self._accumulation_kwargs = {"track_grad_norm": True, **(accumulation_kwargs or {})}
        for key in ("mode", "max_grad_norm", "scheduler", "model"):
            if key in self._accumulation_kwargs:
                raise ValueError(f"Invalid accumulation_kwargs: {key!r} is set by AccumulatingTrainer "
                                 f"({_SET_BY_TRAINER[key]})")
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers and isinstance(optimizers[0], AccumulatingOptimizer):
            raise TypeError("Invalid optimizers: an AccumulatingOptimizer (expected the plain torch optimizer; "
                            "AccumulatingTrainer wraps it itself)")
        self._max_grad_norm = training_args.max_grad_norm or None
        # The Trainer itself runs one micro-batch per "step" and never clips: a copy, yours is unchanged.
        inner_args = dataclasses.replace(training_args, gradient_accumulation_steps=1, max_grad_norm=0.0)
        if len(positional) > 1:
            positional[1] = inner_args
        else:
            kwargs["args"] = inner_args
        super().__init__(*positional, **kwargs)
        if self.is_deepspeed_enabled:
            raise ValueError("AccumulatingTrainer does not support DeepSpeed (it accumulates itself): "
                             "use the Trainer's own gradient_accumulation_steps there")
        handler = _WindowCallbackHandler(  # type: ignore[no-untyped-call]
            self.callback_handler.callbacks, self.callback_handler.model, self.callback_handler.processing_class,
            self.callback_handler.optimizer, self.callback_handler.lr_scheduler)
        handler.trainer = self
        self.callback_handler = handler
        self.accumulating_optimizer: AccumulatingOptimizer | None = None
        self._steps_in_epoch = 0
        self._micro_in_epoch = 0
        self._resume_micro = 0
        self._closing = False
        self._window_loss: torch.Tensor | None = None
        self._window_weight: torch.Tensor | float = 0.0
        self._grad_norm_out: torch.Tensor | None = None  # handed to the Trainer, filled after the update
        self._grad_norm_before: Any = None

    def create_optimizer(self, model: Any = None) -> Any:
        """Build the Trainer's optimizer (or take ``optimizers[0]``) and wrap it in accumopt."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if isinstance(unwrap_optimizer(optimizer), AccumulatingOptimizer):  # Accelerate's wrapper, earlier train()
            return optimizer
        self.optimizer = self.accumulating_optimizer = AccumulatingOptimizer(
            optimizer, self._k, mode="buffered", max_grad_norm=self._max_grad_norm, model=self.model,
            **self._accumulation_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """The Trainer's scheduler, built on the wrapped optimizer and stepped once per real update."""
        if isinstance(self.lr_scheduler, _PerUpdateScheduler):
            return self.lr_scheduler
        opt = self.accumulating_optimizer
        if opt is None:
            raise RuntimeError("create_optimizer() must run before create_scheduler()")
        scheduler = super().create_scheduler(num_training_steps, optimizer=opt.optimizer)
        if scheduler is None or isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return scheduler  # the Trainer steps ReduceLROnPlateau after evaluation, i.e. after updates
        self.lr_scheduler = _PerUpdateScheduler(scheduler, opt)  # type: ignore[assignment]
        return self.lr_scheduler

    def set_initial_training_values(self, args: Any, dataloader: Any) -> tuple[Any, ...]:
        """The Trainer's training values with ``max_steps`` (and so the scheduler) counted in real updates."""
        (num_train_epochs, micro_per_epoch, num_examples, num_train_samples, total_batch,
         steps_in_epoch, _) = super().set_initial_training_values(args, dataloader)
        try:
            length = len(dataloader)
        except TypeError:
            raise ValueError("AccumulatingTrainer needs a train dataloader with a length (windows close "
                             "at the end of each epoch)") from None
        if self.accelerator.scaler is not None:
            raise ValueError("AccumulatingTrainer does not support fp16 loss scaling through Accelerate "
                             "(its GradScaler steps every micro-batch): use bf16, or a plain loop with "
                             "AccumulatingOptimizer(..., scaler=torch.amp.GradScaler())")
        self._steps_in_epoch = steps_in_epoch if steps_in_epoch is not None else length
        updates_per_epoch = max(math.ceil(self._steps_in_epoch / self._k), 1)
        if args.max_steps > 0:
            max_updates = args.max_steps
            num_train_epochs = math.ceil(max_updates / updates_per_epoch)
            num_train_samples = max_updates * total_batch * self._k
        else:
            max_updates = math.ceil(args.num_train_epochs * updates_per_epoch)
        return (num_train_epochs, micro_per_epoch, num_examples, num_train_samples, total_batch * self._k,
                steps_in_epoch, max_updates)

    def _init_training_state(self, max_steps: int, num_update_steps_per_epoch: int, num_train_epochs: int,
                             resume_from_checkpoint: Any, trial: Any) -> tuple[int, int]:
        epochs_trained, skip = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial)
        self._resume_micro = 0
        if resume_from_checkpoint is not None and self.state.epoch:
            # global_step counts updates; the micro-batches seen are in state.epoch = e + seen / per_epoch.
            epochs_trained, skip = divmod(round(self.state.epoch * self._steps_in_epoch), self._steps_in_epoch)
            if self.args.ignore_data_skip:
                skip = 0
            self._resume_micro = skip
        return epochs_trained, skip

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        self._micro_in_epoch, self._resume_micro = self._resume_micro, 0
        opt = self.accumulating_optimizer
        if opt is not None and opt.pending != self._micro_in_epoch % self._k:
            raise ValueError(f"Cannot resume: the optimizer holds {opt.pending} pending micro-batches but the "
                             f"checkpoint is {self._micro_in_epoch} micro-batches into the epoch "
                             f"(K={self._k}); resume with the same accumulation steps and data")
        return super()._run_epoch(*args, **kwargs)  # type: ignore[no-untyped-call]

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Forward and backward of one micro-batch, weighted by its ``num_items_in_batch``.

        Returns the loss to log: the window's token-weighted mean on the micro-batch that closes the window, zero
        on the others (the Trainer sums them per update).
        """
        opt = self.accumulating_optimizer
        if opt is None:
            raise RuntimeError("AccumulatingTrainer.training_step called before create_optimizer()")
        self._micro_in_epoch += 1
        self._closing = opt.sync_gradients or self._micro_in_epoch >= self._steps_in_epoch
        model.train()
        train_mode = getattr(self.optimizer, "train", None)  # schedule-free optimizers
        if callable(train_mode):
            train_mode()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = cast(torch.Tensor, self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch))
        del inputs
        if self.args.n_gpu > 1:
            loss = loss.mean()
        # With num_items_in_batch the loss is (sum of this micro-batch's token losses) / its tokens:
        # weighting it by those tokens makes the window's update the token mean over the window.
        weight = num_items_in_batch if num_items_in_batch is not None else 1.0
        opt.backward(loss, weight=weight)
        return self._logged_loss(loss.detach(), weight)

    def _logged_loss(self, loss: torch.Tensor, weight: Any) -> torch.Tensor:
        weighted = loss * weight
        self._window_loss = weighted if self._window_loss is None else self._window_loss + weighted
        self._window_weight = self._window_weight + weight
        if not self._closing:
            return torch.zeros_like(loss)
        mean = self._window_loss / self._window_weight
        self._window_loss, self._window_weight = None, 0.0
        return mean

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        """The window's pre-clip norm for the Trainer's log (None on micro-batches that do not close a window).

        The Trainer asks before ``optimizer.step()``, which computes the norm: it gets a 0-dim device tensor now,
        filled on the device after the update (no host read; the Trainer reads it only when it logs).
        """
        opt = self.accumulating_optimizer
        self._grad_norm_out = None
        tracked = self._max_grad_norm or self._accumulation_kwargs.get("track_grad_norm")
        if opt is None or not self._closing or not tracked:
            return None
        device = opt.param_groups[0]["params"][0].device
        self._grad_norm_out = torch.full((), float("nan"), dtype=weight_dtype(device), device=device)
        self._grad_norm_before = opt.last_grad_norm
        return self._grad_norm_out

    def _fill_grad_norm(self) -> None:
        """After the update: copy the closed window's norm into the tensor the Trainer will log."""
        out, self._grad_norm_out = self._grad_norm_out, None
        before, self._grad_norm_before = self._grad_norm_before, None
        opt = self.accumulating_optimizer
        norm = opt.last_grad_norm if opt is not None else None
        if out is None or norm is None or norm is before:  # no norm computed for this window: NaN
            return
        if isinstance(norm, torch.Tensor):
            out.copy_(norm)
        else:
            out.fill_(norm)


_SET_BY_TRAINER = {
    "mode": "always 'buffered': the Trainer calls model.zero_grad() after every optimizer step",
    "max_grad_norm": "set TrainingArguments.max_grad_norm",
    "scheduler": "the Trainer's scheduler is stepped once per real update",
    "model": "the Trainer's model",
}


def _resolve_k(accumulation_steps: int | None, from_args: int) -> int:
    if accumulation_steps is None:
        return int(from_args)
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"Invalid accumulation_steps: {accumulation_steps!r} (expected an int >= 1)")
    if from_args > 1 and from_args != accumulation_steps:
        raise ValueError(f"Invalid accumulation_steps: {accumulation_steps} with TrainingArguments."
                         f"gradient_accumulation_steps={from_args} (expected one of them, or both equal)")
    return accumulation_steps
