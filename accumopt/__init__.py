"""accumopt: gradient accumulation as a one-line, drop-in change to any torch optimizer."""

from .optimizer import AccumulatingOptimizer
from .precision import NonFiniteGradientError

__all__ = ["AccumulatingOptimizer", "NonFiniteGradientError"]
__version__ = "0.1.0"
