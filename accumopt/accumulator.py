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
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .config import AccumulationMode, GradientAccumulationConfig
from .optimizer import AccumulatingOptimizer

__all__ = ["AccumulationState", "GradientAccumulator", "memory_fraction"]

_FORMAT = "accumopt.GradientAccumulator"
# Config keys that do not change what the saved state means (may differ on load).
_COSMETIC = {"logging_frequency", "device", "progress_bar", "checkpoint_every", "checkpoint_path",
             "memory_monitoring", "memory_threshold"}


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        return 0


def _total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):  # pragma: no cover
        return 0


def memory_fraction(device: torch.device | str) -> float:
    """Used fraction of ``device``'s memory: CUDA allocated / total, or process RSS / RAM on CPU.

    Host-side queries only (no device synchronisation).
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory
        return torch.cuda.memory_allocated(device) / total if total else 0.0
    total = _total_ram()
    return _rss_bytes() / total if total else 0.0


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, rename: the old file survives a crash."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


class _NoiseScaleK:
    """K for mode=ADAPTIVE: follows the gradient noise scale between bounds, with hysteresis.

    The critical batch of McCandlish et al. 2018 ("An Empirical Model of
    Large-Batch Training") is near the simple noise scale B_noise; K moves by
    powers of two toward ``B_noise / micro_batch`` and only when the target is at
    least twice (or at most half) the current K. A heuristic: without a noise
    scale estimate from the wrapper's ``stats()`` K stays where it is.
    """

    def __init__(self, k0: int, lo: int, hi: int, micro_batch: Callable[[], float]) -> None:
        self.k, self.lo, self.hi = k0, lo, hi
        self.micro_batch = micro_batch
        self.opt: AccumulatingOptimizer | None = None

    def __call__(self, updates: int) -> int:
        if self.opt is None or updates == 0:
            return self.k
        noise = self.opt.stats().get("noise_scale")  # one sync per real update, ADAPTIVE mode only
        if noise is None or not math.isfinite(noise) or noise <= 0:
            return self.k
        target = noise / max(self.micro_batch(), 1.0)
        if target >= 2 * self.k:
            self.k = min(self.hi, self.k * 2)
        elif target <= self.k / 2:
            self.k = max(self.lo, self.k // 2)
        return self.k


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
        steps: Any = cfg.k_schedule
        adaptive = None
        if cfg.mode is AccumulationMode.ADAPTIVE:
            adaptive = _NoiseScaleK(cfg.accumulation_steps, cfg.min_accumulation_steps or 1,
                                    cfg.max_accumulation_steps or cfg.accumulation_steps, self._micro_batch_size)
            steps = adaptive
        wrapper = AccumulatingOptimizer(optimizer, steps, model=model, scheduler=scheduler, scaler=scaler,
                                        track_grad_norm=True, **cfg.optimizer_kwargs())
        if adaptive is not None:
            adaptive.opt = wrapper
        self.model, self.optimizer, self.scaler, self.device = model, wrapper, scaler, device
        self.scheduler = scheduler
        self._reset_counters()
        if cfg.progressive_scaling and cfg.mode in (AccumulationMode.PROGRESSIVE, AccumulationMode.ADAPTIVE):
            wrapper.optimizer.register_step_pre_hook(self._scale_lr)
            wrapper.optimizer.register_step_post_hook(self._restore_lr)
        return self

    def _require(self) -> AccumulatingOptimizer:
        if self.optimizer is None:
            raise RuntimeError("GradientAccumulator is not set up: call setup(model, optimizer) first")
        return self.optimizer

    def _micro_batch_size(self) -> float:
        if self._micro_batch is not None:
            return self._micro_batch
        return float(self.config.effective_batch_size or 1)

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

    def flush(self) -> bool:
        """Apply the open, partial window now (end of epoch or data).

        The update is the weighted mean over the micro-batches actually seen
        (with ``loss_scaling=False``: their sum). Returns whether an update was applied.
        """
        opt = self._require()
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
            accumulation_step=opt.pending,
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
                         "micro_batch": self._micro_batch},
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

    def save_accumulation_state(self, filepath: str | os.PathLike) -> None:
        """Write :meth:`state_dict` atomically (temporary file, fsync, rename)."""
        atomic_torch_save(self.state_dict(), filepath)
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

