"""``AccumulatingOptimizer``: gradient accumulation around any ``torch.optim.Optimizer`` (see docs/core.md).

An orchestrator: storage (``buffers``), loss scale and non-finite policy (``precision``, ``amp``), clipping, weights,
the K schedule, DDP/FSDP sync, statistics, the update's one host read (``hostread``) and files (``checkpoint``) each
live in their own module; :meth:`AccumulatingOptimizer.step` runs them in a short sequence.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, TypeVar

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from . import checkpoint
from ._checks import check_state_scalar, host_float
from .amp import LossScaler
from .buffers import GradientStore
from .clipping import Clipper
from .hostread import HostRead
from .misuse import MisuseDetector
from .noise import NoiseScaleEstimator, as_estimator
from .precision import NonFiniteGuard
from .schedule import KSchedule, Window
from .stats import Statistics, usable_noise_scale
from .sync import GradSync
from .weights import check_micro_weight, parameter_names, resolve_weights

__all__ = ["AccumulatingOptimizer"]

_T = TypeVar("_T")
_PLATEAU_NEEDS_LOSS = "ReduceLROnPlateau needs the loss: pass it as opt.step(loss=loss)"


def _validate(optimizer: Any, scheduler: Any, model: Any) -> None:
    if isinstance(optimizer, AccumulatingOptimizer):
        raise TypeError("Invalid optimizer: an AccumulatingOptimizer (expected the optimizer it should wrap; wrapping "
                        "twice would accumulate twice)")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"Invalid optimizer: {type(optimizer).__name__} (expected a torch.optim.Optimizer instance)")
    first: dict[int, int] = {}  # id(param): its group
    for gi, g in enumerate(optimizer.param_groups):
        for pi, p in enumerate(g["params"]):
            if id(p) in first:
                raise ValueError(f"Invalid optimizer: param_groups[{gi}]['params'][{pi}] also appears in "
                                 f"param_groups[{first[id(p)]}] (expected each parameter in one group)")
            first[id(p)] = gi
            if not (p.is_floating_point() or p.is_complex()):
                raise ValueError(f"Invalid optimizer: param_groups[{gi}]['params'][{pi}] has dtype {p.dtype} "
                                 "(expected floating-point or complex parameters)")
    if not first:
        raise ValueError(f"Invalid optimizer: {type(optimizer).__name__} has no parameters (expected at least one)")
    if not any(p.requires_grad for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("Invalid optimizer: every parameter has requires_grad=False (nothing to accumulate)")
    closure = inspect.signature(optimizer.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(f"Invalid optimizer: {type(optimizer).__name__}.step requires a closure, i.e. it re-evaluates "
                         "the loss several times per step (as LBFGS does); an accumulated gradient cannot serve those "
                         "re-evaluations. Use the large batch directly with such optimizers.")
    if scheduler is not None and not (hasattr(scheduler, "step") and hasattr(scheduler, "optimizer")):
        raise TypeError(f"Invalid scheduler: {type(scheduler).__name__} (expected a torch.optim.lr_scheduler "
                        "scheduler)")
    if scheduler is not None and scheduler.optimizer is not optimizer:
        raise ValueError(f"Invalid scheduler: {type(scheduler).__name__} was built on another optimizer "
                         "(expected one built on the optimizer being wrapped)")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"Invalid model: {type(model).__name__} (expected a torch.nn.Module)")


# Optimizers whose update does not scale with the gradient (it is divided by a running
# estimate of the gradient's own magnitude, or only its sign is used).
_SCALE_INVARIANT = tuple(getattr(torch.optim, n) for n in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad",
                         "RMSprop", "Adadelta", "Rprop", "SparseAdam", "Adafactor") if hasattr(torch.optim, n))


def _is_one(w: "float | Tensor") -> bool:
    """Whether a checked micro-batch weight is exactly 1 (a CPU tensor is read for free; others are not)."""
    if isinstance(w, Tensor):
        return w.device.type == "cpu" and float(w) == 1.0
    return w == 1.0


def _note(error: BaseException, text: str) -> None:
    """Add ``text`` to ``error``'s report (Python >= 3.11; a no-op before)."""
    if hasattr(error, "add_note"):
        error.add_note(text)


