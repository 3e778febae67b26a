"""``GradientAccumulationTrainer``: a small training loop over :class:`GradientAccumulator`.

What it adds to the accumulator: device placement, mixed precision (autocast;
a GradScaler for float16), a progress bar (tqdm when installed, the ``progress``
extra; plain lines otherwise) showing loss, LR, K and samples per second, the
last partial window of every epoch applied with sample-count weights, a
per-epoch history, and checkpoints every N real updates that resume
bit-identically (model, optimizer, accumulation, scheduler, RNG and the
position in the epoch).

Host syncs: one per displayed progress update (every ``logging_frequency``
real updates) and one per epoch (the epoch's mean loss); none on a micro-step
that does not update. With ``nan_handling`` a non-finite micro-batch loss is left
out of the epoch's mean on the device (``torch.where``), without a sync.

Gradients: :meth:`GradientAccumulationTrainer.setup_training`, and the start of
every epoch that begins with no window pending, clear the gradients of the
optimizer's parameters (``set_to_none``), as the reference loops'
``optimizer.zero_grad()``: a ``.grad`` left from before never enters an update.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Iterable, TextIO

import torch
from torch import Tensor

from ._checks import check_cuda_present
from .accumulator import GradientAccumulator
from .checkpoint import atomic_save
from .config import AccumulationStrategy, GradientAccumulationConfig

__all__ = ["GradientAccumulationTrainer"]

_CKPT_FORMAT = "accumopt.GradientAccumulationTrainer"
_NEW_EPOCH = {"loss_sum": 0.0, "loss_count": 0, "samples": 0, "updates": 0, "batch": 0}  # an epoch's totals


def _tqdm() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


def _fmt_lr(lr: Any) -> str:
    return f"{float(lr):.3g}"


def _batch_len(x: Any) -> int:
    if isinstance(x, Tensor):
        return int(x.shape[0]) if x.ndim else 1
    return len(x)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


class GradientAccumulationTrainer:
    """Train a model with gradient accumulation configured by a :class:`GradientAccumulationConfig`.

    Args:
        config: the configuration (``device``, ``mixed_precision``, ``progress_bar``,
            ``checkpoint_every``/``checkpoint_path`` and ``logging_frequency`` are read here).
        progress_stream: where progress goes (default ``sys.stderr``).
    """

    def __init__(self, config: GradientAccumulationConfig, *, progress_stream: TextIO | None = None) -> None:
        self.config = config
        self.accumulator = GradientAccumulator(config)
        self.logger = self.accumulator.logger
        self.progress_stream = progress_stream
        self.model: torch.nn.Module | None = None
        self.optimizer: Any = None  # the AccumulatingOptimizer around the user's optimizer
        self.scheduler: Any = None
        self.criterion: Any = None
        self.device: torch.device | None = None
        self.current_epoch = 0
        self.training_history: list[dict[str, Any]] = []
        self._resume: dict[str, Any] | None = None
        self._pos = 0  # batches consumed in the current epoch
        self._epoch_rng: Tensor | None = None
        self._epoch_cuda_rng: list[Tensor] | None = None
        self._ep: dict[str, Any] = dict(_NEW_EPOCH)  # the open epoch's totals

    # ------------------------------------------------------------------ setup
    def setup_training(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, criterion: Any,
                       scheduler: Any = None) -> None:
        """Move the model to the device and wrap the optimizer (pass the plain torch one).

        The scheduler is stepped once per real update. The gradients of the optimizer's
        parameters are cleared (``set_to_none``): a ``.grad`` from before training (an
        earlier backward) never enters the first update.

        Raises:
            ValueError: the configured device does not exist on this machine.
        """
        if not callable(criterion):
            raise TypeError(f"Invalid criterion: {type(criterion).__name__} (expected a callable loss)")
        device = self._device()
        model.to(device)
        for st in optimizer.state.values():  # state from an earlier run, if any
            for k, v in list(st.items()):
                if isinstance(v, Tensor) and v.ndim:
                    st[k] = v.to(device)
        self.accumulator.setup(model, optimizer, scheduler)
        self.model, self.optimizer, self.scheduler = model, self.accumulator.optimizer, scheduler
        self.criterion, self.device = criterion, device

    def _device(self) -> torch.device:
        """The configured device (default: cuda if available), checked to exist here."""
        name = self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"Invalid device: {name!r} (expected a torch device string such as 'cpu' or "
                             "'cuda')") from None
        if device.type == "cuda":
            check_cuda_present(name, device)
        elif device.type != "cpu":
            try:
                torch.empty(0, device=device)
            except (RuntimeError, AssertionError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
                raise ValueError(f"Invalid device: {name!r} (no {device.type} device on this machine: {first})") from None
        return device

    def _require(self) -> None:
        if self.model is None:
            raise RuntimeError("Trainer is not set up: call setup_training(model, optimizer, criterion) first")

    def _autocast(self) -> Any:
        mp = self.config.mixed_precision
        if mp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, mp))

    def _forward(self, data: Any, target: Any) -> tuple[Any, Tensor]:
        with self._autocast():
            output = self.model(data)
            loss = self.criterion(output, target)
        return output, loss

    # ------------------------------------------------------------------- step
    def train_step(self, data_batch: Any, target_batch: Any) -> dict[str, Any]:
        """One micro-batch: forward, backward, accumulate (and update at the window's end).

        The micro-batch counts by its sample count, so a short last batch is
        weighted exactly. Returns the accumulator's dict plus shapes, ``num_samples`` and
        ``loss_samples`` (the samples ``loss`` averages over); ``loss`` is a 0-dim device
        tensor (not synced). With ``strategy=MEMORY_AWARE`` the batch is held until its
        window's K-th batch, which runs the window through :class:`~accumopt.MicroBatcher`
        (``loss`` is None before, then the window's mean loss).
        """
        self._require()
        if self.config.strategy is AccumulationStrategy.MEMORY_AWARE:
            # The window's loader batches run through accumopt.MicroBatcher (micro-batches that fit,
            # out-of-memory recovery); they stay where the loader put them until then.
            n = _batch_len(target_batch)
            result = self.accumulator.accumulate_batch((data_batch, target_batch), self._micro_loss)
            result.update(num_samples=n, loss_samples=result.pop("window_samples"), output_shape=None,
                          target_shape=getattr(target_batch, "shape", None))
            return result
        data_batch = _to(data_batch, self.device)
        target_batch = _to(target_batch, self.device)
        n = _batch_len(target_batch)
        output, loss = self._forward(data_batch, target_batch)
        result = self.accumulator.accumulate_gradients(loss, weight=n, num_samples=n)
        self.accumulator.zero_grad()
        result.update(num_samples=n, loss_samples=n, output_shape=getattr(output, "shape", None),
                      target_shape=getattr(target_batch, "shape", None))
        return result

    def _micro_loss(self, micro: Any) -> Tensor:
        """MEMORY_AWARE: the mean loss of one micro-batch ``(data, target)`` (moved to the device here)."""
        data, target = micro
        return self._forward(_to(data, self.device), _to(target, self.device))[1]

    # ------------------------------------------------------------------ epoch
    def train_epoch(self, train_loader: Iterable) -> dict[str, Any]:
        """Train one epoch; the last partial window is applied at its end. Returns the epoch's record.

        Starting with no window pending, the optimizer's gradients are cleared first (``set_to_none``).
        ``epoch_loss`` is the sample-weighted mean loss; with ``nan_handling`` non-finite micro-batch
        losses (a dropped or skipped micro-batch) are left out of it. ``effective_batch_size`` is the
        largest number of samples one update of the epoch used (a short last window uses fewer).
        """
        self._require()
        self.model.train()
        acc, cfg = self.accumulator, self.config
        if acc.optimizer.pending == 0 and acc.pending_batches == 0:
            acc.optimizer.zero_grad(set_to_none=True)  # nothing of a window lives in .grad now
        acc.set_epoch(self.current_epoch)
        try:
            num_batches = len(train_loader)  # type: ignore[arg-type]
        except TypeError:
            num_batches = None
        resume, self._resume = self._resume, None
        if resume is None:
            self._epoch_rng = torch.get_rng_state()
            self._epoch_cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            self._pos = 0
        it = iter(train_loader)
        if resume is not None:
            for _ in range(self._pos):  # the same batches in the same order, skipped
                next(it)
            torch.set_rng_state(resume["rng"])
            if resume.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(resume["cuda_rng"])
        bar = self._open_bar(num_batches, self._pos)
        ep = self._ep = dict(_NEW_EPOCH)
        if resume is not None:
            ep.update({k: resume[k] for k in _NEW_EPOCH if k in resume})
            if "loss_count" not in resume:  # a checkpoint from before the count was kept
                ep["loss_count"] = ep["samples"]
        t0 = time.perf_counter()
        t_samples = 0
        last = {"loss": None, "k": acc.optimizer.accumulation_steps}
        window: list[Tensor | float] = [0.0, 0]
        for data_batch, target_batch in it:
            m = self.train_step(data_batch, target_batch)
            self._pos += 1
            n, ls = m["num_samples"], m["loss_samples"]  # ls: samples that m["loss"] averages over
            if m["loss"] is not None:  # (None: MEMORY_AWARE holds the batch until its window runs)
                self._add_loss(ep, window, m["loss"], ls)
            ep["samples"] += n
            t_samples += n
            if bar is not None:
                bar.update(1)
            if m["should_optimize"]:
                ep["updates"] += 1
                ep["batch"] = max(ep["batch"], m["effective_batch_size"] or 0)
                last = {"loss": window[0] / window[1], "k": m["accumulation_steps"]}
                window = [0.0, 0]
                self._on_update(bar, last, t_samples / max(time.perf_counter() - t0, 1e-9), num_batches)
        if acc.state.accumulation_step:  # the last, partial window: weighted by what it saw
            k = acc.optimizer.accumulation_steps
            held = acc.pending_batches
            acc.flush(loss_fn=self._micro_loss)
            if held:  # MEMORY_AWARE: the held batches ran now
                loss, ls = acc.last_window_loss
                self._add_loss(ep, window, loss, ls)
            ep["updates"] += 1
            ep["batch"] = max(ep["batch"], acc.state.effective_batch_size or 0)
            last = {"loss": window[0] / (window[1] if isinstance(window[1], Tensor) else max(window[1], 1)), "k": k}
            self._on_update(bar, last, t_samples / max(time.perf_counter() - t0, 1e-9), num_batches, force=True)
        elapsed = time.perf_counter() - t0
        samples, updates = ep["samples"], ep["updates"]
        count = ep["loss_count"]
        # The epoch's one sync (with nan_handling the count of finite-loss samples is a device value).
        epoch_loss = float(ep["loss_sum"] / count) if isinstance(count, Tensor) or count else float("nan")
        record = {
            "epoch": self.current_epoch,
            "epoch_loss": epoch_loss,
            "num_batches": self._pos,
            "num_samples": samples,
            "optimization_steps": updates,
            "accumulation_steps": acc.optimizer.accumulation_steps,
            "effective_batch_size": ep["batch"] or acc.state.effective_batch_size,
            "lr": float(acc.optimizer.optimizer.param_groups[0]["lr"]),
            "time": elapsed,
            "samples_per_second": t_samples / elapsed if elapsed > 0 else 0.0,
        }
        if bar is not None:
            bar.set_postfix_str(self._postfix(epoch_loss, record["accumulation_steps"], record["samples_per_second"]))
            bar.close()
        elif cfg.progress_bar is not False:
            self._line(f"epoch {self.current_epoch}: loss {epoch_loss:.4f}, {updates} updates, "
                       f"{record['samples_per_second']:.0f} samples/s")
        self._pos = 0
        self._ep = dict(_NEW_EPOCH)
        return record

    def _add_loss(self, ep: dict[str, Any], window: list[Any], loss: Tensor, samples: int) -> None:
        """Add a micro-batch's mean loss (``samples`` samples) to the epoch's and the window's sums, on the device.

        With ``nan_handling`` a non-finite loss (a micro-batch the wrapper drops or skips) counts
        neither in the sum nor in the sample count: ``torch.where``, no host sync.
        """
        loss = loss.detach()
        loss32 = loss.float()
        if self.config.nan_handling:
            finite = torch.isfinite(loss32)
            zero = torch.zeros_like(loss32)
            ep["loss_sum"] = ep["loss_sum"] + torch.where(finite, loss32 * samples, zero)
            ep["loss_count"] = ep["loss_count"] + finite.to(loss32.dtype) * samples
            window[0] = window[0] + torch.where(finite, loss * samples, torch.zeros_like(loss))
            window[1] = window[1] + finite.to(loss.dtype) * samples
        else:
            ep["loss_sum"] = ep["loss_sum"] + loss32 * samples
            ep["loss_count"] = ep["loss_count"] + samples
            window[0] = window[0] + loss * samples
            window[1] = window[1] + samples

    def _postfix(self, loss: Any, k: int, sps: float) -> str:
        lr = _fmt_lr(self.optimizer.optimizer.param_groups[0]["lr"])
        return f"loss={float(loss):.4f}, lr={lr}, K={k}, {sps:.0f} samples/s"

    def _line(self, text: str) -> None:
        print(text, file=self.progress_stream or sys.stderr, flush=True)

    def _open_bar(self, total: int | None, initial: int) -> Any:
        if self.config.progress_bar is False:
            return None
        tqdm = _tqdm()
        if tqdm is None:
            return None
        return tqdm(total=total, initial=initial, desc=f"epoch {self.current_epoch}", unit="batch",
                    file=self.progress_stream or sys.stderr, leave=True, dynamic_ncols=True)

    def _on_update(self, bar: Any, last: dict, sps: float, num_batches: int | None, force: bool = False) -> None:
        cfg = self.config
        st = self.accumulator.state
        n = st.total_optimizer_steps + st.skipped_optimizer_steps  # windows closed so far
        if cfg.progress_bar is not False and (force or n % cfg.logging_frequency == 0 or n == 1):
            text = self._postfix(last["loss"], last["k"], sps)  # one sync (the loss), every logging_frequency updates
            if bar is not None:
                bar.set_postfix_str(text)
            else:
                where = f"{self._pos}/{num_batches}" if num_batches else f"{self._pos}"
                self._line(f"epoch {self.current_epoch} batch {where} update {n}: {text}")
        every = cfg.checkpoint_every
        if every and n % every == 0:
            self.save_checkpoint(cfg.checkpoint_path)

    # ------------------------------------------------------------------ train
    def train(self, train_loader: Iterable, num_epochs: int = 1, *, resume_from: str | os.PathLike | None = None) -> list[dict[str, Any]]:
        """Train ``num_epochs`` epochs (continuing from a checkpoint file if given); returns the history."""
        from ._checks import check_int

        self._require()
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

    # ------------------------------------------------------------- checkpoint
    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write model, optimizer, accumulation, scheduler, RNG and epoch position atomically."""
        self._require()
        state = {
            "format": _CKPT_FORMAT,
            "version": 1,
            "model": self.model.state_dict(),
            "accumulator": self.accumulator.state_dict(),
            "epoch": self.current_epoch,
            "position": self._pos,
            "epoch_rng": self._epoch_rng,
            "epoch_cuda_rng": self._epoch_cuda_rng,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "history": [dict(h) for h in self.training_history],
            "epoch_progress": dict(self._ep),
        }
        atomic_save(state, path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore :meth:`save_checkpoint`; training continues where it stopped (bit-identically)."""
        self._require()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"Invalid checkpoint file {os.fspath(path)!r}: {e}") from e
        if not isinstance(state, dict) or state.get("format") != _CKPT_FORMAT:
            raise ValueError(f"Invalid checkpoint file {os.fspath(path)!r}: not a trainer checkpoint")
        self.accumulator.load_state_dict(state["accumulator"])  # validates first: raises before any change
        self.model.load_state_dict(state["model"])
        self.current_epoch = int(state["epoch"])
        self.training_history = list(state["history"])
        self._pos = int(state["position"])
        if self._pos:
            torch.set_rng_state(state["epoch_rng"])  # the epoch's data order is drawn from here
            if state.get("epoch_cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["epoch_cuda_rng"])
            self._epoch_rng, self._epoch_cuda_rng = state["epoch_rng"], state.get("epoch_cuda_rng")
            self._resume = {"rng": state["rng"], "cuda_rng": state.get("cuda_rng"), **state["epoch_progress"]}
        else:
            torch.set_rng_state(state["rng"])
