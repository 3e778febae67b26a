"""``GradientAccumulator`` and ``AccumulationState``: the configuration API (``docs/configuration.md``) over one
AccumulatingOptimizer built from :meth:`GradientAccumulationConfig.optimizer_kwargs`, which does the work; this layer
adds host sample counts, memory readings and the memory-aware path (``MicroBatcher``)."""

from __future__ import annotations

import logging
import os
import warnings
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable

import torch
from torch import Tensor

from ._checks import check_int
from .adaptive import AdaptiveK
from .checkpoint import load_checkpoint
from .config import AccumulationStrategy, GradientAccumulationConfig
from .optimizer import AccumulatingOptimizer
from .splitting import MemoryMonitor, MicroBatcher, batch_size_of, zip_batch

__all__ = ["AccumulationState", "GradientAccumulator"]

# Config keys that do not change what a saved state means (they may differ on load).
_COSMETIC = {"logging_frequency", "device", "progress_bar", "checkpoint_every", "checkpoint_path",
             "memory_monitoring", "memory_threshold"}
_NORM_HISTORY = 1000  # update norms kept for AccumulationState.gradient_norms (the most recent)
Batch = Any  # a loader batch: a tensor, or a tuple/list/dict of tensors sharing the leading dimension


def _cat_leaves(leaves: list[Any]) -> Any:
    """One per-sample leaf of loader batches concatenated along the batch dimension (tensors, lists of strings)."""
    first = leaves[0]
    if isinstance(first, Tensor):
        return torch.cat(leaves) if first.dim() > 0 else first
    return type(first)(s for leaf in leaves for s in leaf)


@dataclass(frozen=True)
class AccumulationState:
    """A read-only snapshot of the accumulation, built from the wrapper's ``stats()`` (fields:
    ``docs/configuration.md``); ``gradient_norms``: pre-clip norms of the last (up to 1000) applied updates."""

    total_steps: int
    accumulation_step: int
    accumulation_steps: int
    total_optimizer_steps: int
    skipped_optimizer_steps: int
    last_optimizer_step: int
    effective_batch_size: int | None
    accumulated_loss: float | None
    average_gradient_norm: float | None
    last_gradient_norm: float | None
    nan_detected: bool
    overflow_detected: bool
    memory_usage: tuple[float, ...] = ()
    epoch: int = 0
    gradient_norms: tuple[float, ...] = ()
    accumulated_gradients: Mapping[str, Tensor] = field(default_factory=lambda: MappingProxyType({}), repr=False)


