"""Graph-captured micro-steps: a micro-batch's forward and backward replayed as one CUDA graph (docs/graphs.md).

Only ``loss_fn``, the weight and scaler scale, and ``backward()`` are captured; ``step()`` stays eager, and so does
the whole micro-step where no graph can be used (CPU, DDP/FSDP, a ragged batch, a failed capture).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from typing import Any, Callable, Iterator, Sequence, cast

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ._checks import check_choice, check_int
from .amp import scale_tensor
from .optimizer import AccumulatingOptimizer
from .sync import GradSync, unwrap_model
from .weights import check_micro_weight

__all__ = ["CapturedMicroStep", "capture_micro_step"]

LossFn = Callable[[torch.nn.Module, Any], Tensor]

# Registrations (``module.weight = nn.Parameter(...)``, ``register_buffer``, a new submodule) anywhere
# bump a process-wide counter and stamp the module they happen on. A CapturedMicroStep compares the
# counter (one int) on every call and, only when it moved, looks for newer stamps on its own model's
# modules: a module built elsewhere does not disturb its window.
_registrations = 0
_stamps: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()
CAPTURE_ERROR_MODES = ("global", "thread_local", "relaxed")


def _count_registration(module: torch.nn.Module, name: str, value: Any) -> None:
    global _registrations
    _registrations += 1
    _stamps[module] = _registrations


@functools.cache  # installed once per process
def _install_registration_hook() -> None:
    hooks = torch.nn.modules.module
    for register in (hooks.register_module_parameter_registration_hook, hooks.register_module_buffer_registration_hook,
                     hooks.register_module_module_registration_hook):
        register(_count_registration)


class _CudaGraphBackend:
    """Capture and replay with ``torch.cuda.CUDAGraph`` (the PyTorch CUDA-graph recipe)."""

    def __init__(self, device: torch.device, capture_error_mode: str = "global") -> None:
        self.device = device
        self.capture_error_mode = capture_error_mode

    @contextlib.contextmanager
    def warmup(self) -> Iterator[None]:
        """Run eager warm-up iterations on a side stream, as the CUDA-graph documentation prescribes."""
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            side.wait_stream(current)
            try:
                with torch.cuda.stream(side):
                    yield
            finally:  # also when a warm-up step raises
                current.wait_stream(side)

    def get_rng_state(self) -> Tensor:
        return torch.cuda.get_rng_state(self.device)

    def set_rng_state(self, state: Tensor) -> None:
        torch.cuda.set_rng_state(state, self.device)

    def capture(self, fn: Callable[[], Any], params: Sequence[Tensor],
                generators: Sequence[torch.Generator]) -> tuple[Any, Callable[[], None], Any]:
        """Capture ``fn``; return its (static) output, a replay function and the graph to keep alive."""
        graph = torch.cuda.CUDAGraph()
        for gen in generators:
            graph.register_generator_state(gen)
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream()
            try:
                with torch.cuda.graph(graph, capture_error_mode=self.capture_error_mode):
                    out = fn()
            finally:  # torch.cuda.graph raises for an invalidated capture before it restores the stream
                torch.cuda.set_stream(stream)
        return out, graph.replay, graph


def _make_backend(device: torch.device, capture_error_mode: str = "global") -> Any:
    """The capture backend for ``device`` (tests substitute a simulated one on CPU)."""
    return _CudaGraphBackend(device, capture_error_mode)


class CapturedMicroStep:
    """One accumulation micro-step (forward, loss, backward, accumulate) captured as a CUDA graph.

    Call it as ``loss = step(batch, weight=None)`` instead of ``loss.backward(); opt.step()``: every K-th call
    applies the real update; ``opt.flush()``, ``opt.zero_grad()``, schedulers and checkpoints work as usual.

    Args:
        optimizer: the :class:`AccumulatingOptimizer` whose window the micro-steps fill.
        model: the model; ``loss_fn`` receives it.
        loss_fn: ``loss_fn(model, batch) -> loss``, the micro-batch's mean loss (a one-element tensor; autocast
            inside it or around the call is fine).
        example_batch: a micro-batch of the usual shapes: a tensor or a nested tuple / list / dict of tensors
            (other leaves must stay equal across calls). Its tensors become the graph's static inputs.
        capture: ``None``: capture when the model is on one CUDA device and capture is possible, else run
            eagerly; ``True``: capture or raise ``ValueError``; ``False``: always eager.
        warmup_steps: eager iterations on a side stream before each capture (11 or more for DDP-like hooks).
        generators: extra ``torch.Generator`` objects the model draws from (the default CUDA one always is).
        capture_error_mode: ``torch.cuda.graph``'s ``capture_error_mode``: ``"global"``, ``"thread_local"``
            (when other threads use CUDA meanwhile, such as a pinning ``DataLoader``) or ``"relaxed"``.
    """

    def __init__(self, optimizer: AccumulatingOptimizer, model: torch.nn.Module, loss_fn: LossFn, example_batch: Any,
                 *, capture: bool | None = None, warmup_steps: int = 3, generators: Sequence[torch.Generator] = (),
                 capture_error_mode: str = "global") -> None:
        if not isinstance(optimizer, AccumulatingOptimizer):
            raise TypeError(f"Invalid optimizer: {type(optimizer).__name__} (expected an "
                            "accumopt.AccumulatingOptimizer; wrap your optimizer first)")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Invalid model: {type(model).__name__} (expected a torch.nn.Module)")
        if not callable(loss_fn):
            raise TypeError(f"Invalid loss_fn: {loss_fn!r} (expected a callable loss_fn(model, batch) -> loss)")
        if capture is not None and not isinstance(capture, bool):
            raise TypeError(f"Invalid capture: {capture!r} (expected None, True or False)")
        self.warmup_steps = check_int("warmup_steps", warmup_steps)
        self.capture_error_mode = check_choice("capture_error_mode", capture_error_mode, CAPTURE_ERROR_MODES)
        self.generators = tuple(generators)
        for gen in self.generators:
            if not isinstance(gen, torch.Generator):
                raise TypeError(f"Invalid generators: {gen!r} (expected torch.Generator objects)")
        leaves, spec = pytree.tree_flatten(example_batch)
        if not any(isinstance(x, Tensor) for x in leaves):
            raise ValueError(f"Invalid example_batch: {type(example_batch).__name__} holds no tensor "
                             "(expected a tensor or a tuple / list / dict of tensors)")
        _check_params_in_optimizer(model, optimizer)
        self.optimizer = optimizer
        self.model = model
        self.loss_fn = loss_fn
        self._spec = spec
        self._mode = capture
        self._graph: Any = None
        self._replay: Callable[[], None] | None = None
        self._backend: Any = None
        self._sig: tuple[Any, ...] | None = None
        self._fast: tuple[Any, ...] | None = None
        self._accumulating: list[tuple[Tensor, Tensor]] = []  # (param, static .grad that sums the window)
        self._outputs: list[tuple[Tensor, Tensor]] = []  # (param, static fresh gradient for the buffers)
        self._static_loss: Tensor | None = None
        self.replays = self.eager_steps = self.captures = 0
        _install_registration_hook()
        self._modules: list[torch.nn.Module] = list(model.modules())  # refreshed at each window start
        self._seen = -1  # the process-wide count when the model's stamps were last looked at
        self._version = 0  # the newest stamp on the model
        self._checked = self._model_version()
        self._reason: str | None = self._impossible()  # why micro-steps run eagerly (None: they may be captured)
        if self._reason is not None:
            if capture is True:
                raise ValueError(f"Invalid capture: True, but the micro-step cannot be captured: {self._reason}")
            return
        if capture is False:
            self._reason = "capture=False"
            return
        self._backend = _make_backend(self._device, self.capture_error_mode)
        self._static_leaves = [x.detach().to(self._device, copy=True) if isinstance(x, Tensor) else x for x in leaves]
        self._static_batch = pytree.tree_unflatten(self._static_leaves, spec)
        self._tensor_slots = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
        self._leaf_meta = [(x.shape, x.dtype) if isinstance(x, Tensor) else x for x in leaves]
        wdtype = torch.float64 if any(p.dtype == torch.float64 for p in self._opt_params()) else torch.float32
        self._w = torch.ones((), device=self._device, dtype=wdtype)
        self._w_is_one = True

    @property
    def captured(self) -> bool:
        """Whether a graph is captured and used for micro-batches of the example's shapes."""
        return self._replay is not None

    @property
    def fallback_reason(self) -> str | None:
        """Why micro-steps run eagerly (None while capture is possible)."""
        return self._reason

    def __call__(self, batch: Any, weight: "float | Tensor | None" = None) -> Tensor:
        """Run one micro-batch (forward, backward, accumulate, and the update when the window is full).

        Args:
            batch: a micro-batch with the structure of the example batch.
            weight: how much it counts (a number or a 0-dim device tensor, as in ``opt.backward``); default 1.

        Returns:
            The micro-batch's loss, detached (a copy: later calls do not change it).
        """
        opt = self.optimizer
        version = self._model_version()
        if opt.pending == 0 and self._checked != version:  # a parameter of the model was (re)registered
            _check_params_in_optimizer(self.model, opt)
            self._checked = version
        if self._reason is not None:
            return self._eager(batch, weight)
        leaves, spec = self._batch_leaves(batch)  # the graph path: a batch on another device raises, replayed or not
        if opt.pending == 0:
            self._window_start()  # a failed capture leaves no replay: eager below
        if self._replay is None or self._fast_key() != self._fast or not self._matches(leaves, spec):
            return self._eager(batch, weight)
        w = check_micro_weight(weight) if weight is not None else None
        self._attach()
        for i in self._tensor_slots:
            self._static_leaves[i].copy_(leaves[i], non_blocking=True)
        if isinstance(w, Tensor):
            self._w.copy_(w, non_blocking=True)
        elif w is not None or not self._w_is_one:
            self._w.fill_(1.0 if w is None else w)
        self._w_is_one = w is None
        self._replay()
        self.replays += 1
        for p, g in self._outputs:  # fresh gradients for buffered groups: the wrapper moves them
            p.grad = g
        loss = cast(Tensor, self._static_loss).clone()
        opt._record_backward_weight(w)  # what opt.backward(loss, weight=w) records
        opt.step(loss=loss)
        return loss

    def recapture(self) -> None:
        """Drop the graph (and its memory); the next window start captures again."""
        self._drop()
        if self._reason is not None and self._reason.startswith("capture failed"):
            self._reason = None

    def _opt_params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _inplace_ids(self) -> set[int]:  # parameters whose window sum lives in .grad (the rest: buffers)
        return self.optimizer._accumulated_in_grad()

    def _impossible(self) -> str | None:
        """Why this micro-step can never be captured (None: it can)."""
        devices = {p.device for p in self._opt_params()}
        if len(devices) != 1:
            return f"parameters on several devices {sorted(map(str, devices))}"
        device = next(iter(devices))
        if device.type != "cuda" or not torch.cuda.is_available():
            return f"parameters on {device} (CUDA graphs need CUDA parameters)"
        if GradSync.kind_of(self.model) != "none":
            return "a DDP/FSDP model (gradient synchronisation differs between micro-steps)"
        self._device = device
        return None

    def _eager(self, batch: Any, weight: "float | Tensor | None") -> Tensor:
        """The plain micro-step: ``opt.backward(loss_fn(model, batch), weight=...)``, then ``opt.step``."""
        with torch.enable_grad():
            loss = self.loss_fn(self.model, batch)
            _check_loss(loss)
            self.optimizer.backward(loss, weight=weight)
        loss = loss.detach()
        self.optimizer.step(loss=loss)
        self.eager_steps += 1
        return loss

    def _batch_leaves(self, batch: Any) -> tuple[list[Any], Any]:
        """The batch's leaves and structure; ``ValueError`` for a tensor leaf off the model's device."""
        leaves, spec = pytree.tree_flatten(batch)
        for i, x in enumerate(leaves):
            if isinstance(x, Tensor) and x.device != self._device:
                where = pytree.keystr(pytree.tree_flatten_with_path(batch)[0][i][0]) or "the batch"
                raise ValueError(f"Invalid batch: {where} is on {x.device} (expected {self._device}, the model's "
                                 "device; move the batch there first, e.g. with .to(device, non_blocking=True) "
                                 "from pinned memory)")
        return leaves, spec

    def _matches(self, leaves: list[Any], spec: Any) -> bool:
        """Whether the batch has the example's structure and shapes (else it runs eagerly)."""
        return spec == self._spec and all(
            isinstance(meta, tuple) and (x.shape, x.dtype) == meta if isinstance(x, Tensor)
            else not isinstance(meta, tuple) and x == meta for x, meta in zip(leaves, self._leaf_meta))

    def _model_version(self) -> int:
        """The newest registration stamp among the model's modules (one int compare unless one happened)."""
        if self._seen != _registrations:
            self._seen = _registrations
            self._version = max(self._version, max((_stamps.get(m, 0) for m in self._modules), default=0))
        return self._version

    def _autocast_key(self) -> tuple[Any, ...]:
        if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
            return (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        return (torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype())  # torch 2.3

    def _fast_key(self) -> tuple[Any, ...]:
        """Checked on every call: cheap signs of a changed model (top-level mode, registrations, autocast)."""
        return (self.model.training, self._model_version(), self._autocast_key())

    def _signature(self) -> tuple[Any, ...]:
        """Checked at each window start: everything the captured graph depends on."""
        scaler = self.optimizer.scaler
        return (
            tuple(m.training for m in self._modules),  # refreshed by _window_start, which calls this
            tuple((id(p), p.data_ptr(), p.requires_grad, p.shape, p.dtype) for p in self.model.parameters()),
            tuple(id(p) for p in self._opt_params()),
            tuple(sorted(self._inplace_ids())),
            self._autocast_key(),
            id(scale_tensor(scaler)) if scaler is not None else None,
            self._model_version(),  # a replaced buffer or submodule
        )

    def _window_start(self) -> None:
        modules = list(self.model.modules())
        if len(modules) != len(self._modules) or any(a is not b for a, b in zip(modules, self._modules)):
            self._modules = modules  # a submodule was added or replaced
            self._seen = -1  # look at the new modules' stamps too
        if self._replay is None or self._signature() != self._sig:
            self._capture()
            if self._replay is None:
                return
        self._fast = self._fast_key()
        self._attach()

    def _attach(self) -> None:
        """Make every accumulating ``.grad`` the graph's static tensor (zero at a window start)."""
        if all(p.grad is s for p, s in self._accumulating):
            return
        zero = []
        for p, s in self._accumulating:
            if p.grad is None:
                zero.append(s)
            elif p.grad is not s:  # replaced mid-window (eager micro-step, loaded checkpoint, user): carry it over
                s.copy_(p.grad)
            p.grad = s
        if zero:
            torch._foreach_zero_(zero)

    def _drop(self) -> None:
        for p, s in self._accumulating:
            if p.grad is s and self.optimizer.pending == 0:
                p.grad = None
        self._graph = self._replay = self._static_loss = self._sig = self._fast = None
        self._accumulating, self._outputs = [], []

    def _capture(self) -> None:
        """Warm up on a side stream, then capture forward + loss + backward (at a window start)."""
        opt, model, backend = self.optimizer, self.model, self._backend
        self._drop()
        params = self._opt_params()
        saved_grads = [p.grad for p in params]
        saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
        rng = [(backend.set_rng_state, backend.get_rng_state()), (torch.set_rng_state, torch.get_rng_state())]
        rng += [(g.set_state, g.get_state()) for g in self.generators]
        cache = torch.is_autocast_cache_enabled()
        inplace = self._inplace_ids()
        self._w.fill_(1.0)
        self._w_is_one = True

        def micro_step() -> Tensor:
            with torch.enable_grad():
                loss = self.loss_fn(model, self._static_batch)
                _check_loss(loss)
                opt.backward(loss * (self._w if self._w.dtype == loss.dtype else self._w.to(loss.dtype)))
            return loss.detach()
        try:
            torch.clear_autocast_cache()
            torch.set_autocast_cache_enabled(False)  # cached casts would be stale in replays
            with backend.warmup():
                for _ in range(self.warmup_steps):
                    for p in params:
                        p.grad = None
                    micro_step()
            used = [p for p in params if p.grad is not None]
            for p in params:
                p.grad = None
            for b, v in saved_buffers:  # warm-up must not move BatchNorm statistics
                b.copy_(v)
            self._accumulating = [(p, torch.zeros_like(p, memory_format=torch.preserve_format))
                                  for p in used if id(p) in inplace]
            for p, s in self._accumulating:
                p.grad = s  # the backward pass adds into these: the in-place window sum
            for set_state, state in rng:
                set_state(state)
            self._static_loss, self._replay, self._graph = backend.capture(micro_step, params, self.generators)
            self._outputs = [(p, p.grad) for p in used if id(p) not in inplace and p.grad is not None]
            for p in params:  # excluded parameters' gradients are dropped, as opt.step() does
                if id(p) not in inplace:
                    p.grad = None
        except Exception as exc:  # capture impossible for this model: run eagerly, say why
            for p, g in zip(params, saved_grads):
                p.grad = g
            for b, v in saved_buffers:
                b.copy_(v)
            self._drop()
            self._reason = f"capture failed: {type(exc).__name__}: {exc}"
            if self._mode is True:
                raise RuntimeError(f"CapturedMicroStep: {self._reason}") from exc
            warnings.warn(f"CapturedMicroStep runs eagerly: {self._reason}", RuntimeWarning, stacklevel=3)
            return
        finally:
            torch.clear_autocast_cache()  # no cast made during capture may serve a later eager step
            torch.set_autocast_cache_enabled(cache)
            for set_state, state in rng:
                set_state(state)
        for p, g in zip(params, saved_grads):  # a gradient present before capture still counts
            if g is not None:
                p.grad = g
        self._sig = self._signature()  # after warm-up: it created the scaler's scale tensor
        self.captures += 1


def _check_params_in_optimizer(model: torch.nn.Module, optimizer: AccumulatingOptimizer) -> None:
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    outside = [n for n, p in unwrap_model(model).named_parameters() if p.requires_grad and id(p) not in in_optimizer]
    if outside:
        raise ValueError(f"Invalid model: parameters {outside[:4]!r} require grad but are not in the optimizer "
                         "(expected every trainable parameter of the model in the optimizer: add them with "
                         "opt.add_param_group, or freeze them with requires_grad_(False))")


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise TypeError(f"Invalid loss_fn result: {shape} (expected a one-element loss tensor)")
    if not loss.requires_grad:
        raise ValueError("Invalid loss_fn result: the loss does not require grad (nothing to backpropagate)")


def capture_micro_step(optimizer: AccumulatingOptimizer, model: torch.nn.Module, loss_fn: LossFn,
                       example_batch: Any, **kwargs: Any) -> CapturedMicroStep:
    """Build a :class:`CapturedMicroStep` (same arguments)."""
    return CapturedMicroStep(optimizer, model, loss_fn, example_batch, **kwargs)
