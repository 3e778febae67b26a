"""``GradientAccumulationConfig`` and its enums: options checked once (errors name the option), then mapped to
:class:`~accumopt.AccumulatingOptimizer` arguments by :meth:`GradientAccumulationConfig.optimizer_kwargs`."""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch

from ._checks import check_choice, check_int, check_real
from .adaptive import AdaptiveK
from .schedule import LR_SCALING_RULES
from .weights import parameter_names

__all__ = ["AccumulationMode", "AccumulationStrategy", "GradientAccumulationConfig"]


class AccumulationMode(enum.Enum):
    """How K is chosen and where the sum lives: ``STANDARD`` (fixed K, buffers), ``EFFICIENT`` (fixed K, in
    ``.grad``), ``ADAPTIVE`` (K follows the noise scale), ``PROGRESSIVE`` (K by epoch), ``SELECTIVE`` (weights)."""

    STANDARD = "standard"
    EFFICIENT = "efficient"
    ADAPTIVE = "adaptive"
    PROGRESSIVE = "progressive"
    SELECTIVE = "selective"


class AccumulationStrategy(enum.Enum):
    """What happens per parameter or batch: ``UNIFORM`` (the mean), ``LAYER_WISE`` / ``PARAMETER_GROUPS``
    (weighted), ``ADAPTIVE_LAYERS`` (AGC clipping), ``MEMORY_AWARE`` (``MicroBatcher``, out-of-memory recovery)."""

    UNIFORM = "uniform"
    LAYER_WISE = "layer_wise"
    PARAMETER_GROUPS = "parameter_groups"
    ADAPTIVE_LAYERS = "adaptive_layers"
    MEMORY_AWARE = "memory_aware"


_NAN_POLICIES = ("skip", "drop", "raise")
_PRECISIONS = ("float16", "bfloat16")
_FLAGS = ("gradient_scaling", "loss_scaling", "memory_monitoring", "progressive_scaling", "gradient_clipping",
          "nan_handling")
_OPTIONAL_FLAGS = ("adaptive_scaling", "selective_accumulation", "progress_bar")
_POSITIVE = partial(check_real, positive=True)
# Optional numbers (None: unset), checked before anything reads them and stored as the checked int / float.
_NUMBERS: dict[str, Callable[[str, Any], Any]] = {
    "accumulation_steps": check_int, "effective_batch_size": check_int, "target_batch_size": check_int,
    "min_accumulation_steps": check_int, "max_accumulation_steps": check_int, "checkpoint_every": check_int,
    "memory_threshold": check_real, "clipping_norm": _POSITIVE, "agc_clip_factor": _POSITIVE}
_E = TypeVar("_E", AccumulationMode, AccumulationStrategy)


def _enum(name: str, value: Any, cls: type[_E]) -> _E:
    if isinstance(value, cls):
        return value
    if isinstance(value, str) and value.lower() in {m.value for m in cls}:  # each value is the lower-case name
        return cls(value.lower())
    error = ValueError if isinstance(value, str) else TypeError
    raise error(f"Invalid {name}: {value!r} (expected one of {', '.join(f'{cls.__name__}.{m.name}' for m in cls)})")


def _unused(what: str, why: str, level: int = 5) -> None:
    warnings.warn(f"GradientAccumulationConfig: {what} has no effect here ({why}); it is ignored.",
                  UserWarning, stacklevel=level)


def _divide(target: int, by: int, name: str) -> int:
    if target % by:
        raise ValueError(f"Invalid target_batch_size: {target} (expected a multiple of {name}={by})")
    return target // by


