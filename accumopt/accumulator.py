"""``GradientAccumulator``: the documented (seed) API over :class:`~accumopt.AccumulatingOptimizer`.

A thin layer: it builds one wrapper from a :class:`GradientAccumulationConfig`
and forwards to it. Nothing here touches gradients itself; averaging, weights,
clipping, non-finite policies and the loss scale all live in the wrapper.

Host synchronisation: :meth:`GradientAccumulator.accumulate_gradients` never
reads a device value on a micro-step that does not update. Its ``"loss"`` and
``"accumulated_loss"`` entries are detached 0-dim tensors on the loss's device
(``float(x)`` or ``f"{x:.4f}"`` reads them when you want a number).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .adaptive import AdaptiveK
from .checkpoint import atomic_save
from .config import AccumulationMode, AccumulationStrategy, GradientAccumulationConfig
from .optimizer import AccumulatingOptimizer
from .splitting import MemoryMonitor, MicroBatcher, batch_size_of

__all__ = ["AccumulationState", "GradientAccumulator", "memory_fraction"]

_FORMAT = "accumopt.GradientAccumulator"
# Config keys that do not change what the saved state means (may differ on load).
_COSMETIC = {"logging_frequency", "device", "progress_bar", "checkpoint_every", "checkpoint_path",
             "memory_monitoring", "memory_threshold"}


def memory_fraction(device: torch.device | str) -> float:
    """Used fraction of ``device``'s memory: CUDA allocated / total, or process RSS / RAM on CPU.

    The readings of :class:`~accumopt.MemoryMonitor`: host-side queries only (no device synchronisation).
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")
    monitor = MemoryMonitor(device)
    total = monitor.total()
    return monitor.used() / total if total else 0.0


def _cat(batches: list[Any]) -> Any:
    """Concatenate loader batches along the batch dimension (tensors, nested tuples/lists/dicts, str lists)."""
    first = batches[0]
    if len(batches) == 1:
        return first
    if isinstance(first, Tensor):
        return torch.cat(batches) if first.dim() > 0 else first
    if isinstance(first, Mapping):
        out = {k: _cat([b[k] for b in batches]) for k in first}
        return out if type(first) is dict else type(first)(out)
    if isinstance(first, (list, tuple)):
        if first and all(isinstance(v, str) for v in first):
            return [v for b in batches for v in b]
        items = [_cat([b[i] for b in batches]) for i in range(len(first))]
        if hasattr(first, "_fields"):
            return type(first)(*items)
        return type(first)(items)
    return first  # shared leaf (a number, None): the same in every batch


@dataclass(frozen=True)
class AccumulationState:
    """A read-only snapshot of the accumulation counters (host values; no sync to build).

    Attributes:
        total_steps: micro-batches accumulated so far.
        accumulation_step: micro-batches in the current (open) window.
        accumulation_steps: K of the current window.
        total_optimizer_steps: real updates applied.
        skipped_optimizer_steps: windows closed without an update (non-finite or overflow).
        last_optimizer_step: ``total_steps`` at the last closed window.
        effective_batch_size: samples per update (K x micro-batch size), None if unknown.
        accumulated_loss: the current window's summed loss, a 0-dim device tensor (None if empty).
        memory_usage: memory fractions recorded at real updates (``memory_monitoring=True``).
        epoch: the epoch the K schedule is at.
    """

    total_steps: int
    accumulation_step: int
    accumulation_steps: int
    total_optimizer_steps: int
    skipped_optimizer_steps: int
    last_optimizer_step: int
    effective_batch_size: int | None
    accumulated_loss: Tensor | None
    memory_usage: tuple[float, ...]
    epoch: int


