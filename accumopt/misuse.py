"""Misuse the wrapper can see for free, reported once per wrapper with what to do (table: docs/core.md).

Everything here is Python-side bookkeeping (object identity, counters, version counters): nothing reads a
device value, so a micro-step that does not update stays free of host synchronisation.
"""

from __future__ import annotations

import warnings
import weakref
from operator import attrgetter, is_
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .buffers import GradientStore
from .schedule import Window
from .stats import Statistics
from .sync import GradSync

__all__ = ["MisuseDetector", "MisuseWarning"]

_grad_of = attrgetter("grad")
_deref = weakref.ref.__call__  # what a recorded reference points to now (None: gone)


# Recorded for a parameter without a gradient: dead from the start, so calling it gives None, as for a freed gradient.
_ABSENT: "weakref.ref[Any]" = weakref.ref(set())


def _ref(grad: Tensor | None) -> "weakref.ref[Any]":
    """A weak reference to ``grad`` (the window's sum must not be kept alive by its watcher)."""
    return _ABSENT if grad is None else weakref.ref(grad)


class MisuseWarning(UserWarning):
    """A use of :class:`~accumopt.AccumulatingOptimizer` that trains differently from the large batch."""


class _Counter:
    """Counts accumulations into one parameter's ``.grad``, and whether one found ``.grad`` cleared (None)."""

    __slots__ = ("n", "found_none", "_param")

    def __init__(self) -> None:
        self.n = 0
        self.found_none = False
        self._param: weakref.ref[Tensor] | None = None

    def __call__(self, _param: Tensor) -> None:
        self.n += 1

    def before(self, grad: Tensor) -> None:
        """A gradient reaches the parameter (a tensor hook runs before it is accumulated)."""
        param = None if self._param is None else self._param()
        if param is not None and param.grad is None:
            self.found_none = True

    def hook(self, param: Tensor) -> list[RemovableHandle]:
        """Count on ``param`` from now on; the handles of both hooks."""
        self._param = weakref.ref(param)  # weak: the hooks live on the parameter
        before: RemovableHandle = param.register_hook(self.before)  # type: ignore[no-untyped-call]
        return [before, param.register_post_accumulate_grad_hook(self)]  # type: ignore[no-untyped-call]


class _Pending:
    """What the end-of-life check needs (never the wrapper): its window, and where a checkpoint caught it."""

    __slots__ = ("window", "saved")

    def __init__(self, window: Window) -> None:
        self.window = window
        self.saved: tuple[int, int] | None = None  # (windows closed, micro-batches pending) at the last state_dict()

    def lost(self) -> int:
        """Micro-batches pending and in no checkpoint (0: nothing lost)."""
        w = self.window
        return 0 if not w.count or self.saved == (w.closed, w.count) else w.count


def _release(pending: _Pending, hooks: list[RemovableHandle]) -> None:
    """The wrapper is gone (or the interpreter exits): say so if its window was pending; drop the hook."""
    for handle in hooks:
        handle.remove()
    hooks.clear()
    if count := pending.lost():
        warnings.warn(
            f"An AccumulatingOptimizer was destroyed (or the program ended) with {count} micro-batch(es) "
            "pending in its accumulation window: their gradients were never applied. Call opt.flush() after the "
            "last micro-batch of an epoch or of training (it applies the partial window, averaged over what it "
            "saw), or opt.discard() to drop it on purpose. (A window saved by state_dict() since its last "
            "micro-batch is not reported: it resumes from the checkpoint.)", MisuseWarning, stacklevel=2)


def _lr_key(lr: Any) -> Any:
    """What identifies a learning rate without reading a device: the number, or a tensor and its version."""
    return (id(lr), lr._version) if isinstance(lr, Tensor) else lr


