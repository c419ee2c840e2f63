"""ebs: efficient bitwidth search (Li et al., arXiv 2003.07577), built from its abstract.

One full-precision meta weight per layer is shared by every candidate bit-width; per layer, learned
strengths over the weight and activation candidates mix the quantized weights and inputs, and a
penalty on the expected BitOPs pulls the search toward a target. After the search each layer takes
its argmax bits, the mixed-precision network retrains from the meta weights and exports to the
integer engine, where the ``bitserial`` backend runs it by binary decomposition. Every detail the
abstract leaves open is our choice; see README.md in this folder.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from fqtbench.config import ConfigError, ResolvedConfig, StrictModel
from fqtbench.engine.export import MAX_ENGINE_BITS
from fqtbench.method import Method, PrecisionSpec, RoleSpec
from fqtbench.nn import quant_layers
from fqtbench.quant.attach import layer_bits

from .module import EBSModule
from .search import SearchSpace, macs_per_sample

CandidateBits = Annotated[int, Field(ge=2, le=MAX_ENGINE_BITS)]
DEFAULT_CANDIDATES = [2, 3, 4, 5, 6, 8]


class EBSConfig(StrictModel):
    w_candidates: list[CandidateBits] = Field(default_factory=lambda: list(DEFAULT_CANDIDATES), min_length=1)
    a_candidates: list[CandidateBits] = Field(default_factory=lambda: list(DEFAULT_CANDIDATES), min_length=1)
    weight_granularity: Literal["tensor", "channel"] = "tensor"
    search_fraction: float = Field(0.5, gt=0.0, le=1.0)  # share of trainer.max_epochs spent searching
    target_ratio: float = Field(1.0, gt=0.0)  # target = ratio x BitOPs of the uniform bits.w/bits.a model
    target_bitops: int | None = Field(None, gt=0)  # absolute target per sample; replaces target_ratio
    cost_weight: float = Field(1.0, ge=0.0)
    strength_lr: float = Field(0.05, gt=0.0)
    search_optimizer: Literal["single-level", "bilevel", "mixed-level"] = "single-level"
    mixed_level_lambda: float = Field(1.0, ge=0.0)
    gumbel: bool = False  # Gumbel-softmax mixing in training forwards (README: better on digits, collapses on CIFAR)
    logit_scale: bool = False  # a learnable logit scale during the search, trained with the strengths (README)
    temperature: float = Field(1.0, gt=0.0)  # softmax temperature at the start of the search ...
    final_temperature: float = Field(0.1, gt=0.0)  # ... annealed geometrically to this at its end
    grad_clip: float | None = Field(5.0, gt=0.0)  # max gradient norm of the network's parameters

    @field_validator("w_candidates", "a_candidates")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("candidate bit-widths must be distinct")
        return v


class EBS(Method):
    name = "ebs"
    version = "1"
    description = "efficient bitwidth search: shared meta weights, per-candidate strengths, BitOPs target, retrain"
    Config = EBSConfig

    def precision(self, cfg: ResolvedConfig) -> PrecisionSpec:
        p = cfg.params
        fl = cfg.bits.first_last
        return PrecisionSpec(
            fwd=RoleSpec(max(p.a_candidates), max(p.w_candidates), "nearest",
                         f"mixed per layer: w in {sorted(p.w_candidates)}, a in {sorted(p.a_candidates)}; "
                         f"a:tensor w:{p.weight_granularity}"),
            grad_input=RoleSpec(None, max(p.w_candidates), "none"),
            grad_weight=RoleSpec(None, max(p.a_candidates), "none"),
            note=f"mixed precision searched per layer toward a BitOPs target ({self.bits_tag(cfg)}); "
                 f"the bits shown are the largest candidates" + (f"; first/last layers fixed at {fl} bits" if fl else ""),
        )

    def bits_tag(self, cfg: ResolvedConfig) -> str:
        p, b = cfg.params, cfg.bits
        if p.target_bitops is not None:
            return f"ebs-b{p.target_bitops}"
        reference = "" if (b.w, b.a) == (4, 4) else f"-w{b.w}a{b.a}"
        return f"ebs{reference}-t{float(p.target_ratio)}"

    def validate_config(self, cfg: ResolvedConfig) -> None:
        b, p = cfg.bits, cfg.params
        if b.g_input is not None or b.g_weight is not None:
            raise ConfigError("bits.g_input/bits.g_weight: ebs keeps full-precision gradients; leave them null")
        if cfg.exec != "sim":
            raise ConfigError(f"exec={cfg.exec!r}: ebs keeps full-precision gradients, which integer GEMMs cannot run; allowed: sim")
        if b.first_last is not None and not 2 <= b.first_last <= MAX_ENGINE_BITS:
            raise ConfigError(f"bits.first_last={b.first_last}: ebs exports to the integer engine; allowed: null or 2..{MAX_ENGINE_BITS}")
        if p.search_optimizer != "single-level" and cfg.data.val_fraction <= 0:
            raise ConfigError(f"ebs.search_optimizer={p.search_optimizer!r} trains the strengths on a held-out split; "
                              f"set data.val_fraction > 0 or use single-level")

    def build(self, model, cfg: ResolvedConfig, data) -> EBSModule:
        p, b = cfg.params, cfg.bits
        info = data.info
        macs = macs_per_sample(model, (info.in_channels, *info.image_size))
        space = SearchSpace(model, macs, p.w_candidates, p.a_candidates, b.first_last, p.weight_granularity, p.logit_scale)
        reference = uniform_bitops(model, macs, b.w, b.a, b.first_last)
        target = p.target_bitops if p.target_bitops is not None else p.target_ratio * reference
        lowest, _ = space.bitops_range()
        if target < lowest:
            key, value = ("ebs.target_bitops", p.target_bitops) if p.target_bitops is not None else ("ebs.target_ratio", p.target_ratio)
            raise ConfigError(f"{key}={value}: the target {target:.0f} BitOPs/sample is below the smallest reachable "
                              f"{lowest} (every searched layer at its smallest candidates); raise it")
        val = None
        if p.search_optimizer != "single-level":
            split = getattr(data, "val_set", None)
            if split is None:
                raise ConfigError(f"ebs.search_optimizer={p.search_optimizer!r} needs a validation split; set data.val_fraction > 0")
            val = (split.x, split.y)
        return EBSModule(model, cfg, space, target, reference, val)


def uniform_bitops(model, macs: dict[str, int], w_bits: int, a_bits: int, first_last: int | None) -> int:
    """BitOPs per sample of the same network quantized uniformly (the first/last policy applied)."""
    total = 0
    for name, layer in quant_layers(model):
        wb, ab = layer_bits(layer, w_bits, a_bits, first_last)
        total += macs[name] * wb * ab
    return total


METHOD = EBS()
