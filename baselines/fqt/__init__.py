"""fqt: fully-quantized training with unbiased gradient quantizers (PTQ, PSQ, BHQ).

Chen, Gai, Yao, Mahoney, Gonzalez, "A Statistical Framework for Low-bitwidth Training of Deep
Neural Networks" (NeurIPS 2020; official code: StatQuant). Forward: weights per tensor, affine with
an exact zero; activations per tensor; nearest rounding; straight-through. Backward: the output
gradient is quantized twice, by independent stochastic quantizers -- one for the grad-input GEMM
(``bits.g_input``) and one for the grad-weight GEMM (``bits.g_weight``) -- so that both GEMMs get an
unbiased estimate of the exact gradient ("gradient bifurcation"). ``fqt.quantizer`` picks the
gradient quantizer; see ``quantizers.py`` and README.md.
"""

from __future__ import annotations

from typing import Literal

from fqtbench import registry
from fqtbench.config import ConfigError, ResolvedConfig, StrictModel
from fqtbench.engine.export import check_exportable_bits
from fqtbench.harness import FQTModule
from fqtbench.method import Method, PrecisionSpec, RoleSpec
from fqtbench.nn import LayerQuant, quant_layers
from fqtbench.quant import ActQuantizer
from fqtbench.quant.attach import layer_bits

from .quantizers import GRANULARITY, AffineWeightQuantizer, grad_quantizer

MIN_BITS, MAX_BITS = 2, 15  # exact zero needs two codes; centred codes must fit int16 on the int path


class FQTConfig(StrictModel):
    quantizer: Literal["ptq", "psq", "bhq"] = "bhq"


class FQT(Method):
    name = "fqt"
    version = "1"
    description = "unbiased stochastic gradient quantizers (PTQ / PSQ / block Householder), gradient bifurcation"
    Config = FQTConfig

    def precision(self, cfg: ResolvedConfig) -> PrecisionSpec:
        b, kind = cfg.bits, cfg.params.quantizer
        gran = GRANULARITY[kind]
        return PrecisionSpec(
            fwd=RoleSpec(b.a, b.w, "nearest", "a:tensor w:tensor(affine, exact zero)"),
            grad_input=RoleSpec(b.g_input, b.w, "stochastic", f"g:{'sample' if gran['grad_input'] == 'row' else gran['grad_input']} w:tensor"),
            grad_weight=RoleSpec(b.g_weight, b.a, "stochastic", f"g:{'out-channel' if gran['grad_weight'] == 'column' else 'tensor'} a:tensor"),
            note=f"{kind}" + (f"; first/last layers at {b.first_last} bits" if b.first_last else ""),
        )

    def bits_tag(self, cfg: ResolvedConfig) -> str:
        return f"{super().bits_tag(cfg)}-{cfg.params.quantizer}"

    def validate_config(self, cfg: ResolvedConfig) -> None:
        b = cfg.bits
        for key in ("w", "g_input", "g_weight"):
            v = getattr(b, key)
            if v is None or not MIN_BITS <= v <= MAX_BITS:
                raise ConfigError(f"bits.{key}={v!r}: fqt needs {MIN_BITS}..{MAX_BITS} bits here (gradients are always quantized)")
        if b.first_last is not None and b.first_last < MIN_BITS:
            raise ConfigError(f"bits.first_last={b.first_last!r}: fqt's exact-zero weights need at least {MIN_BITS} bits")
        check_exportable_bits(b, "fqt")

    def build(self, model, cfg: ResolvedConfig, data) -> FQTModule:
        b, kind = cfg.bits, cfg.params.quantizer
        backend = registry.backends.get(cfg.engine.backend).with_overflow(cfg.engine.overflow) if cfg.exec == "int" else None
        for _, layer in quant_layers(model):
            wb, ab = layer_bits(layer, b.w, b.a, b.first_last)
            layer.set_quant(
                LayerQuant(
                    weight=AffineWeightQuantizer(wb),
                    act=ActQuantizer(ab, signed=layer.input_signed),
                    grad_input=grad_quantizer(kind, "grad_input", b.g_input),
                    grad_weight=grad_quantizer(kind, "grad_weight", b.g_weight),
                ),
                cfg.exec,
                backend,
            )
        return FQTModule(model, cfg)


METHOD = FQT()
