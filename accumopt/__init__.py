"""accumopt: gradient accumulation as a one-line, drop-in change to any torch optimizer."""

from .optimizer import AccumulatingOptimizer
from .precision import NonFiniteGradientError

__all__ = ["AccumulatingOptimizer", "NonFiniteGradientError"]
__version__ = "0.1.0"

# The documented configuration / trainer API (docs/seed_api.md).
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

# Gradient noise scale and checkpoint files (docs/state.md).
from .noise import NoiseScaleEstimator  # noqa: E402

__all__ += ["NoiseScaleEstimator"]