class _Shared(Generic[_T]):
    """An attribute of the wrapped optimizer of the same name, read and written through it."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> _T:
        return self if obj is None else getattr(obj.optimizer, self.name)  # type: ignore[return-value]

    def __set__(self, obj: Any, value: _T) -> None:
        setattr(obj.optimizer, self.name, value)


class AccumulatingOptimizer(Optimizer):
    """Accumulate gradients over ``accumulation_steps`` micro-batches, then step once.

    Drop-in: ``opt = AccumulatingOptimizer(torch.optim.AdamW(...), 8)`` in the plain loop with the plain mean loss;
    every K-th ``step()`` applies the mean of the K micro-batch gradients. ``param_groups``, ``state`` and
    ``defaults`` are the wrapped optimizer's, so LR schedulers, ``GradScaler`` and ``clip_grad_norm_`` accept it.

    Args:
        optimizer: the optimizer to wrap (any ``torch.optim.Optimizer`` whose ``step`` needs no closure).
        accumulation_steps: K: an int, a list by epoch, a mapping ``{start: K}`` or a callable of the update count.
        mode: ``"inplace"`` (default, no extra memory: the sum lives in ``.grad``) or ``"buffered"`` (a buffer
            per parameter; needed to drop or weight a micro-batch after backward, and for out-of-memory recovery).
        accumulate_dtype: dtype of the sum for fp16/bf16 parameters (fp32).
        scheduler: an LR scheduler stepped after each applied update (``ReduceLROnPlateau``: the window's mean loss).
        scaler: a ``torch.amp.GradScaler`` the wrapper owns: scale constant within a window (disabled: no scaling).
        max_grad_norm: clip the accumulated gradient to this global norm.
        norm_type: norm for ``max_grad_norm``.
        clip_value: clip the accumulated gradient elementwise to ``[-v, v]``.
        agc_clip_factor: unit-wise adaptive gradient clipping factor (AGC). For all three clippings, 0 or None: off.
        nonfinite: ``"ignore"``, ``"skip"`` (the window), ``"drop"`` (the micro-batch; buffered) or ``"raise"``.
        model: the model (names for weights and errors; DDP/FSDP sync control).
        layer_weights: ``{name or glob pattern: weight}`` (needs ``model``).
        group_weights: a weight per param group (sequence or mapping by index).
        exclude: names, patterns or parameters frozen for the run (see docs/weights.md).
        schedule_by: what a K schedule counts, ``"epoch"`` (``set_epoch``) or ``"update"``.
        lr_scaling: ``None``, ``"linear"`` or ``"sqrt"``: scale the LR with K relative to the first window's K.
        track_grad_norm: record the pre-clip gradient norm in :meth:`stats`.
        noise_scale: estimate the gradient noise scale (``True``, an EMA beta, or a ``NoiseScaleEstimator``).
        log_every: log :meth:`stats` to the ``accumopt`` logger every this many updates (while INFO is enabled).
        reduction: ``"mean"`` (default): apply ``sum(w_i g_i) / sum(w_i)``; ``"sum"``: ``sum(w_i g_i)`` undivided.
    """

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale/found_inf: no sync per micro-step

    def __init__(self, optimizer: Optimizer,
                 accumulation_steps: int | list[int] | Mapping[int, int] | Callable[[int], int] = 1, *,
                 mode: str = "inplace", accumulate_dtype: torch.dtype = torch.float32, scheduler: Any = None,
                 scaler: "torch.amp.GradScaler | None" = None, max_grad_norm: float | None = None,
                 norm_type: float = 2.0, clip_value: float | None = None, agc_clip_factor: float | None = None,
                 nonfinite: str = "ignore", model: torch.nn.Module | None = None,
                 layer_weights: Mapping[str, float] | None = None, group_weights: Any = None,
                 exclude: Iterable[str] | None = None, schedule_by: str | None = None, lr_scaling: str | None = None,
                 track_grad_norm: bool = False, noise_scale: "bool | float | NoiseScaleEstimator" = False,
                 log_every: int | None = None, reduction: str = "mean") -> None:
        # Each component validates its own arguments; all are built before the wrapped optimizer is touched.
        _validate(optimizer, scheduler, model)
        self._clipper = Clipper(max_norm=max_grad_norm, norm_type=norm_type, max_value=clip_value,
                                agc_factor=agc_clip_factor, track_norm=track_grad_norm)
        self._guard = NonFiniteGuard(scaler=scaler, policy=nonfinite)
        self._noise = as_estimator(noise_scale)
        schedule = KSchedule(accumulation_steps, schedule_by)
        schedule.attach(None if self._noise is None else self._noise.value)  # AdaptiveK: no estimate, no wrapper
        self._window = Window(schedule, lr_scaling, optimizer.param_groups, reduction=reduction)
        self._stats = Statistics(log_every=log_every)
        self._names = None if model is None else parameter_names(model)
        weight_of = resolve_weights(optimizer.param_groups, self._names, layer_weights, group_weights, exclude)
        self._store = GradientStore(optimizer.param_groups, mode=mode, accumulate_dtype=accumulate_dtype,
                                    weight_of=weight_of)
        if nonfinite == "drop" and mode != "buffered":
            raise ValueError("Invalid nonfinite: 'drop' with mode='inplace' (dropping one micro-batch needs its "
                             "gradient apart from the window's: use mode='buffered')")
        self._sync = GradSync(model, self._store)
        if self._noise is not None and self._sync.kind == "fsdp":
            raise ValueError("Invalid noise_scale: True with an FSDP2 model (its gradients are sharded; the "
                             "estimator needs whole micro-batch gradients). Use DDP or turn estimation off.")
        odd = sorted(w for w in {g.weight for g in self._store.groups} if w != 1.0)
        if odd and isinstance(optimizer, _SCALE_INVARIANT):
            warnings.warn(
                f"accumulation weights {odd} with {type(optimizer).__name__}: it divides each update by the gradient's "
                "own running scale, so a constant per-parameter weight barely changes the update (weight 0 and "
                "exclude still freeze). To scale a layer's step, give it a param group with its own lr.",
                UserWarning, stacklevel=2)

        # Share the wrapped optimizer's containers (no Optimizer.__init__: it would copy them; see ``param_groups``).
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks = optimizer._optimizer_step_pre_hooks
        self._optimizer_step_post_hooks = optimizer._optimizer_step_post_hooks
        for hooks in ("state_dict_pre", "state_dict_post", "load_state_dict_pre", "load_state_dict_post"):
            setattr(self, f"_optimizer_{hooks}_hooks", OrderedDict())
        self._zero_grad_profile_name = "AccumulatingOptimizer.zero_grad"

        self.scheduler = scheduler
        self._backward_weight: float | Tensor | None = None  # summed weights given to backward() this micro-batch
        self._weight_in_grad = False  # the weight given to backward() multiplies .grad (relative to the window's ref)
        self._stepped = False
        self._sync.set(self._window.next_is_last)
        self._misuse = MisuseDetector(optimizer, self._store, self._window, self._sync, self._stats, scheduler)
        self._misuse.attach(self)  # a window still pending when the wrapper goes: a warning naming flush()
        weakref.finalize(self, self._sync.close)  # DDP's forward hook must not keep the storage alive after us
        self.register_load_state_dict_post_hook(self._misuse.on_load)  # .grad set by our own load is the window's
        self.register_state_dict_post_hook(self._misuse.on_save)  # a saved window is not lost at exit

    def step(self, closure: Callable[[], Any] | None = None, *, weight: "float | Tensor | None" = None,
             loss: "Tensor | float | None" = None) -> Any:
        """End one micro-batch; apply the accumulated update when the window is complete.

        Args:
            closure: optional; called once (with grad enabled) for this micro-batch's loss and gradient.
            weight: how much this micro-batch counts (its sample count, say; a number or 0-dim device tensor;
                default 1): the update is ``sum(w_i g_i) / sum(w_i)``. ``mode="inplace"``: give it to :meth:`backward`.
            loss: this micro-batch's loss, for statistics and ``ReduceLROnPlateau`` (kept on the device).

        Returns:
            The closure's result, or None.
        """
        try:
            return self._micro_step(closure, weight, loss)
        except BaseException:
            # GradScaler deletes what it set on the wrapper only after a successful step, and would
            # multiply a stale ``grad_scale`` into the next micro-step's.
            for attr in ("grad_scale", "found_inf"):
                self.__dict__.pop(attr, None)
            raise

    @torch.no_grad()  # as torch's optimizers step: no gradient with a graph (create_graph) chains the sums
    def _micro_step(self, closure: Callable[[], Any] | None, weight: Any, loss: Any) -> Any:
        """The micro-step sequence (see :meth:`step`)."""
        if weight is not None:
            weight = self._check_step_weight(weight)  # before the closure: a bad weight changes nothing
        result = self._run_closure(closure)
        if loss is None and result is None and isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError(_PLATEAU_NEEDS_LOSS)  # before any change
        self._misuse.on_micro_step(self)  # .grad cleared behind our back, schedulers, clipping, model.to()
        weight, weight_in_grad = self._take_weight(weight)
        found_inf = getattr(self, "found_inf", None)  # set by an external ``scaler.step(opt)``
        factor, found = self._guard.micro_factor(found_inf, getattr(self, "grad_scale", None), self._store.micro_grads)
        if self._noise is not None and self._grads_are_this_micro_batch():
            grad_factor = _times(factor, self._window.unit()) if weight_in_grad else factor
            self._noise.on_micro_step(self._store, weight, grad_factor, found, weight_in_grad=weight_in_grad,
                                      loss_scale=self._guard.loss_scale())
        if found_inf is not None and self._store.has_inplace():
            raise RuntimeError("scaler.step(opt) on every micro-batch with mode='inplace': the scale may change "
                               "mid-window and cannot be taken out of a summed .grad. Use mode='buffered', or give "
                               "the scaler to the wrapper (scaler=...) and call opt.step().")
        self._sync.end_micro_batch()  # DDP: did this micro-batch's forward run with synchronisation on?
        self._store.accumulate(factor if weight_in_grad else _times(factor, weight), dropped=found,
                               closing=self._window.next_is_last and not self._sync.distributed)
        counted = weight if found is None else weight * (1.0 - found)  # dropped: 0 (found is in weight_dtype)
        self._window.add(counted)
        self._stats.on_micro_step(counted, result if loss is None else loss, found)
        self._stepped = False
        if self._window.full:
            self._update()
        self._sync.set(self._window.next_is_last)
        self._misuse.after_micro_step()
        return result

    @torch.no_grad()  # flush() calls it directly
    def _update(self) -> None:
        """The real update: mean, unscale, check, clip, one host read, step, scheduler, reset."""
        local_total = self._window.total  # this rank's own (the reduction replaces it)
        self._sync.reduce(self._store, self._window)  # data-parallel: make sums and total global (once)
        world = self._sync.world_size if self._sync.distributed else 1
        if world > 1:
            self._stats.make_global(self._store.device, self._sync.group, world)
        self._check_total()
        norm = found = None
        read = HostRead()
        try:
            self._store.finalize(self._window.grad_factor())
            found = self._guard.unscale_and_check(self.optimizer, self._store.grads, self._window.total)
            if self._noise is not None:
                mean_factor = self._window.inv_total() if self._window.reduction == "sum" else 1.0
                self._noise.on_update(self._store, self._sync, self._window.total, found, mean_factor)
            norm = self._clipper(list(self._store.params))
            self._request_reads(read, found, norm, local_total, world)
            read.run()  # the one host read of this update (none when nothing asked)
            applied = self._guard.apply(self.optimizer, read, self._describe_nonfinite)
        except BaseException as error:  # "raise" policy, or any failure before the step: discard the window
            self._stats.on_update(False, norm, found, self._window.total)
            self._abandon_window(closed=True)
            _note(error, "accumopt: this accumulation window was discarded (its gradients are gone; "
                         "the next step() starts a new window)")
            raise
        if applied:
            self._step_scheduler(read.scalar("plateau_metric"))
        self._stats.on_update(applied, norm, found, self._window.total, read, local_total=local_total, world_size=world)
        self._store.reset()
        self._stepped = applied
        try:
            self._window.close()  # the next K: a schedule may raise here, after the update stands
        except (TypeError, ValueError) as error:
            self._sync.set(self._window.next_is_last)
            _note(error, f"accumopt: the window's update was {'applied' if applied else 'skipped'}; "
                         f"K stays {self._window.k}")
            raise

    def _request_reads(self, read: HostRead, found: Tensor | None, norm: Tensor | None,
                       local_total: "float | Tensor", world: int) -> None:
        """Everything the host needs from this update, asked of its single read (see :mod:`accumopt.hostread`)."""
        self._guard.request(read, found, self._store.drop_resolver())
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            metric = self._stats.window_mean_loss()
            if metric is not None:
                read.add("plateau_metric", metric)
        noise = self._noise.value() if self._noise is not None and self._stats.logs_next_update() else None
        self._stats.request(read, norm, self._window.total, k=self._window.k, noise_scale=noise,
                            world_size=world, local_total=local_total)
        self._window.schedule.request(read, self._window.closed + 1)  # AdaptiveK: its estimate

    def _check_total(self) -> None:
        """Refuse (and discard) a window whose weights sum to 0, where the host knows the total for free."""
        total = self._window.total
        if isinstance(total, Tensor):
            if total.device.type != "cpu" or self._guard.may_drop:
                return  # a device total is never read here; a dropped window is skipped, not refused
            total = float(total)
        if total <= 0:
            n = self._window.count
            self._abandon_window(closed=True)  # nothing half-applied
            raise ValueError(f"Invalid weights: the {n} micro-batch weights of this window sum to 0 "
                             "(expected a positive total; the window was discarded)")

    def flush(self) -> bool:
        """Apply the partial window now (end of epoch or data), averaged over the micro-batches seen.

        Returns:
            Whether an update was applied (False when the window was empty or skipped).
        """
        if self._window.count == 0:
            self._stepped = False
            return False
        self._sync.prepare_flush()  # its last backward did not synchronise: reduce explicitly
        self._update()
        self._sync.set(self._window.next_is_last)
        return self._stepped

    def discard(self) -> None:
        """Forget the pending window unapplied (after an unrecoverable error mid-window).

        Parameters and optimizer state are untouched; the next ``step()`` starts a window of the same K.
        Data-parallel: discard on every rank.
        """
        self._abandon_window(closed=False)

    def _abandon_window(self, *, closed: bool) -> None:
        """Forget the pending window in every piece; ``closed``: it counts as a closed window."""
        self._backward_weight = None
        self._store.reset()
        self._stats.discard_window()
        self._guard.discard_window()
        if self._noise is not None:
            self._noise.discard_window()
        if closed:
            self._window.close()
        else:
            self._window.discard()
        self._sync.set(self._window.next_is_last)

    def backward(self, loss: Tensor, *, weight: "float | Tensor | None" = None, **kwargs: Any) -> None:
        """``loss.backward()`` with the owned scaler's scale and the micro-batch weight applied (both modes).

        Args:
            loss: this micro-batch's loss.
            weight: its weight, as for :meth:`step` (remembered for the next ``step()``).
            **kwargs: passed to ``loss.backward()``.
        """
        w = check_micro_weight(weight) if weight is not None else None
        inplace, ref = self._store.has_inplace(), self._window.ref
        if w is None and inplace and ref is not None and not _is_one(ref):
            w = 1.0  # the window's sums are relative to ref: an unweighted loss counts 1 / ref of it
        if w is None or not inplace:
            ref = None  # the loss unweighted (every parameter buffered: step() weights in the buffer's precision)
        elif ref is None and self._guard.scaler is not None and not self._sync.distributed:
            # the window's first weight, so that an owned GradScaler sees numbers near 1 (not with a process group:
            # each rank would have its own while the model averages the sums); 0 keeps 1, compared without a sync
            ref = torch.where(w > 0, w, torch.ones_like(w)) if isinstance(w, Tensor) else (w if w > 0 else 1.0)
        elif ref is None:
            ref = 1.0
        if self._backward_weight is not None and not inplace:
            raise ValueError(
                "Invalid weight: a second opt.backward() in one micro-batch after a weighted one, with every parameter "
                "in a buffer (mode='buffered', or bf16/fp16 parameters): step() applies the weight to the "
                "micro-batch's whole gradient. Combine the losses into one backward, e.g. opt.backward((w_a * loss_a "
                "+ w_b * loss_b) / (w_a + w_b), weight=w_a + w_b), or call opt.step() between them")
        if w is not None and ref is not None:
            loss = loss * (w if isinstance(ref, float) and ref == 1.0 else w / ref)  # no operation for the number 1
        self._guard.scale_loss(loss).backward(**kwargs)  # type: ignore[no-untyped-call]
        self._record_backward_weight(w, ref)

    def _record_backward_weight(self, weight: "float | Tensor | None", ref: "float | Tensor | None" = 1.0) -> None:
        """Remember the checked ``weight`` given to backward (loss times ``weight / ref``; ref None: plain loss)."""
        if weight is None:
            return
        if ref is not None:
            if self._window.ref is None:
                self._window.ref = ref
            elif self._window.ref is not ref and not (_is_one(ref) and _is_one(self._window.ref)):
                raise ValueError("Invalid weight: this micro-batch's loss was weighted relative to another reference "
                                 "than the window's first micro-batch (opt.backward and a captured step mixed in one "
                                 "window); weight the micro-batches of a window the same way")
        self._backward_weight = weight if self._backward_weight is None else self._backward_weight + weight
        self._weight_in_grad = ref is not None

    @contextlib.contextmanager
    def _open_ended_window(self) -> Iterator[None]:
        """Inside the block the window does not close by itself, whatever K is (only :meth:`flush` closes it)."""
        self._window.open_ended = True
        try:
            yield
        finally:
            self._window.open_ended = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients that are not part of the pending window (safe anywhere in the loop)."""
        if self._window.count == 0:
            self.optimizer.zero_grad(set_to_none=set_to_none)
            self._backward_weight = None  # its gradient is gone: so is the weight given to backward()
        elif not self._store.has_inplace():
            self._store.clear_micro_grads(set_to_none)
            self._backward_weight = None
        else:
            for p in self._store.excluded:  # in-place sums in .grad stay until the window closes
                p.grad = None
        self._store.zero_grads(set_to_none)  # False: as in torch, a parameter keeps a zero .grad

    def set_epoch(self, epoch: int) -> None:
        """Tell the K schedule the current epoch (takes effect when the current window closes)."""
        self._window.set_epoch(epoch)
        self._sync.set(self._window.next_is_last)  # K may have changed for the next window

    # ``param_groups``, ``state`` and ``defaults`` ARE the wrapped optimizer's, read through on every
    # access: torch's ``Optimizer.load_state_dict`` replaces its lists, and a bound copy would go stale.
    param_groups: _Shared[list[dict[str, Any]]] = _Shared()
    state: _Shared[Any] = _Shared()
    defaults: _Shared[dict[str, Any]] = _Shared()

    @property
    def accumulation_steps(self) -> int:
        """K of the current window."""
        return self._window.k

    @property
    def pending(self) -> int:
        """Micro-batches accumulated in the current window."""
        return self._window.count

    @property
    def num_updates(self) -> int:
        """Real updates applied so far."""
        return self._stats.updates

    @property
    def stepped(self) -> bool:
        """Whether the last ``step()`` (or ``flush()``) applied an update."""
        return self._stepped

    @property
    def sync_gradients(self) -> bool:
        """Whether the next backward pass closes the window (and so should reduce gradients)."""
        return self._window.next_is_last

    @property
    def mode(self) -> str:
        """``"inplace"`` or ``"buffered"``."""
        return self._store.mode

    @property
    def scaler(self) -> "torch.amp.GradScaler | None":
        """The owned ``GradScaler`` (None without one, or when the one given was disabled)."""
        return None if self._guard.scaler is None else self._guard.scaler.scaler

    @property
    def epoch(self) -> int:
        """The epoch last given to :meth:`set_epoch` (0 until then)."""
        return self._window.epoch

    @property
    def last_grad_norm(self) -> Tensor | float | None:
        """The last window's pre-clip gradient norm as held (read-only; a device tensor: no sync).

        None before the first window closes, and always without clipping or ``track_grad_norm``.
        """
        return self._stats.last_norm

    def stats(self) -> dict[str, Any]:
        """Statistics as Python numbers (keys: docs/state.md); the only call that reads device values."""
        out = self._stats.snapshot({} if self._noise is None else self._noise.values(), self._device())
        if "noise_scale" in out:  # the noise keys are there only with an estimator
            out["noise_scale"] = usable_noise_scale(out["noise_scale"])
        if out.get("noise_windows") is not None:
            out["noise_windows"] = int(out["noise_windows"])
        out.update(accumulation_steps=self._window.k, pending=self._window.count,
                   buffer_bytes=self._store.buffer_bytes())
        return out

    get_accumulation_stats = stats

    def noise_scale(self) -> Tensor | None:
        """The smoothed noise scale ``tr(Sigma) / |G|^2`` as a 0-dim device tensor (no sync), in the unit of the
        micro-batch weights (samples with ``weight=n``, else micro-batches); None: off; NaN: no usable window yet."""
        return None if self._noise is None else self._noise.value()

    def accumulated_gradients(self) -> dict[str, Tensor]:
        """The pending window's gradient sums by parameter name (empty when no window is pending).

        Keys are the model's names (``model=``), else ``"param_groups[i]['params'][j]"``. Each is the undivided
        ``sum(w_i g_i)`` so far in its accumulation dtype (fp32 for bf16/fp16 parameters), times the owned scaler's
        scale (divided by the window's first weight where :meth:`backward`'s weights are scale-free). Read-only
        views of the live sums, valid until the window changes; no host synchronisation.
        """
        if self._window.count == 0:
            return {}
        labels = self._labels()
        return {labels[id(p)]: t for p, t in self._store.pending_sums()}

    def save(self, path: "str | os.PathLike[str]", extra: Any = None) -> None:
        """Write :meth:`state_dict` (and optional plain ``extra`` data) to ``path`` atomically.

        A crash during the save leaves the previous file intact. With DDP and a window pending, call it on every
        rank (see :meth:`state_dict`); write from one rank.
        """
        checkpoint.save_checkpoint(path, self.state_dict(), extra)

    def load(self, path: "str | os.PathLike[str]") -> Any:
        """Restore a file of :meth:`save` and return its ``extra`` (a bad file: ``ValueError``, nothing changed)."""
        sd, extra = checkpoint.load_checkpoint(path, map_location=self._device())
        self.load_state_dict(sd)
        return extra

    save_accumulation_state = save
    load_accumulation_state = load

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer and give its parameters buffers."""
        self._store.check_new_group(param_group, self.optimizer.param_groups)  # bad accumulation_weight: nothing added
        self.optimizer.add_param_group(param_group)
        self._store.refresh(self.optimizer.param_groups)

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """Register a hook run before each real update (``hook(wrapper, args, kwargs)``)."""
        return self.optimizer.register_step_pre_hook(lambda _opt, args, kwargs: hook(self, args, kwargs))

    def register_step_post_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """Register a hook run after each real update (``hook(wrapper, args, kwargs)``)."""
        return self.optimizer.register_step_post_hook(lambda _opt, args, kwargs: hook(self, args, kwargs))

    def _components(self) -> dict[str, Any]:
        """The state-dict entries owned by components, in file order (None: not configured)."""
        return {"window": self._window, "sums": self._store, "stats": self._stats, "precision": self._guard,
                "noise": self._noise, "scaler": self._guard.scaler, "scheduler": self.scheduler}

    def _signature(self) -> dict[str, Any]:
        names = None if self._names is None else list(self._labels().values())  # in optimizer order
        return checkpoint.signature(self.optimizer, mode=self._store.mode, k=self._window.schedule.describe(),
                                    scaler=self._guard.scaler is not None, scheduler=self.scheduler,
                                    lr_scaling=self._window.lr_scaling_rule, names=names)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus an ``"accumulation"`` entry for a bit-identical resume.

        Like torch's, it refers to live state tensors. With DDP and a window pending, call it on every rank (it
        averages the pending sums, so that rank 0's checkpoint resumes every rank).
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        if self._store.has_fresh_grads() or (self._backward_weight is not None and not self._weight_in_grad):
            raise RuntimeError("state_dict() between backward() and step(): this micro-batch's gradient is in .grad, "
                               "outside the accumulation buffers, and a checkpoint cannot resume it. Call "
                               "state_dict() (or save()) after opt.step().")
        self._sync.consolidate(self._store, self._window)
        sd = self.optimizer.state_dict()
        pre = self._backward_weight
        sd["accumulation"] = {
            "format": checkpoint.STATE_FORMAT, "version": checkpoint.STATE_VERSION, "signature": self._signature(),
            **{key: None if c is None else c.state_dict() for key, c in self._components().items()},
            "stepped": bool(self._stepped), "pre_weight": pre.detach().clone() if isinstance(pre, Tensor) else pre}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            sd = sd if result is None else result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a plain one: the optimizer only), all validated first (``ValueError``)."""
        sd: Any = state_dict
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, sd)
            sd = sd if result is None else result
        if not isinstance(sd, Mapping):
            raise ValueError(f"Invalid state dict: a {type(sd).__name__} (expected a dict)")
        sd = dict(sd)
        acc = sd.pop("accumulation", None)
        self._validate_state(sd, acc)
        # Copies first (an allocation failure here changes nothing), then the changes.
        sd = checkpoint.clone_tree(sd)
        checkpoint.load_inner_keeping_identity(self.optimizer, sd)
        self._backward_weight = None
        if acc is None:  # a plain optimizer state dict: no window to resume
            self.discard()
            return
        device = self._device()
        acc = {k: v if k == "sums" else checkpoint.clone_tree(v, None if k in ("scheduler", "scaler") else device)
               for k, v in acc.items()}  # the store copies the sums itself: one copy of them, not two
        for key, component in self._components().items():
            if component is not None and acc.get(key) is not None:
                component.load_state_dict(acc[key])
            elif key in ("precision", "noise") and component is not None:
                component.discard_window()  # saved without it: no window measurements to resume
        self._stepped = bool(acc.get("stepped", False))
        pre = acc.get("pre_weight")
        self._backward_weight = pre if isinstance(pre, Tensor) else (None if pre is None else float(pre))
        self._weight_in_grad = pre is not None  # in .grad (in-place sums only)
        self._sync.set(self._window.next_is_last)
        for load_post_hook in self._optimizer_load_state_dict_post_hooks.values():
            load_post_hook(self)

    def _validate_state(self, sd: dict[str, Any], acc: Any) -> None:
        """Raise ``ValueError`` unless the optimizer part ``sd`` and the accumulation entry ``acc`` fit."""
        checkpoint.validate_optimizer_state(sd, self.param_groups)
        if acc is not None:
            if not isinstance(acc, Mapping):
                raise ValueError(f"Invalid state dict: the accumulation entry is a {type(acc).__name__} "
                                 "(expected a dict)")
            checkpoint.check_header(acc)  # legacy or unsigned entries cannot be checked: refused
            acc_required = ("window", "sums", "stats")
            for key in acc_required:
                if key not in acc:
                    raise ValueError(f"Invalid state dict: accumulation entry lacks {key!r}")
            checkpoint.compare_signatures(acc.get("signature"), self._signature())
            for key, component in self._components().items():
                state = acc.get(key)
                if key in ("scheduler", "scaler") and state is None and component is not None:
                    owned, lost = ("GradScaler", "scale") if key == "scaler" else (type(component).__name__, "state")
                    raise ValueError(f"Invalid state dict: the {key} entry is None (this optimizer owns a {owned}: "
                                     f"its {lost} would not be restored)")
                elif key == "scheduler" and state is not None and not isinstance(state, Mapping):
                    raise ValueError(f"Invalid state dict: the scheduler entry is a {type(state).__name__} "
                                     "(expected a dict)")
                elif key == "scaler" and state is not None:
                    LossScaler.validate_state_dict(state)  # also without an owned scaler
                elif key == "noise" and component is not None and state is not None:
                    component.validate_state_dict(state, closed=acc["window"]["closed"])  # after the window's
                elif key != "scheduler" and component is not None and (state is not None or key in acc_required):
                    component.validate_state_dict(state)  # an entry absent when saved (noise): not resumed
            stepped = acc.get("stepped", False)
            if not isinstance(stepped, bool):
                raise ValueError(f"Invalid state dict: 'stepped' is {stepped!r} (expected True or False)")
            pre = acc.get("pre_weight")
            if pre is not None:
                check_state_scalar("pre_weight", pre)
                value = host_float(pre)
                if not (math.isfinite(value) and value >= 0):
                    raise ValueError(f"Invalid state dict: 'pre_weight' is {value!r} (expected a finite weight >= 0)")
                if not self._store.has_inplace():
                    raise ValueError("Invalid state dict: 'pre_weight' (a weight given to backward() before the state "
                                     "was taken) with every parameter buffered (its gradient is not in the state)")
        labels, groups = self._labels(quote=True), self.param_groups
        checkpoint.validate_state_shapes(sd, groups, lambda i, j: labels[id(groups[i]["params"][j])])

    def __getstate__(self) -> dict[str, Any]:
        # An LRScheduler built on the wrapper patches ``self.step`` (an instance attribute bound to
        # *this* object): a copy must not call back into the original. torch drops it the same way.
        state = {k: v for k, v in self.__dict__.items() if k not in ("step", "_opt_called")}
        # Mid-window in-place sums live in the parameters' .grad, which copies of parameters leave behind.
        state["_carried_grads"] = self._misuse.carry()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        grads = state.pop("_carried_grads", None)
        self.__dict__.update(state)
        self._misuse.restore(grads)
        self._misuse.attach(self)

    def __repr__(self) -> str:
        return (f"AccumulatingOptimizer(accumulation_steps={self._window.k}, mode={self._store.mode!r}, "
                f"optimizer={self.optimizer!r})")

    def _device(self) -> torch.device:
        """The parameters' device (CPU when they are on several)."""
        devices = {p.device for g in self.param_groups for p in g["params"]}
        return next(iter(devices)) if len(devices) == 1 else torch.device("cpu")

    def _labels(self, *, quote: bool = False) -> dict[int, str]:
        """``{id(param): its model name (quoted: repr), else "param_groups[i]['params'][j]"}``."""
        names: Mapping[int, str] = self._names or {}
        show = repr if quote else str
        return {id(p): show(names[id(p)]) if names.get(id(p)) else f"param_groups[{i}]['params'][{j}]"
                for i, g in enumerate(self.param_groups) for j, p in enumerate(g["params"])}

    def _accumulated_in_grad(self) -> set[int]:
        """Ids of the parameters whose window sum lives in their own ``.grad`` (for graph capture)."""
        return {id(p) for g in self._store.groups if g.buffers is None for p in g.params}

    def _grads_are_this_micro_batch(self) -> bool:
        """Whether every ``.grad`` holds this micro-batch's gradient alone (not a partial or reduced sum)."""
        return not self._store.has_inplace() or (
            self._window.count == 0 and not (self._sync.distributed and self._window.next_is_last))

    def _run_closure(self, closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        if self._guard.scaler is not None or "found_inf" in self.__dict__ or "grad_scale" in self.__dict__:
            # Owned scaler, or an external ``scaler.step(opt, closure)`` (the closure passed positionally
            # slips past GradScaler's own keyword check): the closure's backward would be unscaled.
            raise ValueError("Closures are not supported with a GradScaler (GradScaler refuses closures too)")
        with torch.enable_grad():
            return closure()

    def _check_step_weight(self, weight: Any) -> "float | Tensor":
        w = check_micro_weight(weight)
        if self._backward_weight is not None:
            raise ValueError("Invalid weight: given both to backward() and to step() for one micro-batch")
        if self._store.has_inplace() and not _is_one(w):
            raise ValueError("Invalid weight: step(weight=...) with mode='inplace': this micro-batch's gradient is "
                             "already summed into .grad and cannot be reweighted. Give the weight before backward "
                             "with opt.backward(loss, weight=n), or build the wrapper with mode='buffered'.")
        return w

    def _take_weight(self, weight: "float | Tensor | None") -> "tuple[float | Tensor, bool]":
        """This micro-batch's weight, and whether it is already in ``.grad`` (given to ``backward()``)."""
        given, self._backward_weight = self._backward_weight, None
        in_grad, self._weight_in_grad = self._weight_in_grad, False
        if weight is not None or given is not None:
            self._window.weighted = True  # totals may now differ across ranks (see sync.reduce)
        if given is not None and in_grad:
            return given, True
        window_ref = self._window.ref
        if window_ref is not None and not _is_one(window_ref) and self._store.has_inplace():
            raise ValueError("Invalid weight: a micro-batch whose loss was not weighted with opt.backward(loss, "
                             "weight=...) in a window whose first micro-batch was; its gradient is already summed "
                             "into .grad in another unit. Call opt.backward(loss, weight=n) for every micro-batch of "
                             "the window (weight=1 for the others).")
        if self._store.has_inplace() and window_ref is None:
            self._window.ref = 1.0  # a plain first micro-batch: the window's sums are in units of 1
        # step()'s weight (_check_step_weight refused one given to backward() too), else backward()'s, applied now
        return (weight if weight is not None else 1.0 if given is None else given), False

    def _step_scheduler(self, metric: float | None = None) -> None:
        """Step the scheduler after an applied update; ``metric``: the window's mean loss, read with the update."""
        if self.scheduler is None:
            return
        plateau = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if plateau and metric is None:
            raise ValueError(_PLATEAU_NEEDS_LOSS)
        with self._window.scheduler_lr():  # lr_scaling: the scheduler sees and sets unscaled LRs
            self.scheduler.step(*([metric] if plateau else []))

    def _describe_nonfinite(self) -> str:
        for p, label in zip((p for g in self.param_groups for p in g["params"]), self._labels(quote=True).values()):
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return f"parameter {label}" if label.startswith(("'", '"')) else label
        return "a parameter"


def _times(factor: "float | Tensor", weight: "float | Tensor") -> "float | Tensor":
    """``factor * weight``, without an operation when ``factor`` is the number 1."""
    return weight if isinstance(factor, float) and factor == 1.0 else factor * weight
