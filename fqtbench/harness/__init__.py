"""Lightning glue: base modules, the cost meter, the trainer factory and the run driver."""

from .callbacks import CostMeter
from .module import FQTModule, GradientFreeModule, calibrate_activations, evaluate_float

__all__ = ["CostMeter", "FQTModule", "GradientFreeModule", "calibrate_activations", "evaluate_float"]
