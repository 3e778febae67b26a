"""``GradientAccumulationTrainer``: a training loop over :class:`GradientAccumulator` (device, mixed precision,
progress, sample weights, history, resumable checkpoints). Host syncs: one per displayed update and per epoch."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from collections.abc import Iterable, Sized
from typing import Any, Callable, ContextManager, TextIO

import torch
from torch import Tensor

from ._checks import check_cuda_present, check_int
from .accumulator import Batch, GradientAccumulator, read_accumulation_file
from .config import AccumulationStrategy, GradientAccumulationConfig
from .optimizer import AccumulatingOptimizer
from .splitting import batch_size_of, zip_batch

__all__ = ["GradientAccumulationTrainer"]

_NEW_EPOCH: dict[str, Any] = {"loss_sum": 0.0, "loss_count": 0, "samples": 0, "updates": 0, "batch": 0}


def _tqdm() -> Any:
    try:
        return importlib.import_module("tqdm.auto").tqdm
    except ImportError:
        return None


def _get_rng() -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to(x: Any, device: torch.device) -> Any:
    return zip_batch(lambda leaf: leaf[0].to(device, non_blocking=True) if isinstance(leaf[0], Tensor) else leaf[0],
                     [x])


class GradientAccumulationTrainer:
    """Train a model with gradient accumulation configured by a :class:`GradientAccumulationConfig`; the progress
    bar goes to ``progress_stream`` (default ``sys.stderr``)."""

    def __init__(self, config: GradientAccumulationConfig, *, progress_stream: TextIO | None = None) -> None:
        self.config = config
        self.accumulator = GradientAccumulator(config)
        self.logger = self.accumulator.logger
        self.progress_stream = progress_stream
        self.model: torch.nn.Module | None = None
        self.optimizer: AccumulatingOptimizer | None = None  # the wrapper around the user's optimizer
        self.scheduler: Any = None
        self.criterion: Callable[[Any, Any], Tensor] | None = None
        self.device = torch.device("cpu")
        self.current_epoch = 0
        self.training_history: list[dict[str, Any]] = []
        self._resume: dict[str, Any] | None = None
        self._pos = 0  # batches consumed in the current epoch
        self._epoch_rng: dict[str, Any] | None = None  # the RNG state the epoch's data order is drawn from
        self._ep: dict[str, Any] = dict(_NEW_EPOCH)  # the open epoch's totals

    def setup_training(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       criterion: Callable[[Any, Any], Tensor], scheduler: Any = None) -> None:
        """Move the model to the device, wrap the optimizer (the plain torch one) and clear its gradients; the
        scheduler is stepped once per real update. A device this machine lacks raises ``ValueError``."""
        if not callable(criterion):
            raise TypeError(f"Invalid criterion: {type(criterion).__name__} (expected a callable loss)")
        device = self._device()
        model.to(device)
        for st in optimizer.state.values():  # state from an earlier run, if any
            st.update({k: v.to(device) for k, v in st.items() if isinstance(v, Tensor) and v.ndim})
        self.accumulator.setup(model, optimizer, scheduler)
        self.model, self.optimizer, self.scheduler = model, self.accumulator.optimizer, scheduler
        self.criterion, self.device = criterion, device

    def _device(self) -> torch.device:
        """The configured device (default: cuda if available), checked to exist here."""
        name = self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(name)  # the config checked that torch parses it
        if device.type == "cuda":
            check_cuda_present(name, device)
        elif device.type != "cpu":
            try:
                torch.empty(0, device=device)
            except (RuntimeError, AssertionError) as e:
                why = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
                raise ValueError(f"Invalid device: {name!r} (no {device.type} device on this machine: {why})") from None
        return device

    def _parts(self) -> tuple[torch.nn.Module, AccumulatingOptimizer, Callable[[Any, Any], Tensor]]:
        if self.model is None or self.optimizer is None or self.criterion is None:
            raise RuntimeError("Trainer is not set up: call setup_training(model, optimizer, criterion) first")
        return self.model, self.optimizer, self.criterion

    def _forward(self, data: Any, target: Any) -> tuple[Any, Tensor]:
        """The output and loss of a batch (moved to the device here), under autocast with ``mixed_precision``."""
        model, _, criterion = self._parts()
        data, target = _to(data, self.device), _to(target, self.device)
        mp = self.config.mixed_precision
        autocast: ContextManager[Any] = contextlib.nullcontext() if mp is None \
            else torch.autocast(self.device.type, dtype=getattr(torch, mp))
        with autocast:
            output = model(data)
            return output, criterion(output, target)

    def train_step(self, data_batch: Any, target_batch: Any) -> dict[str, Any]:
        """One micro-batch weighted by its sample count; returns the accumulator's dict plus ``output_shape``,
        ``target_shape``, ``num_samples`` and ``loss_samples`` (the samples ``loss`` averages over)."""
        self._parts()
        n = batch_size_of(target_batch)
        if self.config.strategy is AccumulationStrategy.MEMORY_AWARE:
            # The batches stay where the loader put them until the MicroBatcher moves each micro-batch.
            result = self.accumulator.accumulate_batch((data_batch, target_batch), self._micro_loss)
            loss_samples, output_shape = result.pop("window_samples"), None
        else:
            output, loss = self._forward(data_batch, target_batch)
            result = self.accumulator.accumulate_gradients(loss, weight=n, num_samples=n)
            self.accumulator.zero_grad()
            loss_samples, output_shape = n, getattr(output, "shape", None)
        result.update(num_samples=n, loss_samples=loss_samples, output_shape=output_shape,
                      target_shape=getattr(target_batch, "shape", None))
        return result

    def _micro_loss(self, micro: Batch) -> Tensor:
        """MEMORY_AWARE: the mean loss of one micro-batch ``(data, target)``."""
        return self._forward(*micro)[1]

    def train_epoch(self, train_loader: Iterable[Any]) -> dict[str, Any]:
        """Train one epoch and apply its last partial window; returns the epoch's record (``docs/configuration.md``)."""
        model, opt, _ = self._parts()
        model.train()
        acc = self.accumulator
        if opt.pending == 0 and acc.pending_batches == 0:
            opt.zero_grad(set_to_none=True)  # nothing of a window lives in .grad now
        acc.set_epoch(self.current_epoch)
        resume, self._resume = self._resume, None
        if resume is None:
            self._epoch_rng, self._pos = _get_rng(), 0
        it = iter(train_loader)
        if resume is not None:
            for _ in range(self._pos):  # the same batches in the same order, skipped
                next(it)
            _set_rng(resume["rng"])
        bar = self._open_bar(len(train_loader) if isinstance(train_loader, Sized) else None, self._pos)
        ep = self._ep = {**_NEW_EPOCH, **{k: v for k, v in (resume or {}).items() if k in _NEW_EPOCH}}
        t0, t_samples = time.perf_counter(), 0
        for data_batch, target_batch in it:
            m = self.train_step(data_batch, target_batch)
            self._pos += 1
            if m["loss"] is not None:  # (None: MEMORY_AWARE holds the batch until its window runs)
                self._add_loss(ep, m["loss"], m["loss_samples"])
            ep["samples"] += m["num_samples"]
            t_samples += m["num_samples"]
            if bar is not None:
                bar.update(1)
            if m["should_optimize"]:
                sps = t_samples / max(time.perf_counter() - t0, 1e-9)
                self._on_update(bar, m["applied"], m["effective_batch_size"], sps)
        if opt.pending or acc.pending_batches:  # the last, partial window: weighted by what it saw
            held = acc.pending_batches
            applied = acc.flush(loss_fn=self._micro_loss)
            if held and acc.last_window_loss is not None:  # MEMORY_AWARE: the held batches ran now
                self._add_loss(ep, *acc.last_window_loss)
            sps = t_samples / max(time.perf_counter() - t0, 1e-9)
            self._on_update(bar, applied, acc.effective_batch_size, sps, force=True)
        elapsed = time.perf_counter() - t0
        total = ep["loss_sum"]  # a device value once a loss was added: the epoch's one sync
        epoch_loss = float(total / ep["loss_count"]) if isinstance(total, Tensor) else float("nan")
        record = {"epoch": self.current_epoch, "epoch_loss": epoch_loss, "num_batches": self._pos,
                  "num_samples": ep["samples"], "optimization_steps": ep["updates"],
                  "accumulation_steps": opt.accumulation_steps, "effective_batch_size": ep["batch"],
                  "lr": float(opt.param_groups[0]["lr"]), "time": elapsed,
                  "samples_per_second": t_samples / elapsed if elapsed > 0 else 0.0}
        if bar is not None:
            bar.set_postfix_str(self._postfix(epoch_loss, record["samples_per_second"]))
            bar.close()
        self._pos, self._ep = 0, dict(_NEW_EPOCH)
        return record

    def _add_loss(self, ep: dict[str, Any], loss: Tensor, samples: int) -> None:
        """Add a mean loss over ``samples`` samples to the epoch's sums on the device (``nan_handling``: if finite)."""
        value: Tensor = loss.detach().to(torch.promote_types(loss.dtype, torch.float32))  # fp16/bf16 sums in fp32
        count: Tensor | int = samples
        if self.config.nan_handling:  # a non-finite loss counts for nothing (on the device: no sync)
            keep = torch.isfinite(value)
            value, count = torch.where(keep, value, torch.zeros_like(value)), keep.to(value.dtype) * samples
        ep["loss_sum"] = ep["loss_sum"] + value * samples
        ep["loss_count"] = ep["loss_count"] + count

    def _postfix(self, loss: float | None, sps: float) -> str:
        _, opt, _ = self._parts()
        loss_text = "n/a" if loss is None else f"{loss:.4f}"
        return (f"loss={loss_text}, lr={float(opt.param_groups[0]['lr']):.3g}, K={opt.accumulation_steps}, "
                f"{sps:.0f} samples/s")

    def _open_bar(self, total: int | None, initial: int) -> Any:
        """A tqdm bar, or None: no tqdm, ``progress_bar=False``, or ``None`` off a terminal (``disable=None``)."""
        tqdm = None if self.config.progress_bar is False else _tqdm()
        if tqdm is None:
            return None
        bar = tqdm(total=total, initial=initial, desc=f"epoch {self.current_epoch}", unit="batch", leave=True,
                   file=self.progress_stream or sys.stderr, dynamic_ncols=True,
                   disable=None if self.config.progress_bar is None else False)
        return None if getattr(bar, "disable", False) else bar

    def _on_update(self, bar: Any, applied: bool, batch: int | None, sps: float, force: bool = False) -> None:
        """A window closed: count it, refresh the bar (every ``logging_frequency`` updates), checkpoint if due."""
        _, opt, _ = self._parts()
        cfg, n = self.config, opt.num_updates
        self._ep["updates"] += 1
        self._ep["batch"] = max(self._ep["batch"], batch or 0)
        if bar is not None and (force or (applied and (n % cfg.logging_frequency == 0 or n == 1))):
            bar.set_postfix_str(self._postfix(opt.stats()["last_loss"], sps))  # the one sync of this update
        if applied and cfg.checkpoint_every and cfg.checkpoint_path and n % cfg.checkpoint_every == 0:
            self.save_checkpoint(cfg.checkpoint_path)

    def train(self, train_loader: Iterable[Any], num_epochs: int = 1, *,
              resume_from: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
        """Train ``num_epochs`` epochs (continuing from a checkpoint file if given); returns the history."""
        self._parts()
        check_int("num_epochs", num_epochs)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        while self.current_epoch < num_epochs:
            record = self.train_epoch(train_loader)
            self.training_history.append(record)
            self.logger.info("epoch %d: loss %.4g, %d updates, %s samples per update", record["epoch"],
                             record["epoch_loss"], record["optimization_steps"], record["effective_batch_size"])
            self.current_epoch += 1
        return self.training_history

    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Write model, optimizer, accumulation, scheduler, RNG and epoch position atomically (``opt.save``)."""
        model, _, _ = self._parts()
        trainer = {"epoch": self.current_epoch, "position": self._pos, "epoch_rng": self._epoch_rng, "rng": _get_rng(),
                   "history": [dict(h) for h in self.training_history], "epoch_progress": dict(self._ep)}
        self.accumulator.save_accumulation_state(path, extra={"model": model.state_dict(), "trainer": trainer})

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore :meth:`save_checkpoint`; training continues where it stopped (bit-identically)."""
        model, _, _ = self._parts()
        acc_state, extra = read_accumulation_file(path, self.device)  # read only: each part is checked first
        extra = extra if isinstance(extra, dict) else {}
        state, theirs, ours = extra.get("trainer"), extra.get("model"), model.state_dict()
        if not (isinstance(state, dict) and {"epoch", "position", "epoch_rng", "rng", "history", "epoch_progress"}
                <= set(state) and isinstance(theirs, dict) and theirs.keys() == ours.keys()
                and all(getattr(theirs[k], "shape", None) == getattr(v, "shape", None) for k, v in ours.items())):
            raise ValueError(f"Invalid checkpoint file {os.fspath(path)!r}: not a trainer checkpoint of this model "
                             "(expected a file of GradientAccumulationTrainer.save_checkpoint() with the same model)")
        self.accumulator.load_state_dict(acc_state)  # checks the configuration, then the wrapper's part
        model.load_state_dict(theirs)
        self.current_epoch, self._pos = int(state["epoch"]), int(state["position"])
        self.training_history = list(state["history"])
        if self._pos:  # mid-epoch: draw the epoch's data order again, then continue from the saved RNG state
            self._epoch_rng, self._resume = state["epoch_rng"], {"rng": state["rng"], **state["epoch_progress"]}
        _set_rng(state["epoch_rng"] if self._pos else state["rng"])
