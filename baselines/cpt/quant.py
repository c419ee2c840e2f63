"""CPT's quantizers on the fqtbench GEMM roles, with bit-widths the schedule reassigns every iteration.

- weights: unsigned affine min/max codes per output channel (or per tensor), nearest rounding;
- activations: per tensor, batch range in training with an EMA (momentum 0.1 on the new value, as
  CPT's 0.9 on the old) used in evaluation -- fqtbench's `ActQuantizer`, which the integer engine
  exports. After a ReLU its [0, max] codes are CPT's [min, max] codes (min is 0); the normalised
  network input is coded signed-symmetric instead of asymmetric (a documented deviation);
- errors: the output gradient dL/dy, per tensor, affine, stochastic rounding, quantized once and
  fed to both backward GEMMs (grad-input and grad-weight), as CPT's `quantize_grad` does; exactly
  unbiased like CPT's (an exact zero on an integer code, the scale fitted around it, no clipping).

The layer policy: the last layer (the FC, which CPT keeps in full precision but fqtbench's integer
export needs quantized) runs at the fixed evaluation precision (cpt.eval_bits, default bits.max);
with `bits.first_last` set, the first and last layers are fixed at that precision instead. Every
other layer follows the schedule.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from fqtbench.nn import LayerQuant, QLayer, quant_layers
from fqtbench.quant import ActQuantizer, QTensor, Quantizer, affine_quantize
from fqtbench.quant.core import exact_zero_affine


class CPTWeightQuantizer(Quantizer):
    """Unsigned affine weight codes over [min, max] (zero point rounded to a code), nearest rounding."""

    def __init__(self, bits: int, granularity: Literal["channel", "tensor"] = "channel"):
        super().__init__()
        self.bits = int(bits)
        self.granularity = granularity

    def forward(self, w: Tensor) -> QTensor:
        return affine_quantize(w, self.bits, self.granularity)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, granularity={self.granularity}"


class SharedErrorQuantizer(Quantizer):
    """Per-tensor stochastic affine codes of dL/dy, drawn once and returned to both backward GEMMs.

    A layer's backward asks the grad-input and then the grad-weight quantizer for the same gradient
    tensor; this module is installed in both roles and hands the second caller the first caller's
    draw, so both GEMMs read one quantized error, as in CPT.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = int(bits)
        self._last: tuple[Tensor, QTensor] | None = None

    def forward(self, g: Tensor) -> QTensor:
        if self._last is not None and self._last[0] is g:
            q = self._last[1]
            self._last = None  # both consumers served
            return q
        q = exact_zero_affine(g, self.bits, "tensor", stochastic=True)  # unbiased: nothing is clipped
        self._last = (g, q)
        return q

    def clear(self) -> None:
        """Drop a draw only one GEMM consumed (the first layer computes no input gradient)."""
        self._last = None


def fixed_bits(layer: QLayer, last_bits: int, first_last: int | None) -> int | None:
    """The precision of a layer that does not follow the schedule, or None for a cyclic layer."""
    if first_last is not None and layer.position in ("first", "last"):
        return first_last
    return last_bits if layer.position == "last" else None


def attach_cpt(
    model: nn.Module,
    *,
    bits_max: int,
    last_bits: int,
    grad_bits: int | None,
    first_last: int | None,
    weight_granularity: Literal["channel", "tensor"],
    exec_mode: str = "sim",
    backend=None,
) -> None:
    """Install CPT quantizers on every QConv2d/QLinear; cyclic layers start at `bits_max`."""
    for _, layer in quant_layers(model):
        b = fixed_bits(layer, last_bits, first_last) or bits_max
        err = SharedErrorQuantizer(grad_bits) if grad_bits is not None else None
        quant = LayerQuant(CPTWeightQuantizer(b, weight_granularity), ActQuantizer(b, signed=layer.input_signed), err, err)
        layer.set_quant(quant, exec_mode, backend)


def cyclic_quantizers(model: nn.Module, last_bits: int, first_last: int | None) -> list[Quantizer]:
    """The weight and activation quantizers whose bits follow the schedule."""
    return [q for _, layer in quant_layers(model) if fixed_bits(layer, last_bits, first_last) is None
            for q in (layer.quant.weight, layer.quant.act)]


def clear_error_draws(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, SharedErrorQuantizer):
            m.clear()
