"""Quantizer math: codes, scales, rounding rules and granularity (see core.py)."""

from .core import (
    ActQuantizer,
    GradQuantizer,
    QTensor,
    Quantizer,
    WeightQuantizer,
    affine_quantize,
    round_half_even,
    signed_quantize,
    stochastic_round,
    symmetric_quantize,
    unsigned_quantize,
)

__all__ = [
    "ActQuantizer", "GradQuantizer", "QTensor", "Quantizer", "WeightQuantizer", "affine_quantize",
    "round_half_even", "signed_quantize", "stochastic_round", "symmetric_quantize", "unsigned_quantize",
]
