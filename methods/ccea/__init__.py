"""CC-EA: gradient-free, integer-only training of a low-bit network by cooperative coevolution.

A reconstruction of Peng, Liu, Lu, Tang, "Training Quantized Deep Neural Networks via Cooperative
Coevolution" (arXiv 2112.14834 v3, ICSI 2022) from what is public; see README.md beside this file
for what is the paper's and what is ours.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fqtbench import registry
from fqtbench.config import ConfigError, ResolvedConfig, StrictModel
from fqtbench.method import Method, PrecisionSpec, RoleSpec


class CCEAConfig(StrictModel):
    init: Literal["pretrained", "random"] = "pretrained"
    checkpoint: str | None = None  # fp32 weights to start from instead of the cached harness pretraining
    # per tensor, as qat and ebs quantize: the rows CC-EA is compared with differ from it only in how
    # they train (README: per channel starts closer to fp32 and leaves the search less to repair)
    weight_granularity: Literal["tensor", "channel"] = "tensor"
    pop_size: int = Field(8, ge=1)
    elite: int = Field(2, ge=1)
    group_size: int = Field(32, ge=1)
    grouping: Literal["confidence", "random", "layer"] = "confidence"
    radius: int | None = Field(1, ge=1)  # search within +-radius levels of the starting code; null: the whole range
    lr: int = Field(4, ge=1)  # integer learning rate: count added per elite vote
    prior: int = Field(1, ge=1)  # count of every other code in the window at the start
    start_count: int = Field(8, ge=1)  # count of the starting code
    decay_shift: int = Field(3, ge=1, le=16)  # counts of the group decay by 1/2^decay_shift per update
    saturation: int = Field(48, ge=2)  # confidence at which a weight leaves the search
    regroup_every: int = Field(200, ge=1)  # generations between halvings of all counts
    fitness: Literal["accuracy_margin", "margin", "distill"] = "margin"
    margin_clip_shift: int = Field(0, ge=-8, le=8)  # margin clip = (smallest power of two > the start's median top-2 logit gap) * 2^shift
    search_biases: bool = False  # also search each conv's per-channel integer bias (folded batch norm)
    bias_radius: int = Field(4, ge=1)  # bias window: +-bias_radius quarter output codes around the start
    search_scales: bool = False  # also search each requantization's per-channel multiplier (activation scale)
    scale_radius: int = Field(4, ge=1, le=15)  # scale window: +-scale_radius steps of 1/16 of the start multiplier


class CCEA(Method):
    name = "ccea"
    version = "1"
    description = "CC-EA: cooperative-coevolution EDA over integer weight codes; no float op in training"
    uses_gradients = False
    Config = CCEAConfig

    def precision(self, cfg: ResolvedConfig) -> PrecisionSpec:
        b = cfg.bits
        return PrecisionSpec(
            fwd=RoleSpec(b.a, b.w, "none", f"a:tensor w:{cfg.params.weight_granularity}"),
            grad_input=None,
            grad_weight=None,
            note="gradient-free: population fitness evaluations are integer forward passes on the shared backend",
        )

    def bits_tag(self, cfg: ResolvedConfig) -> str:
        """'w4a4', plus the ablations that change what a row means: '-random' / '-layer' grouping,
        '-init-random', '-wchannel' (per-channel weight scales of the PTQ start) -- so the leaderboard
        never averages an ablation into the default row."""
        p = cfg.params
        tag = super().bits_tag(cfg)
        if p.grouping != "confidence":
            tag += f"-{p.grouping}"
        if p.init != "pretrained":
            tag += f"-init-{p.init}"  # random codes: no weight scales to choose, so no granularity tag
        elif p.weight_granularity != "tensor":
            tag += f"-w{p.weight_granularity}"
        return tag

    def validate_config(self, cfg: ResolvedConfig) -> None:
        p = cfg.params
        if p.elite > p.pop_size + 1:
            raise ConfigError(f"ccea.elite={p.elite}: must be at most pop_size + 1 = {p.pop_size + 1}")
        for key in ("w", "a"):
            v = getattr(cfg.bits, key)
            if not 2 <= v <= 8:
                raise ConfigError(f"bits.{key}={v}: ccea searches integer codes of 2..8 bits")
        if cfg.bits.g_input is not None or cfg.bits.g_weight is not None:
            raise ConfigError("bits.g_input/bits.g_weight: ccea uses no gradients; remove them")
        if p.fitness == "distill" and p.init != "pretrained":
            raise ConfigError("ccea.fitness='distill' needs init: pretrained (the teacher is the pretrained network)")
        if cfg.exec != "sim":
            raise ConfigError(f"exec={cfg.exec!r}: ccea always runs on the integer backend; leave exec at its default")

    def build(self, model, cfg: ResolvedConfig, data):
        from .module import CCEAModule
        from .start import start_model

        backend = registry.backends.get(cfg.engine.backend).with_overflow(cfg.engine.overflow)
        start = start_model(model, cfg, data, backend)
        return CCEAModule(cfg, start, backend)

    def export(self, module, cfg: ResolvedConfig, data):
        return module.int_model.clone()


METHOD = CCEA()
