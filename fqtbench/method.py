"""The method plugin contract.

A method is an object registered in the ``fqtbench.methods`` entry-point group with:

- ``name``, ``version`` (bump it whenever behaviour changes: records carry ``name@version``),
  ``description`` (one line), ``uses_gradients``;
- ``Config``: a pydantic model of its own options (the ``<name>:`` config section) and optionally
  ``Bits``, a subclass of :class:`~fqtbench.config.BitsConfig` when it needs more bit settings;
- ``defaults``: config overrides applied after the track (``configs/methods/<name>.yaml`` too);
- ``precision(cfg)``: the bits, rounding and granularity of each GEMM role;
- ``build(model, cfg, data)``: a LightningModule that trains the model;
- ``export(module, cfg, data)``: the trained network as an integer ``IntModel`` (or None for
  full-precision rows), which the harness evaluates on the shared integer backend.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from pydantic import BaseModel

from .config import BitsConfig, EmptyConfig, ResolvedConfig


@dataclass(frozen=True)
class RoleSpec:
    """Operand precisions of one GEMM role. `None` bits: full precision (32)."""

    a_bits: int | None
    b_bits: int | None
    rounding: str = "nearest"  # nearest | stochastic | none
    granularity: str = "tensor"


@dataclass(frozen=True)
class PrecisionSpec:
    """fwd: activation x weight; grad_input: output-gradient x weight; grad_weight: output-gradient x activation."""

    fwd: RoleSpec
    grad_input: RoleSpec | None
    grad_weight: RoleSpec | None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Method:
    """Base class with sensible defaults; subclass and override `build` (and usually `precision`)."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    uses_gradients: ClassVar[bool] = True
    Config: ClassVar[type[BaseModel]] = EmptyConfig
    Bits: ClassVar[type[BitsConfig]] = BitsConfig
    defaults: ClassVar[dict[str, Any]] = {}

    def precision(self, cfg: ResolvedConfig) -> PrecisionSpec:
        b = cfg.bits
        g = "stochastic" if b.g_input or b.g_weight else "none"
        return PrecisionSpec(
            fwd=RoleSpec(b.a, b.w),
            grad_input=RoleSpec(b.g_input, b.w, g),
            grad_weight=RoleSpec(b.g_weight, b.a, g),
        )

    def bits_tag(self, cfg: ResolvedConfig) -> str:
        """Short precision label used for grouping runs on leaderboards, e.g. 'w4a4' or 'w8a8g4'."""
        b = cfg.bits
        tag = f"w{b.w}a{b.a}"
        if b.g_input is not None or b.g_weight is not None:
            gi, gw = b.g_input, b.g_weight
            tag += f"g{gi}" if gi == gw else f"g{gi or 32}-{gw or 32}"
        return tag

    def validate_config(self, cfg: ResolvedConfig) -> None:
        """Cross-field checks; raise ConfigError with one line."""

    def build(self, model, cfg: ResolvedConfig, data):  # -> pl.LightningModule
        raise NotImplementedError(f"method {self.name!r} ({type(self).__name__}) does not define build(model, cfg, data)")

    def export(self, module, cfg: ResolvedConfig, data):  # -> IntModel | None
        """Default: calibrate activation ranges and export the module's network with the shared engine."""
        from .engine.export import export_module

        return export_module(module, cfg, data)
