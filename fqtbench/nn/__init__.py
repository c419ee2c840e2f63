"""Quantization-aware layers (three GEMM roles, each with a quantizer) and model blocks."""

from .blocks import BasicBlock, ConvBNReLU, GlobalAvgPool, Normalize, QNet, mark_positions
from .layers import LayerQuant, QConv2d, QLayer, QLinear, quant_layers

__all__ = [
    "BasicBlock", "ConvBNReLU", "GlobalAvgPool", "LayerQuant", "Normalize", "QConv2d", "QLayer",
    "QLinear", "QNet", "mark_positions", "quant_layers",
]
