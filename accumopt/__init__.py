"""accumopt: gradient accumulation as a one-line, drop-in change to any torch optimizer."""

from .misuse import MisuseWarning
from .optimizer import AccumulatingOptimizer
from .precision import NonFiniteGradientError

__all__ = ["AccumulatingOptimizer", "MisuseWarning", "NonFiniteGradientError"]
try:  # the installed distribution's version (pyproject.toml); a plain source tree has none
    from importlib.metadata import PackageNotFoundError as _NotFound, version as _version

    __version__: str = _version("accumopt")
except _NotFound:  # pragma: no cover - running from a checkout that was never installed
    __version__ = "0.0.0+unknown"

# The configuration / trainer API (docs/configuration.md).
from .config import AccumulationMode, AccumulationStrategy, GradientAccumulationConfig  # noqa: E402
from .accumulator import AccumulationState, GradientAccumulator  # noqa: E402
from .trainer import GradientAccumulationTrainer  # noqa: E402

__all__ += [
    "AccumulationMode",
    "AccumulationStrategy",
    "AccumulationState",
    "GradientAccumulationConfig",
    "GradientAccumulator",
    "GradientAccumulationTrainer",
]

# Graph-captured micro-steps (docs/graphs.md).
from .graphs import CapturedMicroStep, capture_micro_step  # noqa: E402

__all__ += ["CapturedMicroStep", "capture_micro_step"]

# K schedules, adaptive K, memory-aware splitting (docs/schedules.md).
from .adaptive import AdaptiveK  # noqa: E402
from .splitting import MemoryMonitor, MicroBatcher  # noqa: E402

__all__ += ["AdaptiveK", "MemoryMonitor", "MicroBatcher"]

# Gradient noise scale (docs/state.md).
from .noise import NoiseScaleEstimator  # noqa: E402

__all__ += ["NoiseScaleEstimator"]
