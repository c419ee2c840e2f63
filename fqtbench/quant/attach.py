"""Attach the standard quantizers to every layer of a model: the QAT recipe, also used for PTQ."""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..nn import LayerQuant, QLayer, quant_layers
from .core import ActQuantizer, Quantizer, WeightQuantizer

GradFactory = Callable[[QLayer], Quantizer | None]


def layer_bits(layer: QLayer, w_bits: int, a_bits: int, first_last_bits: int | None) -> tuple[int, int]:
    """The first/last-layer policy: those layers use `first_last_bits` when it is set."""
    if first_last_bits is not None and layer.position in ("first", "last"):
        return first_last_bits, first_last_bits
    return w_bits, a_bits


def attach_standard(
    model: nn.Module,
    *,
    w_bits: int,
    a_bits: int,
    first_last_bits: int | None = None,
    weight_granularity: str = "tensor",
    grad_input: GradFactory | None = None,
    grad_weight: GradFactory | None = None,
    exec_mode: str = "sim",
    backend=None,
) -> None:
    """Symmetric signed weights and per-tensor activations (signed for the network input, unsigned
    after ReLU) on every QConv2d/QLinear; gradient quantizers from the given factories."""
    for _, layer in quant_layers(model):
        wb, ab = layer_bits(layer, w_bits, a_bits, first_last_bits)
        layer.set_quant(
            LayerQuant(
                weight=WeightQuantizer(wb, weight_granularity),
                act=ActQuantizer(ab, signed=layer.input_signed),
                grad_input=grad_input(layer) if grad_input else None,
                grad_weight=grad_weight(layer) if grad_weight else None,
            ),
            exec_mode,
            backend,
        )
