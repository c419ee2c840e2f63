"""qat: plain straight-through quantization-aware training, the simplest quantized reference row.

Symmetric signed weights (per tensor by default) and unsigned per-tensor activations (signed for
the network input), fake-quantized in the forward pass with a straight-through estimator;
gradients stay full precision. Bits per role and the first/last-layer policy come from `bits`.
"""

from __future__ import annotations

from typing import Literal

from fqtbench import registry
from fqtbench.config import ConfigError, ResolvedConfig, StrictModel
from fqtbench.engine.export import check_exportable_bits
from fqtbench.harness import FQTModule
from fqtbench.method import Method, PrecisionSpec, RoleSpec
from fqtbench.quant.attach import attach_standard


class QATConfig(StrictModel):
    weight_granularity: Literal["tensor", "channel"] = "tensor"


class QAT(Method):
    name = "qat"
    version = "1"
    description = "straight-through QAT: symmetric weights, unsigned activations, fp32 gradients"
    Config = QATConfig

    def precision(self, cfg: ResolvedConfig) -> PrecisionSpec:
        b = cfg.bits
        g = cfg.params.weight_granularity
        return PrecisionSpec(
            fwd=RoleSpec(b.a, b.w, "nearest", f"a:tensor w:{g}"),
            grad_input=RoleSpec(None, b.w, "none"),
            grad_weight=RoleSpec(None, b.a, "none"),
            note=f"first/last layers at {b.first_last} bits" if b.first_last else "",
        )

    def validate_config(self, cfg: ResolvedConfig) -> None:
        if cfg.bits.g_input is not None or cfg.bits.g_weight is not None:
            raise ConfigError("bits.g_input/bits.g_weight: qat keeps full-precision gradients; use --method fqt to quantize them")
        for key in ("w", "first_last"):
            v = getattr(cfg.bits, key)
            if v is not None and v < 2:
                raise ConfigError(f"bits.{key}={v}: symmetric weight codes need at least 2 bits")
        check_exportable_bits(cfg.bits, "qat")

    def build(self, model, cfg: ResolvedConfig, data) -> FQTModule:
        backend = registry.backends.get(cfg.engine.backend).with_overflow(cfg.engine.overflow) if cfg.exec == "int" else None
        attach_standard(
            model,
            w_bits=cfg.bits.w,
            a_bits=cfg.bits.a,
            first_last_bits=cfg.bits.first_last,
            weight_granularity=cfg.params.weight_granularity,
            exec_mode=cfg.exec,
            backend=backend,
        )
        return FQTModule(model, cfg)


METHOD = QAT()
