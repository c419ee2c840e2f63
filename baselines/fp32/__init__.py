"""fp32: plain full-precision training, the reference row every quantized method is compared to."""

from __future__ import annotations

from fqtbench.config import ConfigError, ResolvedConfig
from fqtbench.harness import FQTModule
from fqtbench.method import Method, PrecisionSpec, RoleSpec


class FP32(Method):
    name = "fp32"
    version = "1"
    description = "full-precision training (reference row; integer accuracy via 8-bit PTQ)"

    def precision(self, cfg: ResolvedConfig) -> PrecisionSpec:
        return PrecisionSpec(RoleSpec(None, None, "none"), RoleSpec(None, None, "none"), RoleSpec(None, None, "none"))

    def bits_tag(self, cfg: ResolvedConfig) -> str:
        return "fp32"

    def validate_config(self, cfg: ResolvedConfig) -> None:
        if cfg.exec != "sim":
            raise ConfigError(f"exec={cfg.exec!r}: fp32 has no integer GEMMs; allowed: sim")

    def build(self, model, cfg: ResolvedConfig, data) -> FQTModule:
        return FQTModule(model, cfg)

    def export(self, module, cfg: ResolvedConfig, data):
        return None  # full precision: the harness records int_top1 null plus a PTQ reference


METHOD = FP32()
