"""accumopt: gradient accumulation as a one-line, drop-in change to any torch optimizer."""

from .misuse import MisuseWarning
from .optimizer import AccumulatingOptimizer
from .precision import NonFiniteGradientError
# The configuration / trainer API (docs/configuration.md), graph-captured micro-steps (docs/graphs.md), K schedules,
# adaptive K and memory-aware splitting (docs/schedules.md), the gradient noise scale (docs/state.md).
from .config import AccumulationMode, AccumulationStrategy, GradientAccumulationConfig
from .accumulator import AccumulationState, GradientAccumulator
from .trainer import GradientAccumulationTrainer
from .graphs import CapturedMicroStep, capture_micro_step
from .adaptive import AdaptiveK
from .splitting import MemoryMonitor, MicroBatcher
from .noise import NoiseScaleEstimator

__all__ = ["AccumulatingOptimizer", "MisuseWarning", "NonFiniteGradientError",
           "AccumulationMode", "AccumulationStrategy", "AccumulationState", "GradientAccumulationConfig",
           "GradientAccumulator", "GradientAccumulationTrainer", "CapturedMicroStep", "capture_micro_step",
           "AdaptiveK", "MemoryMonitor", "MicroBatcher", "NoiseScaleEstimator"]
try:  # the installed distribution's version (pyproject.toml); a plain source tree has none
    from importlib.metadata import PackageNotFoundError as _NotFound, version as _version
    __version__: str = _version("accumopt")
except _NotFound:  # pragma: no cover - running from a checkout that was never installed
    __version__ = "0.0.0+unknown"
