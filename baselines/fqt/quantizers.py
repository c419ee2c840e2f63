"""The quantizers of FQT (StatQuant): exact-zero affine weights, and the three gradient quantizers.

Every gradient quantizer rounds stochastically, so each quantized output gradient is an unbiased
estimate of the exact one. Granularity per GEMM role:

=====  =====================================  ============================================
name   grad-input GEMM (Q_agrad)              grad-weight GEMM (Q_wgrad)
=====  =====================================  ============================================
ptq    per tensor                             per tensor
psq    per row = per sample                   per column (linear) / per output channel (conv)
bhq    block Householder over the samples     per column / per output channel (as psq)
=====  =====================================  ============================================
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from fqtbench.quant import QTensor, Quantizer
from fqtbench.quant.core import exact_zero_affine
from fqtbench.quant.householder import bhq_quantize

GradKind = Literal["ptq", "psq", "bhq"]
Role = Literal["grad_input", "grad_weight"]


class AffineWeightQuantizer(Quantizer):
    """Weights per tensor, affine over [min, max] with 0.0 exactly representable; nearest rounding."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = int(bits)

    def forward(self, w: Tensor) -> QTensor:
        return exact_zero_affine(w, self.bits, "tensor")


class AffineGradQuantizer(Quantizer):
    """PTQ (per tensor) and PSQ (per sample / per column): exact-zero affine, stochastic rounding.

    'column' on an (N, C, H, W) conv gradient is per output channel: StatQuant's per (c, h, w)
    column would vary along the K dimension of the integer grad-weight GEMM (see README).
    """

    def __init__(self, bits: int, granularity: Literal["tensor", "row", "column"]):
        super().__init__()
        self.bits = int(bits)
        self.granularity = granularity

    def forward(self, g: Tensor) -> QTensor:
        return exact_zero_affine(g, self.bits, self.granularity, stochastic=True)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, granularity={self.granularity}, stochastic=True"


class BHQuantizer(Quantizer):
    """Block Householder quantizer over the samples (rows) of the output gradient, stochastic rounding."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = int(bits)

    def forward(self, g: Tensor) -> QTensor:
        return bhq_quantize(g, self.bits)


GRANULARITY: dict[GradKind, dict[Role, str]] = {
    "ptq": {"grad_input": "tensor", "grad_weight": "tensor"},
    "psq": {"grad_input": "row", "grad_weight": "column"},
    "bhq": {"grad_input": "householder", "grad_weight": "column"},
}


def grad_quantizer(kind: GradKind, role: Role, bits: int) -> Quantizer:
    """The quantizer of one gradient role; see the table in the module docstring."""
    granularity = GRANULARITY[kind][role]
    if granularity == "householder":
        return BHQuantizer(bits)
    return AffineGradQuantizer(bits, granularity)  # type: ignore[arg-type]