class GradientAccumulator:
    """Gradient accumulation driven by a :class:`GradientAccumulationConfig`.

    ``GradientAccumulator(config)`` then :meth:`setup` (or pass ``model`` and
    ``optimizer`` here). Per micro-batch, :meth:`accumulate_gradients` runs the
    backward pass and hands the micro-step to the wrapper, which applies the
    real update at the end of each window. Call :meth:`flush` at the end of the
    data to apply the last, partial window.

    Args:
        config: the configuration.
        model: the model (names for layer weights; DDP/FSDP sync).
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters.
        scheduler: an LR scheduler, stepped once per real update.
    """

    def __init__(self, config: GradientAccumulationConfig, model: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> None:
        if not isinstance(config, GradientAccumulationConfig):
            raise TypeError(f"Invalid config: {type(config).__name__} (expected a GradientAccumulationConfig)")
        self.config = config
        self.logger = logging.getLogger("accumopt")
        self.model: torch.nn.Module | None = None
        self.optimizer: AccumulatingOptimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.device: torch.device | None = None
        self.adaptive: AdaptiveK | None = None
        self.batcher: MicroBatcher | None = None
        self._reset_counters()
        if (model is None) != (optimizer is None):
            raise ValueError("Invalid arguments: give both model and optimizer, or neither (then call setup())")
        if model is not None:
            self.setup(model, optimizer, scheduler)

    def _reset_counters(self) -> None:
        self._micro_steps = 0
        self._last_update_at = 0
        self._window_loss: Tensor | None = None
        self._memory: list[float] = []
        self._micro_batch: float | None = None
        self._lr_saved: list[Any] | None = None
        self._over = False
        self._pending: list[Any] = []  # MEMORY_AWARE: loader batches of the open window
        self._loss_fn: Callable[[Any], Tensor] | None = None
        self._batcher_state: dict[str, Any] | None = None
        self.last_window_loss: tuple[Tensor, int] | None = None  # MEMORY_AWARE: (mean loss, samples)

    # ------------------------------------------------------------------ setup
    def setup(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None,
              scaler: "torch.amp.GradScaler | None" = None) -> "GradientAccumulator":
        """Bind to a model and optimizer (the optimizer is wrapped; pass the plain one).

        A GradScaler is created when ``mixed_precision="float16"`` and
        ``gradient_scaling=True`` (unless ``scaler`` is given).
        """
        cfg = self.config
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Invalid model: {type(model).__name__} (expected a torch.nn.Module)")
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        if scaler is None and cfg.mixed_precision == "float16" and cfg.gradient_scaling:
            scaler = torch.amp.GradScaler(device.type)
        steps: Any = cfg.k_schedule  # ADAPTIVE: an AdaptiveK reading the wrapper's noise scale
        wrapper = AccumulatingOptimizer(optimizer, steps, model=model, scheduler=scheduler, scaler=scaler,
                                        track_grad_norm=True, **cfg.optimizer_kwargs())
        self.model, self.optimizer, self.scaler, self.device = model, wrapper, scaler, device
        self.scheduler = scheduler
        self.adaptive: AdaptiveK | None = steps if isinstance(steps, AdaptiveK) else None
        self.batcher: MicroBatcher | None = None  # MEMORY_AWARE: built on the first accumulate_batch()
        self._reset_counters()
        if cfg.progressive_scaling and cfg.mode in (AccumulationMode.PROGRESSIVE, AccumulationMode.ADAPTIVE):
            wrapper.optimizer.register_step_pre_hook(self._scale_lr)
            wrapper.optimizer.register_step_post_hook(self._restore_lr)
        return self

    def _require(self) -> AccumulatingOptimizer:
        if self.optimizer is None:
            raise RuntimeError("GradientAccumulator is not set up: call setup(model, optimizer) first")
        return self.optimizer

    def _set_noise_unit(self, weight: Any) -> None:
        """ADAPTIVE: the wrapper's noise scale is in weight units; tell AdaptiveK one micro-batch's weight."""
        if self.adaptive is None:
            return
        if weight is None:
            self.adaptive.micro_batch_size = 1.0  # weights 1: the noise scale is in micro-batches
        elif isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0:
            self.adaptive.micro_batch_size = float(weight)  # samples per micro-batch
        # (a tensor weight: keep the last known unit; reading it would sync)

    # ---------------------------------------------------------------- LR rule
    def lr_factor(self, k: int | None = None) -> float:
        """progressive_scaling: LR multiplier for a window of K micro-batches (``lr_scaling_rule`` of K / K0)."""
        k = self._require().accumulation_steps if k is None else k
        ratio = k / self.config.accumulation_steps
        return ratio if self.config.lr_scaling_rule == "linear" else math.sqrt(ratio)

    def _scale_lr(self, *_: Any) -> None:
        f = self.lr_factor()
        groups = self._require().optimizer.param_groups  # the wrapped optimizer's (current) list
        self._lr_saved = [g["lr"] for g in groups]
        if f != 1.0:
            for g in groups:
                g["lr"] = g["lr"] * f

    def _restore_lr(self, *_: Any) -> None:
        if self._lr_saved is not None:
            for g, lr in zip(self._require().optimizer.param_groups, self._lr_saved):
                g["lr"] = lr
            self._lr_saved = None

    # ------------------------------------------------------------- micro-step
    def backward(self, loss: Tensor, *, weight: "float | Tensor | None" = None) -> None:
        """Backward pass of one micro-batch: loss scale (fp16), sum factor (``loss_scaling=False``), weight."""
        opt = self._require()
        if opt.pending == 0:  # the window's first micro-batch fixes the noise scale's unit (ADAPTIVE)
            self._set_noise_unit(weight if self.config.loss_scaling else None)
        if not self.config.loss_scaling:
            # Sum, not mean: each micro-batch enters K times, the window divides by K.
            opt.backward(loss * opt.accumulation_steps)
        else:
            opt.backward(loss, weight=weight)

    def accumulate_gradients(self, loss: Tensor, backward: bool = True, *,
                             weight: "float | Tensor | None" = None) -> dict[str, Any]:
        """Accumulate one micro-batch; apply the real update when its window is complete.

        Args:
            loss: the micro-batch's plain mean loss (never divide it by K).
            backward: run the backward pass here. With ``backward=False`` you ran
                :meth:`backward` (or ``loss.backward()`` without a GradScaler) yourself.
            weight: how much this micro-batch counts (its sample count), a number or a
                0-dim device tensor; the update is ``sum(w_i g_i) / sum(w_i)``.
                Ignored with ``loss_scaling=False`` (a sum of per-micro-batch losses).

        Returns:
            ``loss`` and ``accumulated_loss`` (0-dim device tensors, not synced),
            ``accumulation_step`` (micro-batches in the window after this call, K when it
            closed), ``should_optimize`` (this call closed the window), ``applied``
            (an update was applied: False when it was skipped), ``accumulation_steps``
            (K of that window) and ``effective_batch_size`` (samples per update, or None).
        """
        opt = self._require()
        if not isinstance(loss, Tensor):
            raise TypeError(f"Invalid loss: {type(loss).__name__} (expected a torch.Tensor)")
        if self.config.loss_scaling is False:
            weight = None
        if not backward and weight is not None and opt.pending == 0:
            self._set_noise_unit(weight)  # (with backward=True, backward() does it)
        if backward:
            self.backward(loss, weight=weight)
            weight = None  # taken by backward(); the wrapper remembers it
        if isinstance(weight, (int, float)) and not isinstance(weight, bool):
            self._micro_batch = float(weight)
        k = opt.accumulation_steps
        detached = loss.detach()
        self._window_loss = detached if self._window_loss is None else self._window_loss + detached
        opt.step(weight=weight, loss=detached)
        self._micro_steps += 1
        closed = opt.pending == 0
        window_loss = self._window_loss
        if closed:
            self._after_update()
        return {
            "loss": detached,
            "accumulated_loss": window_loss,
            "accumulation_step": k if closed else opt.pending,
            "should_optimize": closed,
            "applied": closed and opt.stepped,
            "accumulation_steps": k,
            "effective_batch_size": self._effective_batch(k),
        }

    def _effective_batch(self, k: int) -> int | None:
        mb = self._micro_batch if self._micro_batch is not None else self.config.effective_batch_size
        return None if mb is None else int(round(k * mb))

    def _after_update(self) -> None:
        opt = self._require()
        self._window_loss = None
        self._last_update_at = self._micro_steps
        if self.config.memory_monitoring and self.device is not None:
            frac = memory_fraction(self.device)
            self._memory.append(frac)
            over = frac > self.config.memory_threshold
            if over and not self._over:  # warn when crossing the threshold, not at every update
                self.logger.warning("accumopt: memory use %.1f%% of %s is above memory_threshold=%.0f%%",
                                    100 * frac, self.device, 100 * self.config.memory_threshold)
            self._over = over
        n = opt.num_updates
        if n and n % self.config.logging_frequency == 0 and self.logger.isEnabledFor(logging.INFO):
            s = opt.stats()  # one sync, every logging_frequency updates, only when INFO logging is on
            self.logger.info("update %d: loss %s, K %d, grad norm %s", n, s.get("last_loss"),
                             opt.accumulation_steps, s.get("last_grad_norm"))

    # ------------------------------------------------------ memory-aware path
    @property
    def pending_batches(self) -> int:
        """Loader batches held for the open window by :meth:`accumulate_batch` (MEMORY_AWARE)."""
        return len(self._pending)

    def accumulate_batch(self, batch: Any, loss_fn: Callable[[Any], Tensor]) -> dict[str, Any]:
        """``strategy=MEMORY_AWARE``: add one loader batch to the window; run the window at its K-th batch.

        The window's K batches are concatenated (where the loader put them) and run by
        :class:`~accumopt.MicroBatcher` as one real update: micro-batches of the loader's
        batch size at first, halved on ``torch.OutOfMemoryError`` (only the failed
        micro-batch is redone), each weighted by its sample count, so the update is the
        large-batch update of the window's samples. ``memory_threshold`` is the MicroBatcher's
        ``memory_fraction``; ``adaptive_scaling`` lets the size grow back (``grow_after=50``).

        Args:
            batch: one loader batch (a tensor, or a tuple/list/dict of tensors sharing the
                leading dimension). Kept until the window runs.
            loss_fn: ``loss_fn(micro_batch) -> mean loss`` (runs the forward pass; move the
                micro-batch to the device there).

        Returns:
            The keys of :meth:`accumulate_gradients`, plus ``window_samples``. ``loss`` and
            ``accumulated_loss`` are None until the window runs, then the window's sample-mean
            loss (a detached device tensor, not synced).
        """
        opt = self._require()
        if self.config.strategy is not AccumulationStrategy.MEMORY_AWARE:
            raise RuntimeError("accumulate_batch needs strategy=AccumulationStrategy.MEMORY_AWARE "
                               f"(strategy is {self.config.strategy.name}); use accumulate_gradients(loss)")
        if not callable(loss_fn):
            raise TypeError(f"Invalid loss_fn: {loss_fn!r} (expected a callable micro_batch -> loss)")
        if opt.pending:
            raise RuntimeError(f"accumulate_batch: the window holds {opt.pending} micro-batches from "
                               "accumulate_gradients() (expected none: call flush() first)")
        batch_size_of(batch)  # validates the batch before keeping it
        self._pending.append(batch)
        self._loss_fn = loss_fn
        self._micro_steps += 1
        k = opt.accumulation_steps
        if len(self._pending) < k:
            return {"loss": None, "accumulated_loss": None, "accumulation_step": len(self._pending),
                    "should_optimize": False, "applied": False, "accumulation_steps": k,
                    "effective_batch_size": self._effective_batch(k), "window_samples": 0}
        loss, applied, samples = self._run_window()
        return {"loss": loss, "accumulated_loss": loss, "accumulation_step": k, "should_optimize": True,
                "applied": applied, "accumulation_steps": k, "effective_batch_size": self._effective_batch(k),
                "window_samples": samples}

    def _run_window(self, loss_fn: Callable[[Any], Tensor] | None = None) -> tuple[Tensor, bool, int]:
        """Run the held batches through the MicroBatcher: one real update."""
        opt, cfg = self._require(), self.config
        loss_fn = loss_fn or self._loss_fn
        if loss_fn is None:
            raise RuntimeError("flush: the window holds loader batches but no loss_fn is known "
                               "(pass flush(loss_fn=...) after loading a state)")
        batches, self._pending = self._pending, []
        first = batch_size_of(batches[0])
        if self.batcher is None:
            self.batcher = MicroBatcher(opt, first, grow_after=50 if cfg.adaptive_scaling else 0,
                                        memory_fraction=cfg.memory_threshold, device=self.device)
            if self._batcher_state is not None:
                self.batcher.load_state_dict(self._batcher_state)
        self._micro_batch = float(first)
        self._set_noise_unit(first)  # weights are sample counts
        fn = loss_fn
        if not cfg.loss_scaling:  # the sum of the K loader batches' mean gradients (exact for equal sizes)
            count = len(batches)
            fn = lambda micro: loss_fn(micro) * count  # noqa: E731
        batch = _cat(batches)
        loss = self.batcher.step(batch, fn)  # raises after discarding the window if even 1 sample fails
        samples = batch_size_of(batch)
        self.last_window_loss = (loss, samples)
        self._after_update()
        return loss, opt.stepped, samples

    def flush(self, *, loss_fn: Callable[[Any], Tensor] | None = None) -> bool:
        """Apply the open, partial window now (end of epoch or data).

        The update is the weighted mean over the micro-batches actually seen
        (with ``loss_scaling=False``: their sum). Returns whether an update was applied.
        ``loss_fn``: for batches held by :meth:`accumulate_batch` (default: the last one given).
        """
        opt = self._require()
        if self._pending:
            return self._run_window(loss_fn)[1]
        if opt.pending == 0:
            return False
        if not self.config.loss_scaling:
            # Each micro-batch entered K times; complete the window with empty micro-steps
            # (no gradient, weight 1) so that the division by K leaves the exact sum.
            while opt.pending:
                opt.step()
            applied = opt.stepped
        else:
            applied = opt.flush()
        self._after_update()
        return applied

    def set_epoch(self, epoch: int) -> None:
        """Tell the K schedule the epoch (``mode=PROGRESSIVE``; effective at the next window)."""
        self._require().set_epoch(epoch)

    def zero_grad(self) -> None:
        """Clear gradients outside the pending window (safe after every micro-batch)."""
        self._require().zero_grad()

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> AccumulationState:
        """A read-only snapshot of the counters."""
        opt = self._require()
        s = opt._stats
        return AccumulationState(
            total_steps=self._micro_steps,
            accumulation_step=len(self._pending) or opt.pending,
            accumulation_steps=opt.accumulation_steps,
            total_optimizer_steps=opt.num_updates,
            skipped_optimizer_steps=s.skipped,
            last_optimizer_step=self._last_update_at,
            effective_batch_size=self._effective_batch(opt.accumulation_steps),
            accumulated_loss=self._window_loss,
            memory_usage=tuple(self._memory),
            epoch=opt._window.epoch,
        )

    def get_accumulation_stats(self) -> dict[str, Any]:
        """Statistics (the seed's keys plus the wrapper's :meth:`~AccumulatingOptimizer.stats`). One sync."""
        opt = self._require()
        st = self.state
        s = opt.stats()
        nonfinite = s.get("nonfinite_events", 0) or 0
        skipped = s.get("skipped_updates", 0) or 0
        out = dict(s)
        out.update(
            current_step=st.total_steps,
            accumulation_step=st.accumulation_step,
            accumulation_steps=st.accumulation_steps,
            effective_batch_size=st.effective_batch_size,
            accumulated_loss=float(st.accumulated_loss) if st.accumulated_loss is not None else 0.0,
            average_gradient_norm=s.get("mean_grad_norm"),
            total_optimizer_steps=st.total_optimizer_steps,
            nan_detected=bool(nonfinite) or (self.scaler is None and skipped > 0),
            overflow_detected=self.scaler is not None and skipped > 0,
            memory_usage=st.memory_usage[-1] if st.memory_usage else None,
            mode=self.config.mode.name,
            strategy=self.config.strategy.name,
        )
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain data (loads with ``weights_only=True``): config as a dict, the wrapper's state, counters."""
        opt = self._require()
        return {
            "format": _FORMAT,
            "version": 1,
            "config": self.config.to_dict(),
            "optimizer": opt.state_dict(),
            "counters": {"micro_steps": self._micro_steps, "last_update_at": self._last_update_at,
                         "window_loss": self._window_loss, "memory": list(self._memory),
                         "micro_batch": self._micro_batch, "pending": list(self._pending),
                         "batcher": self.batcher.state_dict() if self.batcher is not None else self._batcher_state},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a file from another configuration raises ``ValueError``, changing nothing."""
        opt = self._require()
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError("Invalid accumulation state: not a GradientAccumulator state "
                             f"(expected format {_FORMAT!r})")
        for key in ("config", "optimizer", "counters"):
            if key not in state:
                raise ValueError(f"Invalid accumulation state: missing {key!r}")
        ours = self.config.to_dict()
        theirs = state["config"]
        differ = sorted(k for k in set(ours) | set(theirs) if k not in _COSMETIC and ours.get(k) != theirs.get(k))
        if differ:
            raise ValueError(
                f"Invalid accumulation state: saved with a different configuration ({', '.join(differ)}: "
                + "; ".join(f"{k} {theirs.get(k)!r} != {ours.get(k)!r}" for k in differ[:4]) + ")"
            )
        opt.load_state_dict(state["optimizer"])
        c = state["counters"]
        self._micro_steps = int(c["micro_steps"])
        self._last_update_at = int(c["last_update_at"])
        wl = c.get("window_loss")
        self._window_loss = wl.to(self.device) if isinstance(wl, Tensor) and self.device is not None else wl
        self._memory = [float(x) for x in c.get("memory", [])]
        self._micro_batch = c.get("micro_batch")
        pending = c.get("pending") or []
        self._pending = list(pending)
        self._batcher_state = c.get("batcher")
        if self.batcher is not None and self._batcher_state is not None:
            self.batcher.load_state_dict(self._batcher_state)

    def save_accumulation_state(self, filepath: str | os.PathLike) -> None:
        """Write :meth:`state_dict` atomically (temporary file, fsync, rename)."""
        atomic_save(self.state_dict(), filepath)
        self.logger.info("Accumulation state saved to %s", os.fspath(filepath))

    def load_accumulation_state(self, filepath: str | os.PathLike) -> None:
        """Load a file of :meth:`save_accumulation_state` with ``weights_only=True``."""
        try:
            state = torch.load(filepath, map_location=self.device or "cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"Invalid accumulation state file {os.fspath(filepath)!r}: {e}") from e
        self.load_state_dict(state)
        self.logger.info("Accumulation state loaded from %s", os.fspath(filepath))

    def __repr__(self) -> str:
        c = self.config
        return f"GradientAccumulator(mode={c.mode.name}, strategy={c.strategy.name}, K={c.accumulation_steps})"

