"""Per-parameter accumulation weights: layer patterns, param-group weights, exclusions.

Resolution rule for ``layer_weights`` (glob patterns over parameter names, as
:func:`fnmatch.fnmatchcase`): an exact name wins; otherwise the matching pattern
with the most literal (non-wildcard) characters wins; on a tie, the one listed
first. Every name or pattern must match at least one parameter. The parameter's
weight is its layer weight times its group weight (group key
``"accumulation_weight"``, or ``group_weights`` by index). Weight 0 excludes.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Iterable

from torch import Tensor

from ._checks import check_real

__all__ = ["resolve_weights"]

_WILDCARDS = set("*?[]")


def _literal_chars(pattern: str) -> int:
    return sum(c not in _WILDCARDS for c in pattern)


def _check_weight(name: str, w: Any) -> float:
    w = check_real(name, w)
    if w < 0 or not math.isfinite(w):
        raise ValueError(f"Invalid {name}: {w} (expected a finite weight >= 0)")
    return w


def _group_weights(param_groups: list[dict], group_weights: Any) -> list[float]:
    n = len(param_groups)
    out = [1.0] * n
    if group_weights is not None:
        if isinstance(group_weights, Mapping):
            for key, w in group_weights.items():
                index = key
                if isinstance(key, str) and key.startswith("group_") and key[6:].isdigit():
                    index = int(key[6:])
                if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
                    raise ValueError(
                        f"Invalid group_weights key: {key!r} (expected a group index 0..{n - 1} or 'group_<i>')"
                    )
                out[index] = _check_weight(f"group_weights[{key!r}]", w)
        elif isinstance(group_weights, Sequence) and not isinstance(group_weights, str):
            if len(group_weights) != n:
                raise ValueError(
                    f"Invalid group_weights: {list(group_weights)!r} (expected {n} weights, one per param group)"
                )
            out = [_check_weight(f"group_weights[{i}]", w) for i, w in enumerate(group_weights)]
        else:
            raise TypeError(f"Invalid group_weights: {group_weights!r} (expected a mapping or a sequence)")
    for i, g in enumerate(param_groups):
        if "accumulation_weight" in g:
            out[i] *= _check_weight(f"param_groups[{i}]['accumulation_weight']", g["accumulation_weight"])
    return out


def resolve_weights(
    param_groups: list[dict],
    names: Mapping[int, str] | None,
    layer_weights: Mapping[str, float] | None = None,
    group_weights: Any = None,
    exclude: Iterable[str] | None = None,
) -> Callable[[int, Tensor], float]:
    """Return ``weight_of(group_index, param)``, validating every argument first."""
    gweights = _group_weights(param_groups, group_weights)
    layer: dict[int, float] = {}
    patterns: dict[str, float] = {}
    if layer_weights:
        if not isinstance(layer_weights, Mapping):
            raise TypeError(f"Invalid layer_weights: {layer_weights!r} (expected a mapping of name or pattern to weight)")
        patterns.update({str(k): _check_weight(f"layer_weights[{k!r}]", v) for k, v in layer_weights.items()})
    excluded = list(exclude or ())
    if (patterns or excluded) and names is None:
        raise ValueError("layer_weights and exclude need parameter names: pass model=... (or named_parameters=...)")
    if patterns or excluded:
        by_name = {name: pid for pid, name in names.items()}
        order = {p: i for i, p in enumerate(patterns)}
        unmatched = [p for p in list(patterns) + excluded if p not in by_name and not fnmatch.filter(by_name, p)]
        if unmatched:
            raise ValueError(
                f"Invalid layer_weights/exclude: {unmatched!r} match no parameter name "
                f"(names look like {sorted(by_name)[:4]!r})"
            )
        for name, pid in by_name.items():
            if name in patterns:
                layer[pid] = patterns[name]
                continue
            hits = [p for p in patterns if fnmatch.fnmatchcase(name, p)]
            if hits:
                best = max(hits, key=lambda p: (_literal_chars(p), -order[p]))
                layer[pid] = patterns[best]
        for pattern in excluded:
            for name in fnmatch.filter(by_name, pattern) if pattern not in by_name else [pattern]:
                layer[by_name[name]] = 0.0

    def weight_of(group_index: int, p: Tensor) -> float:
        w = layer.get(id(p), 1.0) * (gweights[group_index] if group_index < len(gweights) else 1.0)
        if not math.isfinite(w):
            raise ValueError(f"Invalid accumulation weight {w} for a parameter of group {group_index}")
        return w

    return weight_of