class MisuseDetector:
    """Watches the loop around one wrapper; each check costs a few Python operations per micro-step.

    The wrapper calls :meth:`on_micro_step` at the start of each ``step()`` (before it changes anything),
    :meth:`after_micro_step` at its end, and :meth:`attach` once it exists (and again in a copy).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, store: GradientStore, window: Window, sync: GradSync,
                 stats: Statistics, scheduler: Any = None) -> None:
        self.optimizer = optimizer
        self.store = store
        self.window = window
        self.sync = sync
        self.stats = stats
        self.scheduler = scheduler
        self.reported: set[str] = set()
        self._hooks: list[RemovableHandle] = []
        self._counter = _Counter()
        self._pending = _Pending(window)
        self._lr_window: int | None = None  # the window in which the LR last changed mid-window
        self._lr_changes = 0  # LR changes seen in that window
        self._lr_run = 0  # consecutive windows with an LR change, up to that one
        self._plan()
        self._record()
        self._offset: int | None = None  # a scheduler restored before the first micro-step is its own business

    def _plan(self) -> None:
        """Which parameters sum in ``.grad``; the one whose accumulations are counted (hook moved to it)."""
        self._groups = len(self.store.groups)
        self._params = [p for g in self.store.groups if g.buffers is None for p in g.params]
        self._seen: list[weakref.ref[Any]] | None = None  # .grad of each, weakly, at the last micro-step
        sentinel = next((p for p in self._params if p.is_leaf and p.requires_grad), None)
        if self._hooks and (sentinel is None or sentinel is not getattr(self, "_sentinel", None)):
            for handle in self._hooks:
                handle.remove()
            self._hooks.clear()
        self._sentinel = sentinel
        if sentinel is not None and not self._hooks:
            self._hooks.extend(self._counter.hook(sentinel))

    def attach(self, owner: object) -> None:
        """Warn if ``owner`` (the wrapper) is destroyed, or the program ends, with its window pending."""
        weakref.finalize(owner, _release, self._pending, self._hooks)

    def on_micro_step(self, owner: Any) -> None:
        """Check what happened since the last micro-step (raise before the wrapper changes anything)."""
        if len(self.store.groups) != self._groups:  # add_param_group
            self._plan()
        if self.scheduler is not None and self._offset is not None and \
                self.scheduler.last_epoch - self.stats.updates > self._offset:
            self._report("scheduler", _SCHEDULER_GIVEN.format(name=type(self.scheduler).__name__))
        if self.window.count == 0:  # a new window: nothing of it can have been lost yet
            self._seen = None
            if self.store.layout_changed():
                self.store.replan()
                self._plan()
            return
        seen = self._seen
        if seen is not None and not all(map(is_, map(_grad_of, self._params), map(_deref, seen))):
            self._check_replaced(seen)
        grad = None if self._sentinel is None else self._sentinel.grad
        if grad is self._s_grad() and grad is not None and not self.sync.distributed and \
                grad._version - self._s_version > self._counter.n - self._s_count:
            self._report("clip", _CLIPPED)
        if _lr_key(self.optimizer.param_groups[0]["lr"]) != self._lr:
            self._lr_changed(owner)

    def after_micro_step(self) -> None:
        """Remember what the next micro-step compares with."""
        if self.window.count and self._seen is None:
            self._seen = [_ref(p.grad) for p in self._params]
        elif not self.window.count:
            self._seen = None
        self._record()

    def on_save(self, _owner: Any = None, _state: Any = None) -> None:
        """``state_dict()`` was taken: the pending window is in a checkpoint (no end-of-life warning for it)."""
        self._pending.saved = (self.window.closed, self.window.count)

    def on_load(self, _owner: Any = None) -> None:
        """The wrapper's own ``load_state_dict`` set ``.grad`` and the counters: they are the window's."""
        self._seen = [_ref(p.grad) for p in self._params] if self.window.count else None
        self._record()
        self._offset = None  # the scheduler may be restored right after: baseline at the next micro-step
        self._pending.saved = (self.window.closed, self.window.count)  # the window is in the file it came from

    def _record(self) -> None:
        grad = None if self._sentinel is None else self._sentinel.grad
        self._s_grad = _ref(grad)
        self._s_version = 0 if grad is None else grad._version
        self._s_count = self._counter.n
        self._counter.found_none = False
        self._lr = _lr_key(self.optimizer.param_groups[0]["lr"])
        self._offset = 0 if self.scheduler is None else self.scheduler.last_epoch - self.stats.updates

    def _check_replaced(self, seen: list[weakref.ref[Any]]) -> None:
        """Some ``.grad`` is not the tensor of the last micro-step: legitimate, or the window is lost."""
        lost = []
        for i, (p, recorded) in enumerate(zip(self._params, seen)):
            now, before = p.grad, recorded()
            if now is before or recorded is _ABSENT:
                continue  # unchanged, or its first gradient of the window
            if now is not None and not (p is self._sentinel and self._counter.found_none):
                # backward(create_graph=True), sparse sums, DDP's bucket views and a user's own
                # ``p.grad = f(p.grad)`` replace .grad by a tensor that carries the sum: it becomes the window's.
                continue
            lost.append(i)  # cleared (model.zero_grad(), a framework), then maybe a backward into a fresh .grad
        self._seen = [_ref(p.grad) for p in self._params]
        if lost and "cleared" not in self.reported:
            self.reported.add("cleared")
            p = self._params[lost[0]]
            raise RuntimeError(
                f"accumopt: the pending accumulation window was lost: the .grad of {len(lost)} parameter(s) "
                f"(the first of shape {tuple(p.shape)}) was cleared since the last micro-step, outside the "
                f"optimizer, so the sums of its first {self.window.count} micro-batch(es) are gone. In "
                "mode='inplace' the window's sum lives in .grad: call opt.zero_grad() (which keeps the pending "
                "sum), not model.zero_grad(); with a framework that calls model.zero_grad() after every "
                "optimizer step (the Hugging Face Trainer does), build the wrapper with mode='buffered', or "
                "use accumopt.integrations.transformers.AccumulatingTrainer.")

    def _lr_changed(self, owner: Any) -> None:
        """The LR changed inside a window: twice in one window (K >= 3), or in three windows in a row (K = 2,
        one micro-step a window is checked), is a scheduler stepping per micro-batch; a per-epoch scheduler
        changes it once in a while, also with epochs barely longer than a window."""
        closed = self.window.closed
        if self._lr_window == closed:
            self._lr_changes += 1
        else:
            self._lr_run = self._lr_run + 1 if self._lr_window is not None and closed - self._lr_window == 1 else 1
            self._lr_changes = 1
        self._lr_window = closed
        again = self._lr_changes >= 2 or (self.window.k <= 2 and self._lr_run >= 3)
        scheduled = any(hasattr(getattr(o, "step", None), "_wrapped_by_lr_sched") for o in (owner, self.optimizer))
        if again and scheduled:
            self._report("scheduler", _SCHEDULER_FOUND)

    def _report(self, kind: str, message: str) -> None:
        if kind not in self.reported:
            self.reported.add(kind)
            warnings.warn(message, MisuseWarning, stacklevel=5)

    def carry(self) -> list[Tensor | None] | None:
        """The pending in-place sums, which a copy must take along (None: none pending): they live in the
        parameters' ``.grad``, which ``copy.deepcopy`` and pickle of a parameter leave behind."""
        if not self.window.count or not self._params:
            return None
        return [p.grad for p in self._params]

    def restore(self, grads: list[Tensor | None] | None) -> None:
        """Put sums from :meth:`carry` (copied along with the parameters) back into ``.grad``."""
        if grads is not None:
            for p, g in zip(self._params, grads):
                p.grad = g

    def __getstate__(self) -> dict[str, Any]:
        # The hooks belong to the original's parameter; weak references (set again on arrival) are not copied:
        # the copy records its own at its next micro-step.
        return {**self.__dict__, "_hooks": [], "_counter": _Counter(), "_seen": None, "_s_grad": None, "_s_count": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._s_grad = _ABSENT
        if self._sentinel is not None:
            self._hooks.extend(self._counter.hook(self._sentinel))


_SCHEDULER_GIVEN = (
    "accumopt: the scheduler {name} given as scheduler= was stepped more often than the real updates: the "
    "wrapper already steps it once after each real update, so stepping it in the loop too (for example on "
    "every micro-batch) runs the schedule too fast. Remove your own scheduler.step() call.")
_SCHEDULER_FOUND = (
    "accumopt: the learning rate keeps changing inside accumulation windows: a scheduler built on the "
    "AccumulatingOptimizer (or on the optimizer it wraps) seems to be stepped on every micro-batch, so the "
    "schedule runs K times too fast. Step it only after real updates (if opt.stepped: scheduler.step()), or "
    "give it to the wrapper as AccumulatingOptimizer(..., scheduler=...), which steps it once per update. "
    "(A time-based schedule stepped with an explicit epoch, such as CosineAnnealingWarmRestarts.step(epoch + "
    "i / iters), is not sped up: only the LR at each real update is used; filter this warning then.)")
_CLIPPED = (
    "accumopt: the pending window's .grad was changed in place between micro-steps (typically "
    "torch.nn.utils.clip_grad_norm_ on every micro-batch): that clips a partial sum, not the window's mean "
    "gradient. Remove the clipping call and pass max_grad_norm= to the AccumulatingOptimizer, which clips the "
    "whole window once before the update.")
