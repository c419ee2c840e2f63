"""cpt: cyclic precision training (Fu et al., ICLR 2021), re-derived from the paper's public code.

Forward (weight and activation) bits follow a half-cosine ramp from `bits.min` up to `bits.max`,
restarting `cpt.num_cycles` times, set every iteration; the output gradient ("error") is quantized at
a fixed `bits.grad` with stochastic rounding. `bits.min: auto` runs a precision range test first;
`bits.min == bits.max` is the paper's static baseline. Evaluation and export run at `cpt.eval_bits`
(default `bits.max`). See README.md next to this file.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from fqtbench import registry
from fqtbench.config import BitsConfig, ConfigError, ResolvedConfig, StrictModel
from fqtbench.engine.export import MAX_ENGINE_BITS
from fqtbench.method import Method, PrecisionSpec, RoleSpec

from .module import CPTModule
from .quant import attach_cpt

Bit = Annotated[int, Field(ge=1, le=32)]


class CPTBits(BitsConfig):
    """Forward bits cycle between `min` and `max`; errors use `grad` (null: full precision).

    `w`, `a`, `g_input` and `g_weight` are not used by cpt (one error precision feeds both backward
    GEMMs); they are left out of saved configs, and setting them is refused.
    """

    min: int | Literal["auto"] = 3
    max: Bit = 8
    grad: Annotated[int, Field(ge=2, le=32)] | None = 8  # an unbiased exact-zero error code needs 2 bits
    w: int = Field(8, ge=1, le=32, exclude=True)
    a: int = Field(8, ge=1, le=32, exclude=True)
    g_input: int | None = Field(None, ge=1, le=32, exclude=True)
    g_weight: int | None = Field(None, ge=1, le=32, exclude=True)

    @field_validator("min", mode="before")
    @classmethod
    def _int_or_auto(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 32):
            return v
        raise ConfigError(f"bits.min={v!r}: must be an integer from 1 to 32 or 'auto'")


class PRTConfig(StrictModel):
    """Precision range test for `bits.min: auto` (see prt.py)."""

    start: Bit = 2  # lowest precision probed
    steps: int | None = Field(None, ge=2)  # iterations per probe; null: 2% of training, at least 20
    ratio: float = Field(0.8, gt=0.0, le=1.0)  # pass: gain >= ratio x the gain at bits.max


class CPTConfig(StrictModel):
    num_cycles: int = Field(32, ge=1)
    eval_bits: int | None = Field(None, ge=1, le=MAX_ENGINE_BITS)  # null: bits.max
    weight_granularity: Literal["channel", "tensor"] = "channel"
    prt: PRTConfig = Field(default_factory=PRTConfig)


class CPT(Method):
    name = "cpt"
    version = "2"  # 2: unbiased error quantizer (version 1 clipped the extreme error toward zero)
    description = "cyclic precision training: forward bits on a cosine cycle, 8-bit stochastic errors"
    Config = CPTConfig
    Bits = CPTBits

    def precision(self, cfg: ResolvedConfig) -> PrecisionSpec:
        b, p = cfg.bits, cfg.params
        e = p.eval_bits or b.max
        g = "stochastic" if b.grad is not None else "none"
        if b.min == b.max:
            note = f"static {b.max} bits"
        else:
            lo = "bits.min chosen by the precision range test" if b.min == "auto" else str(b.min)
            note = f"forward bits cycle {lo}..{b.max} ({p.num_cycles} half-cosine cycles), evaluated at {e}"
        fixed = f"first/last layers at {b.first_last}" if b.first_last else f"last layer at {e}"
        return PrecisionSpec(
            fwd=RoleSpec(e, e, "nearest", f"a:tensor w:{p.weight_granularity} (affine)"),
            grad_input=RoleSpec(b.grad, e, g, "tensor"),
            grad_weight=RoleSpec(b.grad, e, g, "tensor"),
            note=f"{note}; {fixed}; one error draw feeds both backward GEMMs",
        )

    def bits_tag(self, cfg: ResolvedConfig) -> str:
        """'cpt3-8g8' for a cycle (e.g. 'cptauto-8g8'), 'w8a8g8' for a static row; 'e6' marks eval_bits."""
        b, e = cfg.bits, cfg.params.eval_bits
        tag = f"w{b.max}a{b.max}" if b.min == b.max else f"cpt{b.min}-{b.max}"
        tag += f"g{b.grad}" if b.grad is not None else ""
        return tag + (f"e{e}" if e is not None and e != b.max else "")

    def validate_config(self, cfg: ResolvedConfig) -> None:
        b, p = cfg.bits, cfg.params
        for key, value, default in (("w", b.w, 8), ("a", b.a, 8), ("g_input", b.g_input, None), ("g_weight", b.g_weight, None)):
            if value != default:
                raise ConfigError(f"bits.{key}={value!r}: cpt does not use it; set bits.min/bits.max (forward) and bits.grad (errors)")
        if b.min != "auto" and b.min > b.max:
            raise ConfigError(f"bits.min={b.min}: must be at most bits.max={b.max} (or 'auto')")
        if b.min == "auto" and p.prt.start >= b.max:
            raise ConfigError(f"cpt.prt.start={p.prt.start}: must be below bits.max={b.max} for bits.min=auto")
        if p.eval_bits is None and b.max > MAX_ENGINE_BITS:
            raise ConfigError(f"bits.max={b.max}: the integer engine evaluates at most {MAX_ENGINE_BITS} bits; "
                              f"set cpt.eval_bits to {MAX_ENGINE_BITS} or less")
        if b.first_last is not None and b.first_last > MAX_ENGINE_BITS:
            raise ConfigError(f"bits.first_last={b.first_last}: the integer engine supports at most {MAX_ENGINE_BITS} bits")
        if cfg.exec == "int":
            if b.grad is None:
                raise ConfigError("bits.grad=None: exec=int needs quantized errors; set bits.grad or use exec=sim")
            if p.weight_granularity == "channel":
                raise ConfigError("cpt.weight_granularity='channel': exec=int needs per-tensor weight scales for the "
                                  "grad-input GEMM; set cpt.weight_granularity=tensor or use exec=sim")

    def build(self, model, cfg: ResolvedConfig, data) -> CPTModule:
        backend = registry.backends.get(cfg.engine.backend).with_overflow(cfg.engine.overflow) if cfg.exec == "int" else None
        attach_cpt(
            model,
            bits_max=cfg.bits.max,
            last_bits=cfg.params.eval_bits or cfg.bits.max,
            grad_bits=cfg.bits.grad,
            first_last=cfg.bits.first_last,
            weight_granularity=cfg.params.weight_granularity,
            exec_mode=cfg.exec,
            backend=backend,
        )
        return CPTModule(model, cfg, data)


METHOD = CPT()
