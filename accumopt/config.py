"""``GradientAccumulationConfig`` and the two enums of the documented (seed) API.

The configuration is data only: it is validated once, in ``__post_init__``, and
translated into :class:`~accumopt.AccumulatingOptimizer` arguments by
:func:`GradientAccumulationConfig.optimizer_kwargs`. Every field has one meaning,
listed in ``docs/seed_api.md``; contradictory combinations raise ``ValueError``
and settings that have no effect in the chosen mode/strategy warn.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._checks import check_choice, check_int, check_real

__all__ = ["AccumulationMode", "AccumulationStrategy", "GradientAccumulationConfig"]


class AccumulationMode(enum.Enum):
    """How K (micro-batches per real update) is chosen, and where the window's sum lives.

    * ``STANDARD``: fixed K; a buffer per parameter (a failed micro-batch never
      touches the window; ``nan_policy="drop"`` possible).
    * ``EFFICIENT``: fixed K; in-place accumulation in ``.grad``, no extra memory.
    * ``ADAPTIVE``: K adapts to the measured gradient noise scale, between
      ``min_accumulation_steps`` and ``max_accumulation_steps``.
    * ``PROGRESSIVE``: K follows ``accumulation_schedule`` (one K per epoch).
    * ``SELECTIVE``: fixed K; ``layer_accumulation_weights`` and
      ``exclude_parameters`` weight or freeze parameters.
    """

    STANDARD = "standard"
    EFFICIENT = "efficient"
    ADAPTIVE = "adaptive"
    PROGRESSIVE = "progressive"
    SELECTIVE = "selective"


class AccumulationStrategy(enum.Enum):
    """What happens per parameter (or per batch) inside a window.

    * ``UNIFORM``: every parameter gets the window's mean gradient (large-batch exact).
    * ``LAYER_WISE``: each parameter's gradient times its ``layer_accumulation_weights`` entry.
    * ``PARAMETER_GROUPS``: each param group's gradient times its ``parameter_group_weights`` entry.
    * ``ADAPTIVE_LAYERS``: unit-wise adaptive gradient clipping (AGC, Brock et al. 2021)
      of the accumulated gradient, factor ``agc_clip_factor``.
    * ``MEMORY_AWARE``: each window's batches run through :class:`~accumopt.MicroBatcher`:
      micro-batches that fit in memory; an out-of-memory error splits finer and redoes
      only the failed micro-batch. Gradients are never rescaled. Needs buffers, so it
      overrides ``mode=EFFICIENT``'s in-place storage (with a warning).
    """

    UNIFORM = "uniform"
    LAYER_WISE = "layer_wise"
    PARAMETER_GROUPS = "parameter_groups"
    ADAPTIVE_LAYERS = "adaptive_layers"
    MEMORY_AWARE = "memory_aware"


_NAN_POLICIES = ("skip", "drop", "raise")
_PRECISIONS = ("float16", "bfloat16")
_LR_RULES = ("linear", "sqrt")
_FIXED_K = (AccumulationMode.STANDARD, AccumulationMode.EFFICIENT, AccumulationMode.SELECTIVE)


def _enum(name: str, value: Any, cls: type[enum.Enum]) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        for member in cls:
            if value.lower() in (member.value, member.name.lower()):
                return member
    expected = ", ".join(f"{cls.__name__}.{m.name}" for m in cls)
    raise (ValueError if isinstance(value, str) else TypeError)(
        f"Invalid {name}: {value!r} (expected one of {expected})"
    )


def _flag(name: str, value: Any, *, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: {value!r} (expected True or False, got {type(value).__name__})")
    return value


def _unused(what: str, why: str) -> None:
    warnings.warn(f"GradientAccumulationConfig: {what} has no effect here ({why}); it is ignored.",
                  UserWarning, stacklevel=5)


@dataclass
class GradientAccumulationConfig:
    """Configuration of :class:`GradientAccumulator` and :class:`GradientAccumulationTrainer`.

    Batch sizes: ``effective_batch_size`` is the number of samples per
    micro-batch (what the data loader yields), ``target_batch_size`` the number
    per real update; they must satisfy ``target = effective x accumulation_steps``.
    Give any two of the three and the third is derived; with none, K is 1.
    Under ``mode=ADAPTIVE`` the target is the *largest* batch per update:
    ``max_accumulation_steps = target / effective`` (see ``docs/seed_api.md``).

    See ``docs/seed_api.md`` for the table of every field.
    """

    accumulation_steps: int | None = None
    mode: AccumulationMode = AccumulationMode.STANDARD
    strategy: AccumulationStrategy = AccumulationStrategy.UNIFORM
    effective_batch_size: int | None = None
    target_batch_size: int | None = None
    gradient_scaling: bool = True
    loss_scaling: bool = True
    memory_threshold: float | None = None
    memory_monitoring: bool = False
    adaptive_scaling: bool | None = None
    progressive_scaling: bool = False
    accumulation_schedule: list[int] | None = None
    selective_accumulation: bool | None = None
    layer_accumulation_weights: dict[str, float] | None = None
    parameter_group_weights: Any = None
    exclude_parameters: list[str] | None = None
    gradient_clipping: bool = False
    clipping_norm: float | None = None
    agc_clip_factor: float | None = None
    nan_handling: bool = False
    nan_policy: str | None = None
    logging_frequency: int = 10
    min_accumulation_steps: int | None = None
    max_accumulation_steps: int | None = None
    lr_scaling_rule: str | None = None
    mixed_precision: str | None = None
    device: str | None = None
    progress_bar: bool | None = None
    checkpoint_every: int | None = None
    checkpoint_path: str | None = None

    # ------------------------------------------------------------------ checks
    def __post_init__(self) -> None:
        self.mode = _enum("mode", self.mode, AccumulationMode)
        self.strategy = _enum("strategy", self.strategy, AccumulationStrategy)
        for name in ("gradient_scaling", "loss_scaling", "memory_monitoring", "progressive_scaling",
                     "gradient_clipping", "nan_handling"):
            _flag(name, getattr(self, name))
        _flag("adaptive_scaling", self.adaptive_scaling, allow_none=True)
        _flag("selective_accumulation", self.selective_accumulation, allow_none=True)
        _flag("progress_bar", self.progress_bar, allow_none=True)
        check_int("logging_frequency", self.logging_frequency)
        self._check_batch_sizes()
        self._check_schedule()
        self._check_weights()
        self._check_memory()
        self._check_clipping_and_nan()
        self._check_adaptive()
        if self.mixed_precision is not None:
            check_choice("mixed_precision", self.mixed_precision, _PRECISIONS)
        self._check_lr_rule()
        self._check_device()
        self._check_checkpoint()

    def _check_lr_rule(self) -> None:
        rule = self.lr_scaling_rule
        if rule is not None:
            check_choice("lr_scaling_rule", rule, _LR_RULES)
            if not self.progressive_scaling:
                _unused(f"lr_scaling_rule={rule!r}", "it is the rule of progressive_scaling=True, which is off")
                self.lr_scaling_rule = None
        elif self.progressive_scaling:
            self.lr_scaling_rule = "sqrt"

    def _check_device(self) -> None:
        if self.device is None:
            return
        if not isinstance(self.device, str):
            raise TypeError(f"Invalid device: {self.device!r} (expected a device string such as 'cpu' or 'cuda')")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"Invalid device: {self.device!r} (expected a torch device string such as 'cpu', "
                             "'cuda' or 'cuda:1')") from None

    def _check_checkpoint(self) -> None:
        if self.checkpoint_every is not None:
            check_int("checkpoint_every", self.checkpoint_every)
            if self.checkpoint_path is None:
                raise ValueError("Invalid checkpoint_every: set without checkpoint_path (expected a file path to write)")
        if self.checkpoint_path is not None:
            if not isinstance(self.checkpoint_path, str):
                raise TypeError(f"Invalid checkpoint_path: {self.checkpoint_path!r} (expected a str path)")
            if self.checkpoint_every is None:
                _unused("checkpoint_path", "the trainer writes it every checkpoint_every real updates, and "
                        "checkpoint_every is not set")

    def _check_batch_sizes(self) -> None:
        k, e, t = self.accumulation_steps, self.effective_batch_size, self.target_batch_size
        if k is not None:
            check_int("accumulation_steps", k)
        if e is not None:
            check_int("effective_batch_size", e)
        if t is not None:
            check_int("target_batch_size", t)
        if self.mode is AccumulationMode.PROGRESSIVE and self.accumulation_schedule is not None:
            sched = self.accumulation_schedule
            first = sched[0] if isinstance(sched, Sequence) and not isinstance(sched, (str, bytes)) and sched else None
            if k is not None and first is not None and k != first:
                raise ValueError(
                    f"Invalid accumulation_steps: {k} with accumulation_schedule={list(sched)!r} "
                    f"(expected {first}, the schedule's first K, or leave accumulation_steps unset)"
                )
            if t is not None:
                raise ValueError(
                    f"Invalid target_batch_size: {t} with mode=PROGRESSIVE (K changes by epoch, so no single "
                    "target holds; expected it unset: the batch per update is effective_batch_size x K of the epoch)"
                )
            self.accumulation_steps = first if isinstance(first, int) and not isinstance(first, bool) else 1
            return
        if self.mode is AccumulationMode.ADAPTIVE and t is not None:
            self._adaptive_target(k, e, t)
            return
        if k is not None and e is not None and t is not None:
            if e * k != t:
                raise ValueError(
                    f"Invalid target_batch_size: {t} (expected effective_batch_size x accumulation_steps = "
                    f"{e} x {k} = {e * k})"
                )
        elif k is None and e is not None and t is not None:
            if t % e:
                raise ValueError(
                    f"Invalid target_batch_size: {t} (expected a multiple of effective_batch_size={e})"
                )
            k = t // e
        elif k is not None and t is not None and e is None:
            if t % k:
                raise ValueError(f"Invalid target_batch_size: {t} (expected a multiple of accumulation_steps={k})")
            e = t // k
        elif k is not None and e is not None and t is None:
            t = e * k
        self.accumulation_steps = 1 if k is None else k
        self.effective_batch_size, self.target_batch_size = e, t

    def _adaptive_target(self, k: int | None, e: int | None, t: int) -> None:
        """ADAPTIVE: ``target_batch_size`` is the largest batch per update, so it sets ``max_accumulation_steps``."""
        if e is None:
            raise ValueError(
                f"Invalid target_batch_size: {t} with mode=ADAPTIVE and no effective_batch_size (under ADAPTIVE the "
                "target is the largest batch per update, effective_batch_size x max K: give effective_batch_size)"
            )
        if t % e:
            raise ValueError(f"Invalid target_batch_size: {t} (expected a multiple of effective_batch_size={e})")
        k_max = t // e
        hi = self.max_accumulation_steps
        if hi is not None and check_int("max_accumulation_steps", hi) != k_max:
            raise ValueError(
                f"Invalid max_accumulation_steps: {hi} with target_batch_size={t} (under mode=ADAPTIVE the target is "
                f"the largest batch per update, so max K = target_batch_size / effective_batch_size = {t} / {e} = "
                f"{k_max}; expected {k_max}, or give only one of the two)"
            )
        if k is not None and k > k_max:
            raise ValueError(
                f"Invalid accumulation_steps: {k} with target_batch_size={t} (under mode=ADAPTIVE the target is the "
                f"largest batch per update; expected a starting K <= {t} / {e} = {k_max})"
            )
        self.max_accumulation_steps = k_max
        self.accumulation_steps = k_max if k is None else k
        self.effective_batch_size, self.target_batch_size = e, t

    def _check_schedule(self) -> None:
        s = self.accumulation_schedule
        if self.mode is AccumulationMode.PROGRESSIVE:
            if s is None:
                raise ValueError("Invalid accumulation_schedule: None with mode=PROGRESSIVE "
                                 "(expected a list of K by epoch, e.g. [2, 4, 8, 16])")
            if isinstance(s, (str, bytes)) or not isinstance(s, Sequence):
                raise TypeError(f"Invalid accumulation_schedule: {s!r} (expected a list of ints >= 1)")
            if len(s) == 0:
                raise ValueError("Invalid accumulation_schedule: [] (expected a non-empty list of ints >= 1)")
            for i, k in enumerate(s):
                check_int(f"accumulation_schedule[{i}]", k)
            self.accumulation_schedule = list(s)
            self.accumulation_steps = self.accumulation_schedule[0]
        elif s is not None:
            raise ValueError(
                f"Invalid accumulation_schedule: {s!r} with mode={self.mode.name} (a schedule needs "
                "mode=AccumulationMode.PROGRESSIVE)"
            )

    def _check_weights(self) -> None:
        lw, gw, ex = self.layer_accumulation_weights, self.parameter_group_weights, self.exclude_parameters
        selective_mode = self.mode is AccumulationMode.SELECTIVE
        explicit_selective = self.selective_accumulation is True
        if self.selective_accumulation is None:
            self.selective_accumulation = selective_mode
        elif selective_mode and not self.selective_accumulation:
            raise ValueError("Invalid selective_accumulation: False with mode=SELECTIVE "
                             "(the selective mode is selective accumulation; leave it unset or True)")
        if lw is not None:
            if not isinstance(lw, Mapping):
                raise TypeError(f"Invalid layer_accumulation_weights: {lw!r} (expected a dict of name or pattern to weight)")
            self.layer_accumulation_weights = {str(k): self._weight(f"layer_accumulation_weights[{k!r}]", v)
                                               for k, v in lw.items()}
        if gw is not None:
            if isinstance(gw, Mapping):
                self.parameter_group_weights = {k: self._weight(f"parameter_group_weights[{k!r}]", v) for k, v in gw.items()}
            elif isinstance(gw, Sequence) and not isinstance(gw, (str, bytes)):
                self.parameter_group_weights = [self._weight(f"parameter_group_weights[{i}]", v) for i, v in enumerate(gw)]
            else:
                raise TypeError(f"Invalid parameter_group_weights: {gw!r} (expected a dict like {{'group_0': 1.0}} or a list)")
        if ex is not None:
            if isinstance(ex, (str, bytes)) or not isinstance(ex, Sequence) or not all(isinstance(n, str) for n in ex):
                raise TypeError(f"Invalid exclude_parameters: {ex!r} (expected a list of names or glob patterns)")
            if not self.selective_accumulation:
                raise ValueError("Invalid exclude_parameters: set while selective_accumulation is False "
                                 "(freezing parameters is selective accumulation: set selective_accumulation=True "
                                 "or mode=SELECTIVE)")
            self.exclude_parameters = list(ex)
        if lw and not self.uses_layer_weights:
            _unused("layer_accumulation_weights",
                    f"mode={self.mode.name}, strategy={self.strategy.name}; only strategy LAYER_WISE or mode "
                    "SELECTIVE use layer weights")
        if gw is not None and self.strategy is not AccumulationStrategy.PARAMETER_GROUPS:
            _unused("parameter_group_weights", f"strategy={self.strategy.name}; only PARAMETER_GROUPS uses them")
        if explicit_selective and not selective_mode and not self.exclude_parameters and not self._zero_weights():
            _unused("selective_accumulation=True", f"mode={self.mode.name}: it only allows weight 0 and "
                    "exclude_parameters, and neither is set")
        if self.strategy is AccumulationStrategy.PARAMETER_GROUPS and gw is None:
            raise ValueError("Invalid parameter_group_weights: None with strategy=PARAMETER_GROUPS "
                             "(expected e.g. {'group_0': 1.0, 'group_1': 0.5})")
        if self.strategy is AccumulationStrategy.LAYER_WISE and not lw:
            raise ValueError("Invalid layer_accumulation_weights: empty with strategy=LAYER_WISE "
                             "(expected e.g. {'fc1.weight': 1.0, 'fc2.*': 0.5})")

    def _zero_weights(self) -> bool:
        """Whether an active layer or group weight is 0 (a frozen parameter)."""
        zeros = []
        if self.uses_layer_weights and self.layer_accumulation_weights:
            zeros += [w == 0.0 for w in self.layer_accumulation_weights.values()]
        gw = self.parameter_group_weights
        if self.strategy is AccumulationStrategy.PARAMETER_GROUPS and gw is not None:
            zeros += [w == 0.0 for w in (gw.values() if isinstance(gw, Mapping) else gw)]
        return any(zeros)

    def _weight(self, name: str, value: Any) -> float:
        w = check_real(name, value, nonnegative=True)
        if w == 0.0 and not self.selective_accumulation:
            raise ValueError(
                f"Invalid {name}: 0.0 freezes the parameter (expected a weight > 0, or selective_accumulation=True "
                "/ mode=SELECTIVE to freeze parameters on purpose)"
            )
        return w

    def _check_memory(self) -> None:
        memory_aware = self.strategy is AccumulationStrategy.MEMORY_AWARE
        if self.memory_threshold is not None:
            t = check_real("memory_threshold", self.memory_threshold)
            if not 0.0 < t <= 1.0:
                raise ValueError(f"Invalid memory_threshold: {t} (expected a fraction of device memory in (0, 1])")
            self.memory_threshold = t
            if not (memory_aware or self.memory_monitoring):
                _unused("memory_threshold", "it is read by memory_monitoring=True and strategy=MEMORY_AWARE")
                self.memory_threshold = None
        elif memory_aware or self.memory_monitoring:
            self.memory_threshold = 0.9
        if memory_aware and self.mode is AccumulationMode.EFFICIENT:
            warnings.warn(
                "GradientAccumulationConfig: mode=EFFICIENT with strategy=MEMORY_AWARE accumulates in buffers "
                "(mode='buffered'), not in .grad: out-of-memory recovery (MicroBatcher) must keep the window's sum "
                "apart from a micro-batch that fails half-way through its backward. This costs one gradient-sized "
                "buffer; use strategy=UNIFORM for in-place accumulation without recovery.",
                UserWarning, stacklevel=4)

    def _check_clipping_and_nan(self) -> None:
        if self.clipping_norm is not None:
            check_real("clipping_norm", self.clipping_norm, positive=True)
            if not self.gradient_clipping:
                raise ValueError(f"Invalid clipping_norm: {self.clipping_norm} with gradient_clipping=False "
                                 "(expected gradient_clipping=True, or no clipping_norm)")
        elif self.gradient_clipping:
            self.clipping_norm = 1.0
        if self.agc_clip_factor is not None:
            self.agc_clip_factor = check_real("agc_clip_factor", self.agc_clip_factor, positive=True)
            if self.strategy is not AccumulationStrategy.ADAPTIVE_LAYERS:
                _unused("agc_clip_factor", f"strategy={self.strategy.name}; only ADAPTIVE_LAYERS clips unit-wise")
                self.agc_clip_factor = None
        elif self.strategy is AccumulationStrategy.ADAPTIVE_LAYERS:
            self.agc_clip_factor = 0.01
        if self.nan_policy is not None:
            check_choice("nan_policy", self.nan_policy, _NAN_POLICIES)
            if not self.nan_handling:
                raise ValueError(f"Invalid nan_policy: {self.nan_policy!r} with nan_handling=False "
                                 "(expected nan_handling=True)")
        elif self.nan_handling:
            self.nan_policy = "skip"
        if self.nan_policy == "drop" and self.mode is AccumulationMode.EFFICIENT:
            raise ValueError("Invalid nan_policy: 'drop' with mode=EFFICIENT (dropping one micro-batch needs its "
                             "gradient apart from the window's sum; use mode=STANDARD)")

    def _check_adaptive(self) -> None:
        adaptive_mode = self.mode is AccumulationMode.ADAPTIVE
        uses = adaptive_mode or self.strategy in (AccumulationStrategy.MEMORY_AWARE,
                                                  AccumulationStrategy.ADAPTIVE_LAYERS)
        if self.adaptive_scaling is False and (adaptive_mode or self.strategy is AccumulationStrategy.ADAPTIVE_LAYERS):
            what = "mode=ADAPTIVE" if adaptive_mode else "strategy=ADAPTIVE_LAYERS"
            raise ValueError(f"Invalid adaptive_scaling: False with {what} (that {what.split('=')[0]} is adaptive "
                             "scaling; leave adaptive_scaling unset or True)")
        if self.adaptive_scaling is True and not uses:
            _unused("adaptive_scaling=True", "only mode ADAPTIVE and strategies MEMORY_AWARE / ADAPTIVE_LAYERS adapt")
        if self.adaptive_scaling is None:
            self.adaptive_scaling = uses
        if self.progressive_scaling and self.mode in _FIXED_K:
            _unused("progressive_scaling=True", f"mode={self.mode.name} keeps K fixed, so the learning rate "
                    "never needs rescaling")
        lo, hi = self.min_accumulation_steps, self.max_accumulation_steps
        if (lo is not None or hi is not None) and not adaptive_mode:
            raise ValueError("Invalid min/max_accumulation_steps: set with mode="
                             f"{self.mode.name} (they bound K in mode=ADAPTIVE only)")
        if adaptive_mode:
            k = self.accumulation_steps
            lo = 1 if lo is None else check_int("min_accumulation_steps", lo)
            hi = max(64, k) if hi is None else check_int("max_accumulation_steps", hi)
            if lo > hi:
                raise ValueError(f"Invalid min_accumulation_steps: {lo} > max_accumulation_steps={hi} "
                                 "(expected min_accumulation_steps <= max_accumulation_steps)")
            if not lo <= k <= hi:
                raise ValueError(f"Invalid accumulation_steps: {k} (expected the starting K within "
                                 f"min_accumulation_steps={lo} .. max_accumulation_steps={hi})")
            self.min_accumulation_steps, self.max_accumulation_steps = lo, hi
            if self.effective_batch_size is not None:  # the largest batch per update (see _adaptive_target)
                self.target_batch_size = self.effective_batch_size * hi

    # -------------------------------------------------------------- derived
    @property
    def uses_layer_weights(self) -> bool:
        """Whether ``layer_accumulation_weights`` act (strategy LAYER_WISE or mode SELECTIVE)."""
        return self.strategy is AccumulationStrategy.LAYER_WISE or self.mode is AccumulationMode.SELECTIVE

    @property
    def storage(self) -> str:
        """The wrapper's buffer mode: ``"inplace"`` for EFFICIENT, ``"buffered"`` otherwise.

        ``MEMORY_AWARE`` is always buffered (:class:`~accumopt.MicroBatcher` requires it).
        """
        if self.mode is AccumulationMode.EFFICIENT and self.strategy is not AccumulationStrategy.MEMORY_AWARE:
            return "inplace"
        return "buffered"

    @property
    def k_schedule(self) -> Any:
        """The ``accumulation_steps`` argument of :class:`~accumopt.AccumulatingOptimizer`."""
        if self.mode is AccumulationMode.PROGRESSIVE:
            return list(self.accumulation_schedule or [])
        if self.mode is AccumulationMode.ADAPTIVE:
            from .adaptive import AdaptiveK

            # Noise scale read from the wrapper (noise_scale=True); its unit (samples or
            # micro-batches) is set by the accumulator through ``micro_batch_size``.
            return AdaptiveK(k_min=self.min_accumulation_steps or 1,
                             k_max=self.max_accumulation_steps or self.accumulation_steps,
                             k_init=self.accumulation_steps)
        return self.accumulation_steps

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~accumopt.AccumulatingOptimizer` (besides optimizer, model, scaler, scheduler)."""
        kw: dict[str, Any] = {"mode": self.storage, "nonfinite": self.nan_policy or "ignore"}
        if self.mode is AccumulationMode.ADAPTIVE:
            kw["noise_scale"] = True  # read by AdaptiveK (the K schedule, see k_schedule)
        if self.gradient_clipping:
            kw["max_grad_norm"] = self.clipping_norm
        if self.strategy is AccumulationStrategy.ADAPTIVE_LAYERS:
            kw["agc_clip_factor"] = self.agc_clip_factor
        if self.uses_layer_weights and self.layer_accumulation_weights:
            kw["layer_weights"] = dict(self.layer_accumulation_weights)
        if self.strategy is AccumulationStrategy.PARAMETER_GROUPS:
            kw["group_weights"] = self.parameter_group_weights
        if self.exclude_parameters:
            kw["exclude"] = list(self.exclude_parameters)
        return kw

    def to_dict(self) -> dict[str, Any]:
        """Plain data (enums as their values): safe for ``torch.save`` / ``weights_only=True`` and JSON."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, enum.Enum) else v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GradientAccumulationConfig":
        """Rebuild a config from :meth:`to_dict` (validated again)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Invalid config dict: unknown keys {unknown!r}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**dict(data))

