"""Check that accumulation equals large-batch training, on your own model (docs/core.md).

The hypothesis strategies (:func:`micro_batch_splits`, :func:`optimizer_configs`) need the ``hypothesis`` package.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ._checks import check_int
from .optimizer import AccumulatingOptimizer
from .splitting import batch_size_of, slice_batch, zip_batch

__all__ = ["EquivalenceReport", "OptimizerConfig", "batch_dependent_layers", "check_equivalence", "micro_batch_splits",
           "optimizer_configs", "relative_deviation", "split_batch"]

Batch = Any  # a tensor, or a tuple/list/dict of tensors sharing their first dimension


def split_batch(batch: Batch, sizes: Sequence[int]) -> list[Batch]:
    """Split ``batch`` along its first dimension into micro-batches of ``sizes``.

    Raises:
        ValueError: if a size is < 1 or the sizes do not add up to the batch size.
    """
    n = batch_size_of(batch)
    sizes = [int(s) for s in sizes]
    if any(s < 1 for s in sizes) or sum(sizes) != n:
        raise ValueError(f"Invalid micro_batches: {sizes} (expected sizes >= 1 adding up to the batch size {n})")
    ends = list(itertools.accumulate(sizes))
    return [slice_batch(batch, a, b) for a, b in zip([0, *ends], ends)]


def _sizes(micro_batches: int | Sequence[int], n: int) -> list[int]:
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, (int, Sequence)):
        raise TypeError(f"Invalid micro_batches: {micro_batches!r} (expected an int or a list of sizes)")
    if isinstance(micro_batches, int):
        if micro_batches < 1 or n % micro_batches:
            raise ValueError(f"Invalid micro_batches: {micro_batches} (expected a divisor of the batch size {n}, "
                             "or a list of sizes for uneven micro-batches)")
        return [n // micro_batches] * micro_batches
    return list(micro_batches)


def relative_deviation(actual: Tensor, expected: Tensor) -> float:
    """``max|actual - expected| / max|expected|`` (the absolute deviation where ``expected`` is all zero)."""
    if actual.shape != expected.shape:
        return math.inf
    if actual.numel() == 0:
        return 0.0
    a = actual.detach().to(torch.float64 if not expected.is_complex() else torch.complex128)
    e = expected.detach().to(a.dtype)
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        same = (torch.isnan(a) == torch.isnan(e)).all() and (a[~torch.isnan(a)] == e[~torch.isnan(e)]).all()
        return 0.0 if bool(same) else math.inf
    diff = (a - e).abs().max().item()
    scale = e.abs().max().item()
    return diff / scale if scale > 0 else diff


@dataclass
class EquivalenceReport:
    """Largest relative deviation of each parameter and optimizer-state entry, over all updates.

    Attributes:
        parameters: ``{parameter name: deviation}``.
        state: ``{"<parameter name>.<state key>": deviation}`` (non-tensor entries: ``0`` if equal, else ``inf``).
        updates: real updates compared.
        rtol: the tolerance checked against.
        problems: anything structural (an update applied too early or not at all).
    """

    parameters: dict[str, float] = field(default_factory=dict)
    state: dict[str, float] = field(default_factory=dict)
    updates: int = 0
    rtol: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def max_deviation(self) -> float:
        """The largest deviation of all parameters and state entries."""
        return max([0.0, *self.parameters.values(), *self.state.values()])

    @property
    def passed(self) -> bool:
        """Whether every deviation is within ``rtol`` and nothing structural went wrong."""
        return not self.problems and self.max_deviation <= self.rtol

    def _note(self, table: dict[str, float], key: str, value: float) -> None:
        old = table.get(key, 0.0)
        table[key] = value if (math.isnan(value) or value > old) else old

    def __str__(self) -> str:
        lines = [f"Equivalence {'PASSED' if self.passed else 'FAILED'}: max relative deviation "
                 f"{self.max_deviation:.3e} (rtol {self.rtol:.1e}) over {self.updates} update(s)"]
        lines += [f"  problem: {p}" for p in self.problems]
        rows = [("param", k, v) for k, v in self.parameters.items()] + [("state", k, v) for k, v in self.state.items()]
        width = max((len(k) for _, k, _ in rows), default=0)
        for kind, key, value in sorted(rows, key=lambda r: -r[2] if not math.isnan(r[2]) else -math.inf):
            flag = "  <-- over" if not value <= self.rtol else ""
            lines.append(f"  {kind:5} {key:<{width}}  {value:.3e}{flag}")
        return "\n".join(lines)


def _state(opt: torch.optim.Optimizer, params: list[Tensor], names: list[str]) -> dict[str, Any]:
    return {f"{name}.{key}": value for p, name in zip(params, names)
            for key, value in sorted(opt.state.get(p, {}).items(), key=lambda kv: str(kv[0]))}


def _compare(report: EquivalenceReport, ref_opt: torch.optim.Optimizer, acc_opt: torch.optim.Optimizer,
             names: list[str], check_state: bool) -> None:
    ref_params, acc_params = ([p for g in o.param_groups for p in g["params"]] for o in (ref_opt, acc_opt))
    for name, a, e in zip(names, acc_params, ref_params):
        report._note(report.parameters, name, relative_deviation(a, e))
    if not check_state:
        return
    ref_state, acc_state = _state(ref_opt, ref_params, names), _state(acc_opt, acc_params, names)
    for key in sorted(set(ref_state) | set(acc_state)):
        if key not in ref_state or key not in acc_state:
            report._note(report.state, key, math.inf)
            if (problem := f"optimizer state {key!r} exists in only one run") not in report.problems:
                report.problems.append(problem)
            continue
        e, a = ref_state[key], acc_state[key]
        if isinstance(e, Tensor) and isinstance(a, Tensor):
            value = relative_deviation(a.to_dense(), e.to_dense())  # to_dense: a dense tensor as it is
        else:
            value = 0.0 if a == e else math.inf
        report._note(report.state, key, value)


def batch_dependent_layers(model: torch.nn.Module) -> list[str]:
    """Names of the layers whose output depends on the other samples of the batch, in the mode they are in.

    These are the BatchNorm layers (lazy and ``SyncBatchNorm`` too) that use the batch's statistics (training mode,
    or eval mode without running statistics), so K micro-batches are normalised differently from one large batch.
    Pass ``model`` in the mode it trains in; names come in ``named_modules`` order (``"<root>"``: the model itself).
    """
    return [name or "<root>" for name, m in model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)]


def check_equivalence(model_fn: Callable[[], torch.nn.Module], loss_fn: Callable[[torch.nn.Module, Batch], Tensor],
                      optimizer_fn: Callable[[torch.nn.Module], torch.optim.Optimizer], batches: Sequence[Batch],
                      micro_batches: int | Sequence[int] = 4, *, dtype: torch.dtype | None = torch.float64,
                      rtol: float = 1e-10, mode: str = "inplace", wrapper_kwargs: Mapping[str, Any] | None = None,
                      check_state: bool = True, seed: int = 0) -> EquivalenceReport:
    """Train the large-batch reference and the accumulated run side by side and compare them.

    Args:
        model_fn: builds the model, once, under ``torch.manual_seed(seed)``; both runs start from copies of it.
        loss_fn: ``loss_fn(model, batch)``: the *mean* loss of ``batch``.
        optimizer_fn: ``optimizer_fn(model)``: the plain torch optimizer.
        batches: one large batch per update (a tensor, or a tuple/list/dict of tensors sharing their first dimension).
        micro_batches: K equal micro-batches (an int dividing the batch size) or the sizes (uneven: weighted by size).
        dtype: dtype the models and floating batch tensors are cast to (``None``: leave them as they are).
        rtol: largest relative deviation ``max|acc - ref| / max|ref|`` allowed per tensor.
        mode: the wrapper's ``mode`` (``"inplace"`` or ``"buffered"``).
        wrapper_kwargs: more keyword arguments for the wrapper.
        check_state: also compare the optimizer state (moments, step counts, ...).
        seed: the seed the model is built under.

    Returns:
        The :class:`EquivalenceReport` (deviations over all updates).

    Raises:
        AssertionError: with the report, when a deviation is over ``rtol``, an update came at the wrong micro-batch,
            or BatchNorm layers use batch statistics (no accumulation can equal the large batch; named).
    """
    if not batches:
        raise ValueError("Invalid batches: empty (expected at least one large batch)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_fn()
    if dtype is not None:
        model = model.to(dtype)
    ref_model, acc_model = copy.deepcopy(model), copy.deepcopy(model)
    ref_opt = optimizer_fn(ref_model)
    by_id = {id(p): n for n, p in ref_model.named_parameters()}
    names = [by_id.get(id(p), f"param_groups[{gi}][{pi}]")
             for gi, g in enumerate(ref_opt.param_groups) for pi, p in enumerate(g["params"])]
    sizes0 = _sizes(micro_batches, batch_size_of(batches[0]))
    opt = AccumulatingOptimizer(optimizer_fn(acc_model), len(sizes0), mode=mode, **(wrapper_kwargs or {}))

    def cast(leaf: list[Any]) -> Any:
        t = leaf[0]
        return t.to(dtype) if dtype is not None and isinstance(t, Tensor) and t.is_floating_point() else t

    report = EquivalenceReport(rtol=rtol)
    layers = batch_dependent_layers(acc_model) if len(sizes0) > 1 else []
    if layers:
        shown = ", ".join(repr(n) for n in layers[:5]) + (f" and {len(layers) - 5} more" if len(layers) > 5 else "")
        report.problems.append(
            f"BatchNorm using batch statistics ({shown}): it normalises each micro-batch by its own mean and variance, "
            "so no accumulation can equal the large batch. Use GroupNorm or LayerNorm, or BatchNorm in eval mode "
            "with running statistics (e.g. from a pre-trained model)")
    for update, batch in enumerate(batches):
        batch = zip_batch(cast, [batch])
        sizes = _sizes(micro_batches, batch_size_of(batch))
        if len(sizes) != len(sizes0):
            raise ValueError(f"Invalid micro_batches: batch {update} splits into {len(sizes)} micro-batches, "
                             f"the first into {len(sizes0)} (expected the same K for every batch)")
        # reference: one step on the whole batch
        ref_opt.zero_grad()
        torch.autograd.backward(loss_fn(ref_model, batch))
        ref_opt.step()
        # accumulated: one step() per micro-batch
        params = [p for g in opt.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params]
        for i, micro in enumerate(split_batch(batch, sizes)):
            opt.zero_grad()
            loss = loss_fn(acc_model, micro)
            if len(set(sizes)) == 1:  # even micro-batches: the plain backward
                torch.autograd.backward(loss)
            else:
                opt.backward(loss, weight=float(sizes[i]))
            opt.step()
            last = i == len(sizes) - 1
            if opt.stepped != last:
                report.problems.append(f"update {update}, micro-batch {i}: stepped={opt.stepped} (expected {last})")
            if not last and any(not torch.equal(p.detach(), b) for p, b in zip(params, before)):
                report.problems.append(f"update {update}: parameters changed before the window closed "
                                       f"(micro-batch {i})")
        report.updates += 1
        _compare(report, ref_opt, opt, names, check_state)
    if opt.num_updates != len(batches):
        report.problems.append(f"num_updates={opt.num_updates} (expected {len(batches)})")
    if not report.passed:
        raise AssertionError(str(report))
    return report


@dataclass(frozen=True)
class OptimizerConfig:
    """A torch optimizer class and its keyword arguments; ``build(params)`` makes one."""

    cls: type[torch.optim.Optimizer]
    kwargs: Mapping[str, Any]

    def build(self, params: Any) -> torch.optim.Optimizer:
        """The optimizer over ``params`` (an iterable of tensors or param groups)."""
        return self.cls(params, **dict(self.kwargs))

    def __repr__(self) -> str:
        return f"{self.cls.__name__}({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"


def _hypothesis() -> Any:
    try:
        from hypothesis import strategies as st
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("accumopt.testing strategies need hypothesis: pip install 'accumopt[test]'") from e
    return st


def micro_batch_splits(*, max_parts: int = 8, max_size: int = 4, equal: bool | None = None) -> Any:
    """A hypothesis strategy for micro-batch sizes: a list of 1..``max_parts`` ints in 1..``max_size``.

    Args:
        max_parts: largest K.
        max_size: largest micro-batch.
        equal: True: all sizes equal; False: at least two differ (needs both maxima >= 2); None: either.
    """
    check_int("max_parts", max_parts)
    check_int("max_size", max_size)
    if equal is False and (max_parts < 2 or max_size < 2):
        raise ValueError(f"Invalid micro_batch_splits: max_parts={max_parts}, max_size={max_size} "
                         "(uneven splits need both >= 2)")
    st = _hypothesis()
    if equal:
        return st.builds(lambda k, s: [s] * k, st.integers(1, max_parts), st.integers(1, max_size))
    if equal is False:
        return st.lists(st.integers(1, max_size), min_size=2, max_size=max_parts).filter(lambda s: len(set(s)) > 1)
    return st.lists(st.integers(1, max_size), min_size=1, max_size=max_parts)


OPTIMIZER_NAMES = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam", "Adadelta")


def optimizer_configs(names: Sequence[str] = OPTIMIZER_NAMES) -> Any:
    """A hypothesis strategy for :class:`OptimizerConfig` s of the named torch optimizers (``OPTIMIZER_NAMES``).

    Each is drawn over its main options: lr, weight decay, momentum/nesterov/dampening, amsgrad, betas, maximize, ...
    """
    st = _hypothesis()
    lr = st.sampled_from([1e-3, 1e-2, 0.1])
    wd = st.sampled_from([0.0, 0.0, 1e-2])
    maximize = st.booleans()

    def sgd(momentum: float, nesterov: bool, dampening: float, **kw: Any) -> OptimizerConfig:
        return OptimizerConfig(torch.optim.SGD, dict(momentum=0.9 if nesterov and momentum == 0.0 else momentum,
                                                     nesterov=nesterov, dampening=0.0 if nesterov else dampening, **kw))

    def config(cls: type[torch.optim.Optimizer], **strategies: Any) -> Any:
        return st.builds(lambda **kw: OptimizerConfig(cls, kw), **strategies)
    table = {
        "SGD": st.builds(sgd, momentum=st.sampled_from([0.0, 0.5, 0.9]), nesterov=st.booleans(),
                         dampening=st.sampled_from([0.0, 0.1]), lr=lr, weight_decay=wd, maximize=maximize),
        "Adam": config(torch.optim.Adam, lr=lr, weight_decay=wd, amsgrad=st.booleans(),
                       betas=st.sampled_from([(0.9, 0.999), (0.8, 0.99)]), maximize=maximize),
        "AdamW": config(torch.optim.AdamW, lr=lr, weight_decay=st.sampled_from([0.0, 1e-2, 0.1]),
                        amsgrad=st.booleans(), maximize=maximize),
        "RMSprop": config(torch.optim.RMSprop, lr=lr, weight_decay=wd, momentum=st.sampled_from([0.0, 0.9]),
                          centered=st.booleans(), alpha=st.sampled_from([0.99, 0.9])),
        "Adagrad": config(torch.optim.Adagrad, lr=lr, weight_decay=wd, lr_decay=st.sampled_from([0.0, 1e-3]),
                          initial_accumulator_value=st.sampled_from([0.0, 0.1])),
        "Adamax": config(torch.optim.Adamax, lr=lr, weight_decay=wd),
        "NAdam": config(torch.optim.NAdam, lr=lr, weight_decay=wd, decoupled_weight_decay=st.booleans()),
        "RAdam": config(torch.optim.RAdam, lr=lr, weight_decay=wd, decoupled_weight_decay=st.booleans()),
        "Adadelta": config(torch.optim.Adadelta, lr=st.sampled_from([0.1, 1.0]), rho=st.sampled_from([0.9, 0.95]),
                           weight_decay=wd),
    }
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise ValueError(f"Invalid names: {unknown or list(names)!r} (expected some of {list(table)})")
    return st.one_of(*(table[n] for n in names))
