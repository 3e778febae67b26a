"""Per-parameter accumulation weights: layer patterns, param-group weights, exclusions (docs/weights.md).

A parameter's weight multiplies its averaged gradient before clipping and the optimizer step: the product of its
``layer_weights`` entry, its ``group_weights`` entry and its group's ``accumulation_weight`` (each 1 by default);
0 or ``exclude`` keeps it out of the wrapped optimizer entirely. Weights are fixed when the wrapper is built (or
the group added).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from ._checks import check_real, weight_dtype

__all__ = ["ParamNames", "WeightResolver", "check_micro_weight", "parameter_names", "pattern_specificity",
           "resolve_weights"]

# Name components that wrappers insert into parameter names (torch.compile, FSDP1, activation checkpointing;
# DDP's "module." is removed by unwrapping): users write names of their own module.
_WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def clean_name(name: str) -> str:
    """``name`` without the components that module wrappers insert (whole components only)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_COMPONENTS)


class ParamNames(Mapping[int, str]):
    """``{id(param): name}`` that survives ``copy.deepcopy`` and pickle.

    It holds the parameters themselves and rebuilds the ids from them, so a copy maps onto the copied parameters.
    """

    def __init__(self, pairs: Iterable[tuple[Tensor, str]]) -> None:
        self._pairs = list(pairs)
        self._index = {id(p): n for p, n in self._pairs}
        self._objects = {id(p): p for p, _ in self._pairs}

    def __getitem__(self, key: int) -> str:
        return self._index[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def param(self, key: int) -> Tensor:
        """The parameter whose id is ``key``."""
        return self._objects[key]

    def __getstate__(self) -> dict[str, Any]:
        return {"pairs": self._pairs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        ParamNames.__init__(self, state["pairs"])


def parameter_names(model: torch.nn.Module) -> ParamNames:
    """``{id(param): name}`` for ``model``, without the names' wrapper components (DDP's ``module.``,
    ``torch.compile``'s ``_orig_mod.``, FSDP1 and checkpoint wrappers)."""
    inner = model
    while isinstance(getattr(inner, "module", None), torch.nn.Module) and \
            (hasattr(inner, "require_backward_grad_sync") or isinstance(inner, torch.nn.DataParallel)):
        inner = getattr(inner, "module")
    return ParamNames((p, clean_name(n)) for n, p in inner.named_parameters())


def pattern_specificity(pattern: str) -> int:
    """Number of literal characters of a glob pattern (``*``, ``?`` and ``[...]`` count 0).

    As in :func:`fnmatch.translate`, a ``[`` without its closing ``]`` is literal.
    """
    count, i, n = 0, 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c in "*?":
            continue
        if c == "[":
            j = i + pattern.startswith("!", i)  # past a negation
            end = pattern.find("]", j + pattern.startswith("]", j))  # a "]" first in the class is literal
            if end >= 0:  # a complete class: one wildcard position
                i = end + 1
                continue
        count += 1
    return count


def _check_weight(name: str, value: Any) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.detach().cpu().item()  # construction time: a sync is fine here
    return check_real(name, value, nonnegative=True)


def check_group_weight(group: Mapping[str, Any], index: int) -> float:
    """The validated ``accumulation_weight`` of a param group (1.0 when absent)."""
    if "accumulation_weight" not in group:
        return 1.0
    return _check_weight(f"param_groups[{index}]['accumulation_weight']", group["accumulation_weight"])


def _group_overrides(n: int, group_weights: Any) -> list[float]:
    out = [1.0] * n
    if group_weights is None:
        return out
    if isinstance(group_weights, Mapping):
        for key, w in group_weights.items():
            named = isinstance(key, str) and key.startswith("group_") and key[6:].isdigit()
            index = int(key[6:]) if named else key
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
                raise ValueError(
                    f"Invalid group_weights key: {key!r} (expected a group index 0..{n - 1} or 'group_<i>')")
            out[index] = _check_weight(f"group_weights[{key!r}]", w)
        return out
    if isinstance(group_weights, Sequence) and not isinstance(group_weights, (str, bytes)):
        if len(group_weights) != n:
            raise ValueError(
                f"Invalid group_weights: {list(group_weights)!r} (expected {n} weights, one per param group)")
        return [_check_weight(f"group_weights[{i}]", w) for i, w in enumerate(group_weights)]
    raise TypeError(f"Invalid group_weights: {group_weights!r} (expected a sequence with one weight per param group, "
                    "or a mapping by group index or 'group_<i>')")


class WeightResolver:
    """Callable ``(group_index, param) -> weight`` built by :func:`resolve_weights`."""

    def __init__(self, param_groups: list[dict[str, Any]], overrides: list[float],
                 layer: list[tuple[Tensor, float]]) -> None:
        self._param_groups = param_groups
        self._overrides = overrides
        self._layer_params = layer  # the parameters themselves: copies map onto copied parameters
        self._layer = {id(p): w for p, w in layer}

    def rebind(self, param_groups: list[dict[str, Any]]) -> None:
        """Follow the optimizer's current ``param_groups`` (torch replaces the list on load)."""
        self._param_groups = param_groups

    def group_weight(self, index: int) -> float:
        """Weight of param group ``index``: ``group_weights[index] * accumulation_weight``."""
        base = self._overrides[index] if index < len(self._overrides) else 1.0
        return base * check_group_weight(self._param_groups[index], index)

    def check_new_group(self, group: Mapping[str, Any]) -> None:
        """Validate a group about to be added (before anything is changed)."""
        check_group_weight(group, len(self._param_groups))

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_layer"}  # keyed by id: rebuilt from the copies

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._layer = {id(p): w for p, w in self._layer_params}

    def __call__(self, group_index: int, p: Tensor) -> float:
        w = self._layer.get(id(p), 1.0) * self.group_weight(group_index)
        if not math.isfinite(w):
            raise ValueError(f"Invalid accumulation weight: {w} for a parameter of group {group_index} "
                             "(the product of its layer and group weights overflows; expected a finite number)")
        return w


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatchcase(name, pattern)


def resolve_weights(param_groups: list[dict[str, Any]], names: ParamNames | None,
                    layer_weights: Mapping[str, float] | None = None, group_weights: Any = None,
                    exclude: Iterable[str | Tensor] | str | None = None) -> WeightResolver:
    """Validate the weight arguments and return the per-parameter weight function.

    ``names`` is ``{id(param): name}`` (see :func:`parameter_names`), or None without a model; ``exclude`` holds
    names, glob patterns or parameters. Raises ``TypeError``/``ValueError`` naming the offending entry, with
    nothing changed.
    """
    overrides = _group_overrides(len(param_groups), group_weights)
    for i, g in enumerate(param_groups):
        check_group_weight(g, i)

    patterns: dict[str, float] = {}
    if layer_weights is not None:
        if not isinstance(layer_weights, Mapping):
            raise TypeError(
                f"Invalid layer_weights: {layer_weights!r} (expected a mapping of parameter name or pattern to weight)")
        for k, v in layer_weights.items():
            if not isinstance(k, str):
                raise TypeError(f"Invalid layer_weights key: {k!r} (expected a parameter name or glob pattern)")
            patterns[k] = _check_weight(f"layer_weights[{k!r}]", v)

    excluded: list[Any] = [] if exclude is None else [exclude] if isinstance(exclude, (str, Tensor)) else list(exclude)
    excluded_names = [e for e in excluded if isinstance(e, str)]
    for e in excluded:
        if not isinstance(e, (str, Tensor)):
            raise TypeError(f"Invalid exclude entry: {e!r} (expected a parameter name, a glob pattern or a parameter)")

    in_optimizer = {id(p): p for g in param_groups for p in g["params"]}
    layer: dict[int, float] = {}
    named = list(patterns) + excluded_names
    if named and names is None:
        raise ValueError(f"Invalid layer_weights/exclude: parameter names are needed to resolve {named!r}; "
                         "pass model=... (the module whose named_parameters() they refer to)")
    if names is not None and named:
        by_name = {name: pid for pid, name in names.items()}
        unmatched = [p for p in named if not any(_matches(n, p) for n in by_name)]
        if unmatched:
            raise ValueError(f"Invalid layer_weights/exclude: {unmatched!r} match no parameter name "
                             f"(names look like {sorted(by_name)[:4]!r})")
        order = {p: i for i, p in enumerate(patterns)}
        for name, pid in by_name.items():
            hits = [p for p in patterns if _matches(name, p)]
            if hits:  # an exact name wins, then the most literal characters, then the first listed
                layer[pid] = patterns[max(hits, key=lambda p: (p == name, pattern_specificity(p), -order[p]))]
            if any(_matches(name, p) for p in excluded_names):
                layer[pid] = 0.0
    for e in excluded:
        if isinstance(e, Tensor):
            if id(e) not in in_optimizer:
                raise ValueError(f"Invalid exclude entry: a tensor of shape {tuple(e.shape)} "
                                 "that is not a parameter of the optimizer")
            layer[id(e)] = 0.0

    resolver = WeightResolver(param_groups, overrides, [
        (in_optimizer[pid] if pid in in_optimizer else names.param(pid), w)  # type: ignore[union-attr]
        for pid, w in layer.items()])
    weights = [resolver(i, p) for i, g in enumerate(param_groups) for p in g["params"]]
    if weights and all(w == 0.0 for w in weights):
        raise ValueError("Invalid weights: every parameter of the optimizer has accumulation weight 0 or is excluded "
                         "(expected at least one parameter to train)")
    return resolver


def check_micro_weight(weight: Any) -> "float | Tensor":
    """Validate one micro-batch weight (``step(weight=)`` / ``backward(weight=)``) without a host sync.

    A number must be finite and >= 0 (returned as a float). A one-element tensor is returned as a 0-dim float64
    tensor on its device (float32 on MPS), so that token counts and long sums stay exact; CPU tensors are checked
    like numbers, accelerator tensors cannot be checked without a sync and are trusted.
    """
    if isinstance(weight, Tensor):
        if weight.numel() != 1:
            raise ValueError(f"Invalid weight: a tensor of shape {tuple(weight.shape)} (expected one element)")
        if weight.is_complex():
            raise TypeError(f"Invalid weight: a tensor of dtype {weight.dtype} (expected a real number)")
        w = weight.detach().reshape(())
        if w.device.type == "cpu":
            check_real("weight", w.item(), nonnegative=True)
        dtype = weight_dtype(w.device)
        return w if w.dtype == dtype else w.to(dtype)
    return check_real("weight", weight, nonnegative=True)
