"""``GradientAccumulator``: the documented (seed) API over :class:`~accumopt.AccumulatingOptimizer`.

A thin layer: it builds one wrapper from a :class:`GradientAccumulationConfig`
and forwards to it. Nothing here touches gradients itself; averaging, weights,
clipping, non-finite policies and the loss scale all live in the wrapper.

Host synchronisation: :meth:`GradientAccumulator.accumulate_gradients` never
reads a device value on a micro-step that does not update. Its ``"loss"`` and
``"accumulated_loss"`` entries are detached 0-dim tensors on the loss's device
(``float(x)`` or ``f"{x:.4f}"`` reads them when you want a number). Sample
counts (``effective_batch_size``) are host numbers: the micro-batch sizes given
as ``num_samples`` or numeric ``weight``.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable

import torch
from torch import Tensor

from ._checks import check_int
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
# Config keys stored as None where unused (older files hold the default there): compared as the default.
_DEFAULTED = {"agc_clip_factor": 0.01, "lr_scaling_rule": "sqrt"}
_NORM_HISTORY = 1000  # gradient norms kept for AccumulationState.gradient_norms (the most recent updates)
_EMPTY: Mapping[str, Tensor] = MappingProxyType({})


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


def _seed_terms(error: Exception, config: GradientAccumulationConfig) -> Exception | None:
    """``error`` (from the wrapper's constructor) reworded with the config's option names, or None if unchanged."""
    text = str(error)
    both = "layer_weights/exclude"
    if both in text:
        names = [n for n, v in (("layer_accumulation_weights", config.layer_accumulation_weights),
                                ("exclude_parameters", config.exclude_parameters)) if v]
        text = text.replace(both, "/".join(names) or "layer_accumulation_weights/exclude_parameters")
    for wrapper_name, seed_name in (("layer_weights", "layer_accumulation_weights"),
                                    ("group_weights", "parameter_group_weights"),
                                    ("exclude", "exclude_parameters"),
                                    ("max_grad_norm", "clipping_norm"),
                                    ("nonfinite", "nan_policy")):
        text = re.sub(rf"(?<![\w.]){wrapper_name}(?![\w])", seed_name, text)
    if text == str(error):
        return None
    try:
        return type(error)(text)
    except Exception:  # an exception type with another constructor
        return (TypeError if isinstance(error, TypeError) else ValueError)(text)


@dataclass(frozen=True)
class AccumulationState:
    """A read-only snapshot of the accumulation counters (host values; no sync to build).

    The reference's device-derived fields are properties read on access: ``nan_detected``
    and ``gradient_norms`` cost one host read each when read, nothing before;
    ``accumulated_gradients`` is a live, read-only view of the open window's sums.

    Attributes:
        total_steps: micro-batches accumulated so far.
        accumulation_step: micro-batches in the current (open) window.
        accumulation_steps: K of the current window.
        total_optimizer_steps: real updates applied.
        skipped_optimizer_steps: windows closed without an update (non-finite or overflow).
        last_optimizer_step: ``total_steps`` at the last closed window.
        effective_batch_size: samples in the last closed window (the real batch of the last
            update); before the first update, K x the micro-batch size known so far. None if unknown.
        accumulated_loss: the current window's summed loss, a 0-dim device tensor (None if empty).
        memory_usage: memory fractions recorded at real updates (``memory_monitoring=True``).
        epoch: the epoch the K schedule is at.
        overflow_detected: a window was skipped by a float16 loss-scale overflow (GradScaler).
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
    overflow_detected: bool = False
    # Device values captured by reference (the wrapper adds out of place): read only by the properties.
    _nonfinite: "Tensor | float" = field(default=0.0, repr=False, compare=False)
    _norms: "tuple[Tensor | float, ...]" = field(default=(), repr=False, compare=False)
    _sums: "Callable[[], Mapping[str, Tensor]] | None" = field(default=None, repr=False, compare=False)

    @property
    def nan_detected(self) -> bool:
        """A NaN/inf gradient was found so far: a micro-batch dropped or a window skipped (``nan_handling``;
        a float16 overflow counts too). One host read when the count lives on the device."""
        if self.skipped_optimizer_steps and not self.overflow_detected:
            return True  # no scaler: a skipped window had a non-finite gradient (known on the host)
        return float(self._nonfinite) > 0

    @property
    def gradient_norms(self) -> tuple[float, ...]:
        """Global L2 gradient norms (before clipping) of the most recent applied updates (up to 1000).

        Recorded by reference at each update, read here with one host read.
        """
        if not self._norms:
            return ()
        tensors = [n for n in self._norms if isinstance(n, Tensor)]
        if not tensors:
            return tuple(float(n) for n in self._norms)
        device = tensors[0].device
        stacked = torch.stack([torch.as_tensor(n, dtype=torch.float64).to(device).reshape(())
                               for n in self._norms])
        return tuple(stacked.tolist())

    @property
    def accumulated_gradients(self) -> Mapping[str, Tensor]:
        """The open window's running sums by parameter name: a live, read-only view (no copy).

        Each entry is ``sum_i w_i g_i`` over the window's micro-batches so far, not yet divided
        by ``sum_i w_i`` (the trainer's weights are sample counts) and before layer/group weights.
        In ``mode=EFFICIENT`` the sums are the ``.grad`` tensors themselves (with a float16
        GradScaler still multiplied by the loss scale). The tensors are views: read them, never
        write them; they are zeroed when the window closes. Empty between windows, and while
        ``strategy=MEMORY_AWARE`` holds loader batches that have not run yet.
        """
        return self._sums() if self._sums is not None else _EMPTY


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
        self._window_samples = 0.0  # samples in the open window (host), when every size is known
        self._window_unknown = False  # a micro-batch of unknown size entered the open window
        self._last_samples: float | None = None  # samples of the last closed window
        self._size_checked = False  # the loader's batch size was compared with effective_batch_size
        self._norms: collections.deque = collections.deque(maxlen=_NORM_HISTORY)

    # ------------------------------------------------------------------ setup
    def setup(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None,
              scaler: "torch.amp.GradScaler | None" = None) -> "GradientAccumulator":
        """Bind to a model and optimizer (the optimizer is wrapped; pass the plain one).

        Clears the gradients of the optimizer's parameters (``set_to_none``), as the
        reference loops' first ``optimizer.zero_grad()``: a ``.grad`` left from before
        never enters the first update. A GradScaler is created when
        ``mixed_precision="float16"`` and ``gradient_scaling=True`` (unless ``scaler`` is given).
        Errors name the config's options (``layer_accumulation_weights``, ...).
        """
        cfg = self.config
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Invalid model: {type(model).__name__} (expected a torch.nn.Module)")
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        if scaler is None and cfg.mixed_precision == "float16" and cfg.gradient_scaling:
            scaler = torch.amp.GradScaler(device.type)
        steps: Any = cfg.k_schedule  # ADAPTIVE: an AdaptiveK reading the wrapper's noise scale
        try:
            wrapper = AccumulatingOptimizer(optimizer, steps, model=model, scheduler=scheduler, scaler=scaler,
                                            track_grad_norm=True, **cfg.optimizer_kwargs())
        except (TypeError, ValueError) as error:
            reworded = _seed_terms(error, cfg)
            if reworded is None:
                raise
            raise reworded from None
        # As the reference loops' first optimizer.zero_grad(): gradients left from before (an earlier
        # backward, a gradient computed for inspection) must not enter the first update.
        optimizer.zero_grad(set_to_none=True)
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
                             weight: "float | Tensor | None" = None, num_samples: int | None = None) -> dict[str, Any]:
        """Accumulate one micro-batch; apply the real update when its window is complete.

        Args:
            loss: the micro-batch's plain mean loss (never divide it by K).
            backward: run the backward pass here. With ``backward=False`` you ran
                :meth:`backward` (or ``loss.backward()`` without a GradScaler) yourself.
            weight: how much this micro-batch counts (its sample count), a number or a
                0-dim device tensor; the update is ``sum(w_i g_i) / sum(w_i)``.
                Ignored with ``loss_scaling=False`` (a sum of per-micro-batch losses).
            num_samples: samples in this micro-batch, for ``effective_batch_size``
                (default: ``weight`` when it is a number, else the config's ``effective_batch_size``).

        Returns:
            ``loss`` and ``accumulated_loss`` (0-dim device tensors, not synced),
            ``accumulation_step`` (micro-batches in the window after this call, K when it
            closed), ``should_optimize`` (this call closed the window), ``applied``
            (an update was applied: False when it was skipped), ``accumulation_steps``
            (K of that window) and ``effective_batch_size`` (see :attr:`AccumulationState.effective_batch_size`:
            the samples of the window this call closed).
        """
        opt = self._require()
        if not isinstance(loss, Tensor):
            raise TypeError(f"Invalid loss: {type(loss).__name__} (expected a torch.Tensor)")
        samples = self._samples_of(num_samples, weight)
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
        window_loss = detached if self._window_loss is None else self._window_loss + detached
        try:
            opt.step(weight=weight, loss=detached)
        except BaseException:
            if opt.pending == 0:  # the wrapper discarded the window: so do the counters
                self._forget_window()
            raise
        self._window_loss = window_loss  # counted once the wrapper took the micro-batch
        self._count_samples(samples)
        self._micro_steps += 1
        closed = opt.pending == 0
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

    def _samples_of(self, num_samples: Any, weight: Any) -> float | None:
        """Host sample count of one micro-batch: ``num_samples``, a numeric ``weight``, or the configured size."""
        if num_samples is not None:
            n: float | None = float(check_int("num_samples", num_samples, minimum=0))
        elif isinstance(weight, (int, float)) and not isinstance(weight, bool):
            n = float(weight)
        else:
            return None if self.config.effective_batch_size is None else float(self.config.effective_batch_size)
        self._check_size(n)
        return n

    def _check_size(self, n: float) -> None:
        """Warn once when the first micro-batch's size differs from the configured ``effective_batch_size``."""
        if self._size_checked:
            return
        self._size_checked = True
        e = self.config.effective_batch_size
        if e is None or n == e:
            return
        k = self._require().accumulation_steps
        size = int(n) if float(n).is_integer() else n
        target = self.config.target_batch_size
        warnings.warn(
            f"GradientAccumulator: micro-batches hold {size} samples but effective_batch_size={e} (expected the "
            f"loader's batch size): an update of K={k} micro-batches holds {k} x {size} = {k * n:g} samples"
            + (f", not target_batch_size={target}" if target is not None else "")
            + ". effective_batch_size in the results counts the samples actually seen; set the loader's "
            f"batch_size={e} or effective_batch_size={size}.", UserWarning, stacklevel=4)

    def _forget_window(self) -> None:
        """The wrapper discarded the open window: forget its loss and sample count."""
        self._window_loss = None
        self._window_samples, self._window_unknown = 0.0, False

    def _count_samples(self, n: float | None) -> None:
        if n is None:
            self._window_unknown = True
        else:
            self._window_samples += n
            self._micro_batch = n

    def _effective_batch(self, k: int) -> int | None:
        """Samples of the last closed window; before the first, K x the known micro-batch size."""
        if self._last_samples is not None:
            return int(round(self._last_samples))
        mb = self._micro_batch if self._micro_batch is not None else self.config.effective_batch_size
        return None if mb is None else int(round(k * mb))

    def _close_window(self, samples: float | None = None) -> None:
        """Record the closed window's sample count (``samples``: known from elsewhere)."""
        if samples is None and not self._window_unknown:
            samples = self._window_samples
        self._last_samples = samples
        self._window_samples, self._window_unknown = 0.0, False

    def _after_update(self, samples: float | None = None) -> None:
        opt = self._require()
        self._window_loss = None
        self._close_window(samples)
        norm = opt._stats.last_norm
        if opt.stepped and norm is not None and (not self._norms or self._norms[-1] is not norm):
            self._norms.append(norm)  # a reference (the wrapper replaces it next update): no copy, no sync
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
            self.logger.info("update %d: loss %s, K %d, grad norm %s", n, _fmt4(s.get("last_loss")),
                             opt.accumulation_steps, _fmt4(s.get("last_grad_norm")))

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
        n = float(batch_size_of(batch))  # validates the batch before keeping it
        self._check_size(n)
        if self._micro_batch is None:
            self._micro_batch = n
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
        self._after_update(float(samples))
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
        try:
            if not self.config.loss_scaling:
                # Each micro-batch entered K times; complete the window with empty micro-steps
                # (no gradient, weight 1) so that the division by K leaves the exact sum.
                while opt.pending:
                    opt.step()
                applied = opt.stepped
            else:
                applied = opt.flush()
        except BaseException:
            if opt.pending == 0:
                self._forget_window()
            raise
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
            overflow_detected=self.scaler is not None and s.skipped > 0,
            _nonfinite=s.nonfinite_events,
            _norms=tuple(self._norms),
            _sums=self._pending_sums,
        )

    def _pending_sums(self) -> Mapping[str, Tensor]:
        """Read-only view of the open window's sums by parameter name (no copy; see ``accumulated_gradients``)."""
        opt = self.optimizer
        if opt is None or opt.pending == 0:
            return _EMPTY
        names = opt._names or {}
        out: dict[str, Tensor] = {}
        index = 0
        for g in opt._store.groups:
            seen = g.seen_indices() if g.buffers is not None else None
            for i, p in enumerate(g.params):
                name = names.get(id(p), f"param_{index}")
                index += 1
                if g.buffers is None:
                    if p.grad is not None:
                        out[name] = p.grad.detach()
                    continue
                dense = seen is None or i in seen
                sparse = g.sparse.get(i)
                if sparse is not None:
                    out[name] = (g.buffers[i].detach() + sparse) if dense else sparse.detach()
                elif dense:
                    out[name] = g.buffers[i].detach()
        return MappingProxyType(out)

    def get_accumulation_stats(self) -> dict[str, Any]:
        """Statistics (the seed's keys plus the wrapper's :meth:`~AccumulatingOptimizer.stats`). One sync.

        As in the reference, ``average_gradient_norm`` and ``memory_usage`` are numbers (0.0 before
        any reading); ``effective_batch_size`` is the last update's sample count (None if unknown).
        """
        opt = self._require()
        st = self.state
        s = opt.stats()
        nonfinite = s.get("nonfinite_events", 0) or 0
        skipped = s.get("skipped_updates", 0) or 0
        out = dict(s)
        mean_norm = s.get("mean_grad_norm")
        out.update(
            current_step=st.total_steps,
            accumulation_step=st.accumulation_step,
            accumulation_steps=st.accumulation_steps,
            effective_batch_size=st.effective_batch_size,
            accumulated_loss=float(st.accumulated_loss) if st.accumulated_loss is not None else 0.0,
            average_gradient_norm=float(mean_norm) if mean_norm is not None else 0.0,
            total_optimizer_steps=st.total_optimizer_steps,
            nan_detected=bool(nonfinite) or (self.scaler is None and skipped > 0),
            overflow_detected=st.overflow_detected,
            memory_usage=st.memory_usage[-1] if st.memory_usage else 0.0,
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
                         "window_samples": None if self._window_unknown else self._window_samples,
                         "last_samples": self._last_samples,
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
        def value(d: Mapping[str, Any], k: str) -> Any:
            v = d.get(k)
            return _DEFAULTED[k] if v is None and k in _DEFAULTED else v

        differ = sorted(k for k in set(ours) | set(theirs) if k not in _COSMETIC and value(ours, k) != value(theirs, k))
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
        ws = c.get("window_samples", 0.0)
        self._window_samples, self._window_unknown = (0.0, True) if ws is None else (float(ws), False)
        self._last_samples = c.get("last_samples")
        self._size_checked = True  # a resumed run was checked when it started
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


def _fmt4(x: Any) -> str:
    """A number with 4 significant digits for log lines (``n/a`` for None)."""
    return "n/a" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)