class GradientAccumulator:
    """Gradient accumulation driven by a :class:`GradientAccumulationConfig`: :meth:`accumulate_gradients` per
    micro-batch, :meth:`flush` for a partial window. ``model`` and ``optimizer`` here, or :meth:`setup` later."""

    def __init__(self, config: GradientAccumulationConfig, model: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> None:
        if not isinstance(config, GradientAccumulationConfig):
            raise TypeError(f"Invalid config: {type(config).__name__} (expected a GradientAccumulationConfig)")
        self.config = config
        self.logger = logging.getLogger("accumopt")
        self.optimizer: AccumulatingOptimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.device = torch.device("cpu")
        self.adaptive: AdaptiveK | None = None
        self._reset()
        if (model is None) != (optimizer is None):
            raise ValueError("Invalid arguments: give both model and optimizer, or neither (then call setup())")
        if model is not None and optimizer is not None:
            self.setup(model, optimizer, scheduler)

    def _reset(self) -> None:
        self.batcher: MicroBatcher | None = None  # MEMORY_AWARE: built by the first window
        self._window_samples: float | None = 0.0  # samples in the open window (None: a size was unknown)
        self._last_samples: float | None = None  # samples of the last closed window
        self._size_checked = False  # the first micro-batch's size was compared with effective_batch_size
        self._memory: list[float] = []  # memory_monitoring: one reading per closed window
        self._norms: deque[Tensor] = deque(maxlen=_NORM_HISTORY)  # pre-clip norms of applied updates (device)
        self._window_loss: Tensor | None = None  # the open window's summed loss (device); both reset as one starts
        self._pending: list[Batch] = []  # MEMORY_AWARE: loader batches of the open window
        self._loss_fn: Callable[[Batch], Tensor] | None = None
        self._batcher_state: dict[str, Any] | None = None
        self.last_window_loss: tuple[Tensor, int] | None = None  # MEMORY_AWARE: (mean loss, samples)

    def setup(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None,
              scaler: torch.amp.GradScaler | None = None) -> GradientAccumulator:
        """Wrap ``optimizer`` (the plain torch one) as configured and clear its gradients (``set_to_none``); a
        GradScaler is made for ``mixed_precision="float16"`` with ``gradient_scaling`` unless ``scaler`` is given."""
        cfg = self.config
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Invalid model: {type(model).__name__} (expected a torch.nn.Module)")
        if isinstance(optimizer, torch.optim.Optimizer):
            cfg.check_model(model, optimizer)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if scaler is None and cfg.mixed_precision == "float16" and cfg.gradient_scaling:
            scaler = torch.amp.GradScaler(device.type)
        kwargs = cfg.optimizer_kwargs()
        self.optimizer = AccumulatingOptimizer(optimizer, model=model, scheduler=scheduler, scaler=scaler, **kwargs)
        optimizer.zero_grad(set_to_none=True)  # a .grad from before never enters the first update
        self.scaler, self.device, self.scheduler = scaler, device, scheduler
        self.adaptive = steps if isinstance(steps := kwargs["accumulation_steps"], AdaptiveK) else None
        self._reset()
        return self

    def _require(self) -> AccumulatingOptimizer:
        if self.optimizer is None:
            raise RuntimeError("GradientAccumulator is not set up: call setup(model, optimizer) first")
        return self.optimizer

    def _set_noise_unit(self, weight: float | Tensor | None) -> None:
        """ADAPTIVE: the noise scale is in weight units; tell AdaptiveK one micro-batch's weight."""
        if self.adaptive is not None and not isinstance(weight, Tensor):  # (a tensor: kept; reading it syncs)
            self.adaptive.micro_batch_size = 1.0 if weight is None or weight <= 0 else float(weight)

    def accumulate_gradients(self, loss: Tensor, backward: bool = True, *, weight: float | Tensor | None = None,
                             num_samples: int | None = None) -> dict[str, Any]:
        """Accumulate one micro-batch; the real update is applied when its window is complete.

        Args:
            loss: the micro-batch's plain mean loss (never divide it by K).
            backward: run the backward pass here; with ``False`` you ran ``acc.backward(loss, weight=n)``.
            weight: how much this micro-batch counts (its sample count), a number or a 0-dim tensor: the
                update is ``sum(w_i g_i) / sum(w_i)``. Ignored with ``loss_scaling=False``.
            num_samples: samples in this micro-batch, for ``effective_batch_size`` (default: a numeric
                ``weight``, else ``config.effective_batch_size``).

        Returns:
            ``loss``, ``accumulated_loss`` (the window's summed loss so far; both detached 0-dim tensors on the
            loss's device), ``accumulation_step``, ``should_optimize``, ``applied``, ``accumulation_steps`` and
            ``effective_batch_size`` (``docs/configuration.md``). Nothing is read from the device.
        """
        opt = self._require()
        if not isinstance(loss, Tensor):
            raise TypeError(f"Invalid loss: {type(loss).__name__} (expected a torch.Tensor)")
        samples = self._samples_of(num_samples, weight)
        weight = weight if self.config.loss_scaling else None
        if opt.pending == 0:  # a new window (also after the wrapper discarded one); it fixes the noise unit (ADAPTIVE)
            self._set_noise_unit(weight)
            self._window_samples, self._window_loss = 0.0, None
        if backward:
            opt.backward(loss, weight=weight)
            weight = None  # taken by backward(); the wrapper remembers it
        k, detached = opt.accumulation_steps, loss.detach()
        opt.step(weight=weight, loss=detached)
        self._window_samples = None if samples is None or self._window_samples is None \
            else self._window_samples + samples
        window_loss = self._window_loss = detached if self._window_loss is None else self._window_loss + detached
        closed = opt.pending == 0
        if closed:
            self._closed()
        return {"loss": detached, "accumulated_loss": window_loss, "accumulation_step": k if closed else opt.pending,
                "should_optimize": closed, "applied": closed and opt.stepped, "accumulation_steps": k,
                "effective_batch_size": self._effective_batch(k, samples)}

    def backward(self, loss: Tensor, *, weight: float | Tensor | None = None) -> None:
        """The backward pass for ``accumulate_gradients(loss, backward=False)``: ``acc.optimizer.backward``."""
        self._require().backward(loss, weight=weight)

    def _samples_of(self, num_samples: int | None, weight: float | Tensor | None) -> float | None:
        """Host sample count of one micro-batch: ``num_samples``, a numeric ``weight``, or the configured size."""
        if num_samples is not None:
            n = float(check_int("num_samples", num_samples, minimum=0))
        elif isinstance(weight, (int, float)) and not isinstance(weight, bool):
            n = float(weight)
        else:
            e = self.config.effective_batch_size
            return None if e is None else float(e)
        self._check_size(n)
        return n

    def _check_size(self, n: float) -> None:  # warn once: the first micro-batch is not effective_batch_size
        e, target = self.config.effective_batch_size, self.config.target_batch_size
        checked, self._size_checked = self._size_checked, True
        if checked or e is None or n == e:
            return
        k, size = self._require().accumulation_steps, int(n) if n.is_integer() else n
        not_target = f", not target_batch_size={target}" if target is not None else ""
        warnings.warn(f"GradientAccumulator: micro-batches hold {size} samples but effective_batch_size={e} (expected "
                      f"the loader's batch size): an update of K={k} micro-batches holds {k} x {size} = {k * n:g} "
                      f"samples{not_target}. effective_batch_size in the results counts the samples actually seen; "
                      f"set the loader's batch_size={e} or effective_batch_size={size}.", UserWarning, stacklevel=4)

    def _effective_batch(self, k: int, micro: float | None) -> int | None:
        """Samples of the last closed window; before the first, K x the micro-batch size ``micro``."""
        return round(k * micro) if self._last_samples is None and micro is not None else self.effective_batch_size

    @property
    def effective_batch_size(self) -> int | None:
        """Samples of the last closed window (None before the first, or when a size was unknown)."""
        return None if self._last_samples is None else round(self._last_samples)

    def _closed(self, samples: float | None = None) -> None:
        """A window closed: record its samples (``samples`` if known), its update's norm and a memory reading."""
        self._last_samples = self._window_samples if samples is None else samples
        opt = self._require()
        if opt.stepped and isinstance(norm := opt.last_grad_norm, Tensor):
            self._norms.append(norm.detach().clone())  # a device copy: no sync
        threshold = self.config.memory_threshold
        if self.config.memory_monitoring and threshold is not None:
            monitor = MemoryMonitor(self.device)  # host queries only: CUDA allocated, or process RSS
            frac = monitor.used() / max(monitor.total(), 1)
            if frac > threshold >= (self._memory or [0.0])[-1]:  # warn when crossing the threshold
                self.logger.warning("accumopt: memory use %.1f%% of %s is above memory_threshold=%.0f%%",
                                    100 * frac, self.device, 100 * threshold)
            self._memory.append(frac)

    @property
    def pending_batches(self) -> int:
        """Loader batches held for the open window by :meth:`accumulate_batch` (MEMORY_AWARE)."""
        return len(self._pending)

    def accumulate_batch(self, batch: Batch, loss_fn: Callable[[Batch], Tensor]) -> dict[str, Any]:
        """``MEMORY_AWARE``: hold one loader batch; at the K-th, run the window through the ``MicroBatcher``;
        ``loss_fn(micro_batch)`` returns a micro-batch's mean loss. Returns the keys of :meth:`accumulate_gradients`
        plus ``window_samples``; ``loss`` and ``accumulated_loss`` are None until the window runs, then its mean."""
        opt = self._require()
        if self.config.strategy is not AccumulationStrategy.MEMORY_AWARE:
            raise RuntimeError("accumulate_batch needs strategy=AccumulationStrategy.MEMORY_AWARE "
                               f"(strategy is {self.config.strategy.name}); use accumulate_gradients(loss)")
        if not callable(loss_fn):
            raise TypeError(f"Invalid loss_fn: {loss_fn!r} (expected a callable micro_batch -> loss)")
        if opt.pending:
            raise RuntimeError(f"accumulate_batch: the window holds {opt.pending} micro-batches from "
                               "accumulate_gradients() (expected none: call flush() first)")
        n = float(batch_size_of(batch))  # validates the batch before keeping it
        self._check_size(n)
        self._pending.append(batch)
        self._loss_fn = loss_fn
        k, step = opt.accumulation_steps, len(self._pending)
        loss, applied, samples = self._run_window() if step == k else (None, False, 0)
        return {"loss": loss, "accumulated_loss": loss, "accumulation_step": step, "should_optimize": step == k,
                "applied": applied, "accumulation_steps": k, "window_samples": samples,
                "effective_batch_size": self._effective_batch(k, n)}

    def _run_window(self, loss_fn: Callable[[Batch], Tensor] | None = None) -> tuple[Tensor | None, bool, int]:
        """Run the held batches through the MicroBatcher: one real update."""
        opt = self._require()
        loss_fn = loss_fn or self._loss_fn
        if loss_fn is None:
            raise RuntimeError("flush: the window holds loader batches but no loss_fn is known "
                               "(pass flush(loss_fn=...) after loading a state)")
        batches, self._pending = self._pending, []
        first = batch_size_of(batches[0])
        if self.batcher is None:
            self.batcher = MicroBatcher(opt, first, grow_after=50 if self.config.adaptive_scaling else 0,
                                        memory_fraction=self.config.memory_threshold, device=self.device)
            if self._batcher_state is not None:
                self.batcher.load_state_dict(self._batcher_state)
        self._set_noise_unit(first)  # the MicroBatcher weights micro-batches by sample count
        batch = batches[0] if len(batches) == 1 else zip_batch(_cat_leaves, batches)
        loss = self.batcher.step(batch, loss_fn)  # raises after discarding the window if even 1 sample fails
        samples = batch_size_of(batch)
        self.last_window_loss = (loss, samples)
        self._closed(float(samples))
        return loss, opt.stepped, samples

    def flush(self, *, loss_fn: Callable[[Batch], Tensor] | None = None) -> bool:
        """Apply the open, partial window now (``loss_fn``: for held batches); returns whether it was applied."""
        opt = self._require()
        if self._pending:
            return self._run_window(loss_fn)[1]
        if opt.pending == 0:
            return False
        applied = opt.flush()
        self._closed()
        return applied

    def set_epoch(self, epoch: int) -> None:
        """Tell the K schedule the epoch (``mode=PROGRESSIVE``; effective at the next window)."""
        self._require().set_epoch(epoch)

    def zero_grad(self) -> None:
        """Clear gradients outside the pending window (safe after every micro-batch)."""
        self._require().zero_grad()

    def _state(self, s: Mapping[str, Any]) -> AccumulationState:
        opt = self._require()
        skipped = int(s["skipped_updates"])
        overflow = self.scaler is not None and skipped > 0
        return AccumulationState(
            total_steps=s["micro_steps"], accumulation_step=len(self._pending) or opt.pending,
            accumulation_steps=opt.accumulation_steps, total_optimizer_steps=s["updates"],
            skipped_optimizer_steps=skipped, last_optimizer_step=s["micro_steps"] - opt.pending,
            effective_batch_size=self._effective_batch(opt.accumulation_steps, self.config.effective_batch_size),
            accumulated_loss=s["accumulated_loss"] if opt.pending else None,
            average_gradient_norm=s["mean_grad_norm"], last_gradient_norm=s["last_grad_norm"],
            nan_detected=s["nonfinite_events"] > 0 or (skipped > 0 and not overflow), overflow_detected=overflow,
            memory_usage=tuple(self._memory), epoch=opt.epoch,
            gradient_norms=tuple(torch.stack(list(self._norms)).tolist()) if self._norms else (),  # one host read
            accumulated_gradients=MappingProxyType(opt.accumulated_gradients()))

    @property
    def state(self) -> AccumulationState:
        """A read-only snapshot of the accumulation (host reads: ``opt.stats()`` and the norm history)."""
        return self._state(self._require().stats())

    def get_accumulation_stats(self) -> dict[str, Any]:
        """The wrapper's ``stats()`` plus the documented keys (read as :attr:`state` is; 0.0 before any reading)."""
        s = self._require().stats()
        st = self._state(s)
        return {**s, "current_step": st.total_steps, "accumulation_step": st.accumulation_step,
                "accumulation_steps": st.accumulation_steps, "effective_batch_size": st.effective_batch_size,
                "accumulated_loss": st.accumulated_loss or 0.0, "total_optimizer_steps": st.total_optimizer_steps,
                "average_gradient_norm": st.average_gradient_norm or 0.0, "nan_detected": st.nan_detected,
                "overflow_detected": st.overflow_detected, "memory_usage": (st.memory_usage or (0.0,))[-1],
                "mode": self.config.mode.name, "strategy": self.config.strategy.name}

    def _own_state(self) -> dict[str, Any]:
        batcher = self.batcher.state_dict() if self.batcher is not None else self._batcher_state
        return {"config": self.config.to_dict(), "memory": list(self._memory), "window_samples": self._window_samples,
                "last_samples": self._last_samples, "pending": list(self._pending), "batcher": batcher,
                "norms": list(self._norms), "window_loss": self._window_loss}

    def _parse_own(self, state: Any) -> dict[str, Any]:
        """This class's part of ``state``, checked against this config and copied (``ValueError``: nothing changes)."""
        own = state.get("accumulator") if isinstance(state, Mapping) and "optimizer" in state else None
        if not isinstance(own, Mapping) or not isinstance(own.get("config"), Mapping):
            raise ValueError("Invalid accumulation state: not a GradientAccumulator state (expected the keys "
                             "'optimizer' and 'accumulator' of GradientAccumulator.state_dict())")
        ours, theirs = self.config.to_dict(), own["config"]
        differ = "; ".join(f"{k}={theirs.get(k)!r}, here {v!r}" for k, v in ours.items()
                           if k not in _COSMETIC and theirs.get(k) != v)
        if differ:
            raise ValueError(f"Invalid accumulation state: saved with a different configuration ({differ})")
        try:  # (files of earlier versions hold no norms and no window loss)
            pending, batcher, loss = own["pending"], own["batcher"], own.get("window_loss")
            if not isinstance(pending, list):
                raise TypeError(f"'pending' is a {type(pending).__name__}, not a list")
            return {"memory": [float(x) for x in own["memory"]], "pending": list(pending),
                    "samples": [None if own[k] is None else float(own[k]) for k in ("window_samples", "last_samples")],
                    "batcher": None if batcher is None else dict(batcher),
                    "norms": [n.detach().reshape(()).to(self.device, copy=True) for n in own.get("norms", [])],
                    "window_loss": None if loss is None else loss.detach().reshape(()).clone()}
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
            raise ValueError("Invalid accumulation state: the accumulator's part is malformed "
                             f"({type(error).__name__}: {error})") from None

    def state_dict(self) -> dict[str, Any]:
        """The wrapper's state dict and this class's own part (plain data, loads with ``weights_only=True``)."""
        return {"optimizer": self._require().state_dict(), "accumulator": self._own_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state that does not fit (another configuration) raises ``ValueError``,
        changing nothing."""
        opt = self._require()
        own = self._parse_own(state)  # all of it, before anything changes; then the wrapper checks its part
        opt.load_state_dict(state["optimizer"])
        self._memory, self._pending, self._batcher_state = own["memory"], own["pending"], own["batcher"]
        self._window_samples, self._last_samples = own["samples"]
        self._norms, self._window_loss = deque(own["norms"], maxlen=_NORM_HISTORY), own["window_loss"]
        self._size_checked = True  # a resumed run was checked when it started
        if self.batcher is not None and self._batcher_state is not None:
            self.batcher.load_state_dict(self._batcher_state)

    def save_accumulation_state(self, filepath: str | os.PathLike[str], extra: Any = None) -> None:
        """Write the state to ``filepath`` with ``opt.save`` (atomically), with optional plain ``extra`` data."""
        self._require().save(filepath, extra={"accumulator": self._own_state(), "extra": extra})

    def load_accumulation_state(self, filepath: str | os.PathLike[str]) -> Any:
        """Load a file of :meth:`save_accumulation_state` and return its ``extra``; a corrupted or foreign file,
        or one of another configuration, raises ``ValueError`` and changes nothing."""
        state, extra = read_accumulation_file(filepath, self.device)
        self.load_state_dict(state)  # validates the accumulator's part against this config, then applies
        return extra

    def __repr__(self) -> str:
        return f"GradientAccumulator({self.config.mode.name}, {self.config.strategy.name}, K={self.config.k})"


def read_accumulation_file(filepath: str | os.PathLike[str], map_location: Any = None) -> tuple[dict[str, Any], Any]:
    """Read a file of :meth:`GradientAccumulator.save_accumulation_state` (nothing applied): ``(state, extra)``."""
    optimizer_state, saved = load_checkpoint(filepath, map_location=map_location)
    if not isinstance(saved, Mapping) or "accumulator" not in saved:
        raise ValueError(f"Invalid checkpoint file {os.fspath(filepath)!r}: written by opt.save() without "
                         "the accumulator's state (expected a file of save_accumulation_state())")
    return {"optimizer": optimizer_state, "accumulator": saved["accumulator"]}, saved.get("extra")
