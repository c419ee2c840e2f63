"""The shared integer engine: exact backends, integer-only IntModel, export from fqtbench.nn models."""

from .intmodel import IntModel, Node
from .intrange import IntRange, accumulator_bound
from .requant import FixedPoint, requantize, rshift_round

__all__ = ["FixedPoint", "IntModel", "IntRange", "Node", "accumulator_bound", "requantize", "rshift_round"]
