"""bsq: bit-level sparsity quantization (Yang, Duan, Chen, Li, ICLR 2021), a mixed-precision baseline.

Pipeline: the track's cached fp32 model -> every layer as `bits.w` - 1 (7) trainable magnitude
bit-planes plus a scale (`bits.w` counts the sign, as for every method) -> BSQ training (cross-entropy + alpha x bit-level group Lasso, periodic
re-quantization that drops bits) -> fine-tuning of the fixed mixed-precision scheme -> integer
export with each layer's own bit-width. Activations are `bits.a`-bit (4) per-tensor codes;
gradients stay full precision. See baselines/bsq/README.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fqtbench.config import ConfigError, ResolvedConfig, StrictModel
from fqtbench.harness.pretrain import pretrained_fp32
from fqtbench.method import Method, PrecisionSpec, RoleSpec

from fqtbench.engine.export import MAX_ENGINE_BITS

from .bits import BitWeight
from .module import BSQModule, attach_bsq, bit_summary, faithful_clamp_params, group_lasso


class BSQConfig(StrictModel):
    mode: Literal["clean", "faithful"] = "clean"  # faithful: the official post-step clamp by name, shortcut included
    alpha: float = Field(0.07, ge=0.0)  # weight of the group Lasso (the official --decay)
    requant_every: int = Field(5, ge=1)  # epochs between re-quantizations (--Prun_Int)
    threshold: float = Field(0.0, ge=0.0, lt=1.0)  # an LSB plane with at most this share of nonzero bits is dropped (--thre)
    epochs: int | None = Field(None, ge=1)  # BSQ epochs; None: trainer.max_epochs - finetune_epochs
    finetune_epochs: int = Field(10, ge=0)
    finetune_lr_scale: float = Field(1.0, gt=0.0, le=1.0)  # fine-tuning lr = optim.lr x this (official: 0.01 / 0.1)


def bsq_epochs(cfg: ResolvedConfig) -> int:
    p = cfg.params
    return p.epochs if p.epochs is not None else cfg.trainer.max_epochs - p.finetune_epochs


class BSQ(Method):
    name = "bsq"
    version = "2"  # 2: bits.w counts the sign (7 magnitude bits at the default 8); records count it too
    description = "bit-level sparsity: weights as trainable bit-planes + group Lasso per plane -> mixed precision"
    Config = BSQConfig

    def precision(self, cfg: ResolvedConfig) -> PrecisionSpec:
        b = cfg.bits
        return PrecisionSpec(
            fwd=RoleSpec(b.a, b.w, "nearest", "a:tensor w:tensor sign-magnitude"),
            grad_input=RoleSpec(None, b.w, "none"),
            grad_weight=RoleSpec(None, b.a, "none"),
            note=f"weight bits learned per layer, starting at {b.w} (sign included: {b.w - 1} magnitude bits); see extra.bsq",
        )

    def bits_tag(self, cfg: ResolvedConfig) -> str:
        return f"bsq-a{cfg.bits.a}-alpha{cfg.params.alpha:g}"

    def validate_config(self, cfg: ResolvedConfig) -> None:
        b, p = cfg.bits, cfg.params
        if cfg.exec != "sim":
            raise ConfigError(f"exec={cfg.exec!r}: bsq trains float bit variables; allowed: sim")
        if b.g_input is not None or b.g_weight is not None:
            raise ConfigError("bits.g_input/bits.g_weight: bsq keeps full-precision gradients; leave them unset")
        if b.first_last is not None:
            raise ConfigError(f"bits.first_last={b.first_last}: bsq learns every layer's weight bits; leave it unset")
        if not 2 <= b.w <= MAX_ENGINE_BITS:
            raise ConfigError(f"bits.w={b.w}: bsq's starting weight bits, sign included (bits.w - 1 magnitude "
                              f"bit-planes); allowed: 2..{MAX_ENGINE_BITS}")
        if b.a > MAX_ENGINE_BITS:
            raise ConfigError(f"bits.a={b.a}: activation bits on the integer engine; allowed: 1..{MAX_ENGINE_BITS}")
        total = cfg.trainer.max_epochs
        if p.epochs is not None and p.epochs + p.finetune_epochs != total:
            raise ConfigError(
                f"bsq.epochs={p.epochs}: bsq.epochs + bsq.finetune_epochs ({p.finetune_epochs}) must equal "
                f"trainer.max_epochs ({total}); or leave bsq.epochs unset"
            )
        if bsq_epochs(cfg) < 1:
            raise ConfigError(
                f"bsq.finetune_epochs={p.finetune_epochs}: leaves no BSQ epoch in trainer.max_epochs={total}; allowed: 0..{total - 1}"
            )

    def build(self, model, cfg: ResolvedConfig, data) -> BSQModule:
        pretrained = pretrained_fp32(cfg, data, model)  # before the conversion: it reads the fp32 weights
        return BSQModule(model, cfg, bsq_epochs(cfg), pretrained)


METHOD = BSQ()

__all__ = ["BSQ", "BSQConfig", "BSQModule", "BitWeight", "METHOD", "attach_bsq", "bit_summary", "faithful_clamp_params", "group_lasso"]