@dataclass
class GradientAccumulationConfig:
    """Configuration of :class:`GradientAccumulator` and :class:`GradientAccumulationTrainer`; every field is
    described in ``docs/configuration.md``. ``target_batch_size = effective_batch_size x accumulation_steps``."""

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
    parameter_group_weights: dict[Any, float] | list[float] | None = None
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

    def __post_init__(self) -> None:
        self.mode = _enum("mode", self.mode, AccumulationMode)
        self.strategy = _enum("strategy", self.strategy, AccumulationStrategy)
        for name in _FLAGS + _OPTIONAL_FLAGS:
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name in _OPTIONAL_FLAGS):
                raise TypeError(f"Invalid {name}: {value!r} (expected True or False, got {type(value).__name__})")
        check_int("logging_frequency", self.logging_frequency)
        for name, choices in (("nan_policy", _NAN_POLICIES), ("mixed_precision", _PRECISIONS),
                              ("lr_scaling_rule", LR_SCALING_RULES)):
            if getattr(self, name) is not None:
                check_choice(name, getattr(self, name), choices)
        for name, check in _NUMBERS.items():
            if getattr(self, name) is not None:
                setattr(self, name, check(name, getattr(self, name)))
        self._check_schedule()
        self._check_batch_sizes()
        self._check_weights()
        self._check_options()
        self._check_adaptive()

    def _check_schedule(self) -> None:
        s, progressive = self.accumulation_schedule, self.mode is AccumulationMode.PROGRESSIVE
        self._option("accumulation_schedule", progressive, None,
                     f"mode={self.mode.name} (a schedule needs mode=AccumulationMode.PROGRESSIVE)", strict=True)
        if not progressive:
            return
        if s is None or isinstance(s, (list, tuple)) and not s:
            raise ValueError(f"Invalid accumulation_schedule: {s!r} with mode=PROGRESSIVE (expected a non-empty list "
                             "of K by epoch, e.g. [2, 4, 8, 16])")
        if isinstance(s, (str, bytes)) or not isinstance(s, Sequence):
            raise TypeError(f"Invalid accumulation_schedule: {s!r} (expected a list of ints >= 1)")
        self.accumulation_schedule = [check_int(f"accumulation_schedule[{i}]", k) for i, k in enumerate(s)]
        k, first = self.accumulation_steps, self.accumulation_schedule[0]
        if k is not None and k != first:
            raise ValueError(f"Invalid accumulation_steps: {k} with accumulation_schedule={list(s)!r} "
                             f"(expected {first}, the schedule's first K, or leave accumulation_steps unset)")
        if self.target_batch_size is not None:
            raise ValueError(f"Invalid target_batch_size: {self.target_batch_size} with mode=PROGRESSIVE (K changes "
                             "by epoch, so no single target holds; expected it unset: an update is K micro-batches)")
        self.accumulation_steps = first

    def _check_batch_sizes(self) -> None:
        k, e, t = self.accumulation_steps, self.effective_batch_size, self.target_batch_size
        if self.mode is AccumulationMode.PROGRESSIVE:  # K by epoch (see _check_schedule): nothing to derive
            return
        if self.mode is AccumulationMode.ADAPTIVE and t is not None:
            self._adaptive_target(k, e, t)
        elif t is not None and k is not None and e is not None:
            if e * k != t:
                raise ValueError(f"Invalid target_batch_size: {t} (expected effective_batch_size x accumulation_steps "
                                 f"= {e} x {k} = {e * k})")
        elif t is not None and e is not None:
            self.accumulation_steps = _divide(t, e, "effective_batch_size")
        elif t is not None and k is not None:
            self.effective_batch_size = _divide(t, k, "accumulation_steps")
        elif k is not None and e is not None:
            self.target_batch_size = e * k
        self.accumulation_steps = self.accumulation_steps or 1

    def _adaptive_target(self, k: int | None, e: int | None, t: int) -> None:
        """ADAPTIVE: ``target_batch_size`` is the largest batch per update, so it sets ``max_accumulation_steps``."""
        if e is None:
            raise ValueError(f"Invalid target_batch_size: {t} with mode=ADAPTIVE and no effective_batch_size (it is "
                             "the largest batch per update, effective_batch_size x max K: give effective_batch_size)")
        k_max, hi = _divide(t, e, "effective_batch_size"), self.max_accumulation_steps
        if hi is not None and hi != k_max:
            raise ValueError(f"Invalid max_accumulation_steps: {hi} with target_batch_size={t} (under mode=ADAPTIVE "
                             f"the target is the largest batch per update, so max K = {t} / effective_batch_size {e} "
                             f"= {k_max}; expected {k_max}, or give only one of the two)")
        if k is not None and k > k_max:
            raise ValueError(f"Invalid accumulation_steps: {k} with target_batch_size={t} (under mode=ADAPTIVE the "
                             f"target is the largest batch per update; expected a starting K <= {t} / {e} = {k_max})")
        self.max_accumulation_steps, self.accumulation_steps = k_max, k or k_max

    def _check_weights(self) -> None:
        lw, gw, ex = self.layer_accumulation_weights, self.parameter_group_weights, self.exclude_parameters
        selective_mode = self.mode is AccumulationMode.SELECTIVE
        explicit_selective = self.selective_accumulation is True
        if selective_mode and self.selective_accumulation is False:
            raise ValueError("Invalid selective_accumulation: False with mode=SELECTIVE "
                             "(the selective mode is selective accumulation; leave it unset or True)")
        self.selective_accumulation = explicit_selective or selective_mode
        if lw is not None:
            if not isinstance(lw, Mapping):
                raise TypeError(f"Invalid layer_accumulation_weights: {lw!r} "
                                "(expected a dict of name or pattern to weight)")
            self.layer_accumulation_weights = {str(k): self._weight(f"layer_accumulation_weights[{k!r}]", v)
                                               for k, v in lw.items()}
        name = "parameter_group_weights"
        if isinstance(gw, Mapping):
            self.parameter_group_weights = {k: self._weight(f"{name}[{k!r}]", v) for k, v in gw.items()}
        elif isinstance(gw, Sequence) and not isinstance(gw, str):
            self.parameter_group_weights = [self._weight(f"{name}[{i}]", v) for i, v in enumerate(gw)]
        elif gw is not None:
            raise TypeError(f"Invalid {name}: {gw!r} (expected a dict like {{'group_0': 1.0}} or a list)")
        if ex is not None:
            if isinstance(ex, str) or not isinstance(ex, Sequence) or not all(isinstance(n, str) for n in ex):
                raise TypeError(f"Invalid exclude_parameters: {ex!r} (expected a list of names or glob patterns)")
            if not self.selective_accumulation:
                raise ValueError("Invalid exclude_parameters: set while selective_accumulation is False (freezing is "
                                 "selective accumulation: set selective_accumulation=True or mode=SELECTIVE)")
            self.exclude_parameters = list(ex)
        groups = self.strategy is AccumulationStrategy.PARAMETER_GROUPS
        if lw and not self.uses_layer_weights:
            _unused("layer_accumulation_weights", f"mode={self.mode.name}, strategy={self.strategy.name}; only "
                    "strategy LAYER_WISE or mode SELECTIVE use layer weights")
        if gw is not None and not groups:
            _unused("parameter_group_weights", f"strategy={self.strategy.name}; only PARAMETER_GROUPS uses them")
        pg = self.parameter_group_weights
        weights = [*(self.layer_accumulation_weights or {}).values(), *(pg.values() if isinstance(pg, Mapping)
                                                                      else pg or [])]
        if explicit_selective and not selective_mode and not self.exclude_parameters and 0.0 not in weights:
            _unused("selective_accumulation=True", f"mode={self.mode.name}: it only allows weight 0 and "
                    "exclude_parameters, and neither is set")
        if groups and gw is None:
            raise ValueError("Invalid parameter_group_weights: None with strategy=PARAMETER_GROUPS "
                             "(expected e.g. {'group_0': 1.0, 'group_1': 0.5})")
        if self.strategy is AccumulationStrategy.LAYER_WISE and not lw:
            raise ValueError("Invalid layer_accumulation_weights: empty with strategy=LAYER_WISE "
                             "(expected e.g. {'fc1.weight': 1.0, 'fc2.*': 0.5})")

    def _weight(self, name: str, value: Any) -> float:
        w = check_real(name, value, nonnegative=True)
        if w == 0.0 and not self.selective_accumulation:
            raise ValueError(f"Invalid {name}: 0.0 freezes the parameter (expected a weight > 0, or "
                             "selective_accumulation=True / mode=SELECTIVE to freeze parameters on purpose)")
        return w

    def _option(self, name: str, active: bool, default: Any, why: str, *, strict: bool = False) -> None:
        """An option read only when ``active``: ``default`` there; set elsewhere it warns (``strict``: raises)."""
        value = getattr(self, name)
        if value is None:
            value = default if active else None
        elif not active:
            if strict:
                raise ValueError(f"Invalid {name}: {value!r} with {why}")
            _unused(f"{name}={value!r}", why, level=6)
            value = None
        setattr(self, name, value)

    def _check_options(self) -> None:
        """Options that depend on a flag, a mode or a strategy."""
        memory_aware = self.strategy is AccumulationStrategy.MEMORY_AWARE
        if (t := self.memory_threshold) is not None and not 0.0 < t <= 1.0:
            raise ValueError(f"Invalid memory_threshold: {t} (expected a fraction of device memory in (0, 1])")
        self._option("memory_threshold", memory_aware or self.memory_monitoring, 0.9,
                     "it is read by memory_monitoring=True and strategy=MEMORY_AWARE")
        if memory_aware and not self.loss_scaling:
            raise ValueError("Invalid loss_scaling: False with strategy=MEMORY_AWARE (its micro-batches vary in size, "
                             "so their sum has no fixed meaning; expected loss_scaling=True)")
        if memory_aware and self.mode is AccumulationMode.EFFICIENT:
            warnings.warn("GradientAccumulationConfig: mode=EFFICIENT with strategy=MEMORY_AWARE accumulates in "
                          "buffers (mode='buffered'), not in .grad: out-of-memory recovery keeps the window's sum "
                          "apart from a micro-batch that fails (UNIFORM sums in place).", UserWarning, stacklevel=4)
        self._option("clipping_norm", self.gradient_clipping, 1.0,
                     "gradient_clipping=False (expected gradient_clipping=True, or no clipping_norm)", strict=True)
        self._option("agc_clip_factor", self.strategy is AccumulationStrategy.ADAPTIVE_LAYERS, 0.01,
                     f"strategy={self.strategy.name}; only ADAPTIVE_LAYERS clips unit-wise")
        self._option("nan_policy", self.nan_handling, "skip", "nan_handling=False (expected nan_handling=True)",
                     strict=True)
        if self.nan_policy == "drop" and self.mode is AccumulationMode.EFFICIENT:
            raise ValueError("Invalid nan_policy: 'drop' with mode=EFFICIENT (dropping one micro-batch needs its "
                             "gradient apart from the window's sum; use mode=STANDARD)")
        self._option("lr_scaling_rule", self.progressive_scaling, "sqrt",
                     "it is the rule of progressive_scaling=True, which is off")
        if self.device is not None and not isinstance(self.device, str):
            raise TypeError(f"Invalid device: {self.device!r} (expected a device string such as 'cpu' or 'cuda')")
        try:
            torch.device(self.device or "cpu")
        except RuntimeError:
            raise ValueError(f"Invalid device: {self.device!r} (expected a torch device string such as 'cpu', "
                             "'cuda' or 'cuda:1')") from None
        if self.checkpoint_every is not None and self.checkpoint_path is None:
            raise ValueError("Invalid checkpoint_every: set without checkpoint_path (expected a file to write)")
        if self.checkpoint_path is not None and not isinstance(self.checkpoint_path, str):
            raise TypeError(f"Invalid checkpoint_path: {self.checkpoint_path!r} (expected a str path)")
        self._option("checkpoint_path", self.checkpoint_every is not None, None,
                     "the trainer writes it every checkpoint_every real updates, and checkpoint_every is not set")

    def _check_adaptive(self) -> None:
        adaptive_mode = self.mode is AccumulationMode.ADAPTIVE
        agc = self.strategy is AccumulationStrategy.ADAPTIVE_LAYERS
        uses = adaptive_mode or agc or self.strategy is AccumulationStrategy.MEMORY_AWARE
        if self.adaptive_scaling is False and (adaptive_mode or agc):
            what, kind = ("mode=ADAPTIVE", "mode") if adaptive_mode else ("strategy=ADAPTIVE_LAYERS", "strategy")
            raise ValueError(f"Invalid adaptive_scaling: False with {what} (that {kind} is adaptive "
                             "scaling; leave adaptive_scaling unset or True)")
        if self.adaptive_scaling and not uses:
            _unused("adaptive_scaling=True", "only mode ADAPTIVE and strategies MEMORY_AWARE / ADAPTIVE_LAYERS adapt")
        self.adaptive_scaling = uses if self.adaptive_scaling is None else self.adaptive_scaling
        if self.progressive_scaling and self.mode not in (AccumulationMode.ADAPTIVE, AccumulationMode.PROGRESSIVE):
            _unused("progressive_scaling=True", f"mode={self.mode.name} keeps K fixed, so the learning rate "
                    "never needs rescaling")
        for name in ("min_accumulation_steps", "max_accumulation_steps"):
            self._option(name, adaptive_mode, None, f"mode={self.mode.name} (it bounds K in mode=ADAPTIVE only)",
                         strict=True)
        if not adaptive_mode:
            return
        k, lo, hi = self.k, self.min_accumulation_steps or 1, self.max_accumulation_steps or max(64, self.k)
        if lo > hi:
            raise ValueError(f"Invalid min_accumulation_steps: {lo} > max_accumulation_steps={hi} "
                             "(expected min_accumulation_steps <= max_accumulation_steps)")
        if not lo <= k <= hi:
            raise ValueError(f"Invalid accumulation_steps: {k} (expected the starting K within "
                             f"min_accumulation_steps={lo} .. max_accumulation_steps={hi})")
        self.min_accumulation_steps, self.max_accumulation_steps = lo, hi
        if self.effective_batch_size is not None:  # the largest batch per update (see _adaptive_target)
            self.target_batch_size = self.effective_batch_size * hi

    def check_model(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Raise ``ValueError`` if an option names a parameter or param group ``model``/``optimizer`` lack."""
        names = sorted(parameter_names(model).values())
        layers = list(self.layer_accumulation_weights or ()) if self.uses_layer_weights else []
        for option, given in (("layer_accumulation_weights", layers), ("exclude_parameters", self.exclude_parameters)):
            unmatched = [p for p in given or [] if not any(n == p or fnmatch.fnmatchcase(n, p) for n in names)]
            if unmatched:
                raise ValueError(f"Invalid {option}: {unmatched!r} match no parameter name "
                                 f"(names look like {names[:4]!r})")
        if self.strategy is not AccumulationStrategy.PARAMETER_GROUPS:
            return
        gw, n = self.parameter_group_weights, len(optimizer.param_groups)
        valid = set(range(n)) | {f"group_{i}" for i in range(n)}
        for key in gw if isinstance(gw, Mapping) else ():
            if isinstance(key, bool) or key not in valid:
                raise ValueError(f"Invalid parameter_group_weights key: {key!r} (expected a group index 0..{n - 1} or "
                                 f"'group_<i>': the optimizer has {n} param groups)")
        if isinstance(gw, list) and len(gw) != n:
            raise ValueError(f"Invalid parameter_group_weights: {list(gw)!r} (expected {n} weights, one per "
                             "param group)")

    @property
    def k(self) -> int:
        """The (first) K: ``accumulation_steps`` once resolved."""
        return self.accumulation_steps or 1

    @property
    def uses_layer_weights(self) -> bool:
        """Whether ``layer_accumulation_weights`` act (strategy LAYER_WISE or mode SELECTIVE)."""
        return self.strategy is AccumulationStrategy.LAYER_WISE or self.mode is AccumulationMode.SELECTIVE

    @property
    def storage(self) -> str:
        """The wrapper's ``mode``: ``"inplace"`` for EFFICIENT (except under MEMORY_AWARE), else ``"buffered"``."""
        inplace = self.mode is AccumulationMode.EFFICIENT and self.strategy is not AccumulationStrategy.MEMORY_AWARE
        return "inplace" if inplace else "buffered"

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The :class:`~accumopt.AccumulatingOptimizer` keyword arguments this configuration stands for (all but
        ``optimizer``, ``model``, ``scheduler``, ``scaler``); under ``ADAPTIVE`` a new ``AdaptiveK`` is the K."""
        steps: int | list[int] | AdaptiveK = self.k
        if self.mode is AccumulationMode.PROGRESSIVE:
            steps = list(self.accumulation_schedule or [])
        elif self.mode is AccumulationMode.ADAPTIVE:
            steps = AdaptiveK(k_min=self.min_accumulation_steps or 1, k_max=self.max_accumulation_steps or self.k,
                              k_init=self.k)
        agc = self.strategy is AccumulationStrategy.ADAPTIVE_LAYERS
        groups = self.strategy is AccumulationStrategy.PARAMETER_GROUPS
        return {"accumulation_steps": steps, "mode": self.storage, "reduction": "mean" if self.loss_scaling else "sum",
                "nonfinite": self.nan_policy or "ignore", "lr_scaling": self.lr_scaling_rule,
                "max_grad_norm": self.clipping_norm if self.gradient_clipping else None,
                "agc_clip_factor": self.agc_clip_factor if agc else None,
                "layer_weights": dict(self.layer_accumulation_weights or {}) if self.uses_layer_weights else None,
                "group_weights": self.parameter_group_weights if groups else None,
                "exclude": list(self.exclude_parameters) if self.exclude_parameters else None,
                "noise_scale": self.mode is AccumulationMode.ADAPTIVE, "track_grad_norm": True,
                "log_every": self.logging_frequency}

    def to_dict(self) -> dict[str, Any]:
        """Plain data (enums as their values): safe for ``torch.save`` / ``weights_only=True`` and JSON."""
        return {f.name: (v.value if isinstance(v := getattr(self, f.name), enum.Enum) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GradientAccumulationConfig:
        """Rebuild a config from :meth:`to_dict` (validated again, silently)."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"Invalid config dict: unknown keys {unknown!r}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**dict(data))
