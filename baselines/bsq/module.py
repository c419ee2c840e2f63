"""BSQ training inside one Lightning run: bit-level group Lasso with periodic re-quantization, then
fine-tuning of the fixed mixed-precision scheme.

Epochs ``0 .. E-1`` (E = ``bsq.epochs``) train the bit-planes under cross-entropy plus the group
Lasso; every ``requant_every`` epochs, and once more when the phase ends, each layer is re-quantized
(:meth:`BitWeight.requantize`) and the optimizer is re-created, so momentum is lost as in the
official code. The remaining ``bsq.finetune_epochs`` train the float form of every layer with its
precision fixed and no regulariser. The learning rate follows ``optim`` over the BSQ phase, and
``optim.schedule`` again, without warm-up and scaled by ``finetune_lr_scale``, over fine-tuning;
it is a function of the global step, so re-creating the optimizer does not restart it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fqtbench.config import ResolvedConfig
from fqtbench.harness import FQTModule
from fqtbench.harness.module import lr_multiplier
from fqtbench.nn import BasicBlock, LayerQuant, quant_layers
from fqtbench.quant.core import ActQuantizer, WeightQuantizer

from .bits import BitWeight

SHORTCUT_W_BITS = 8  # the official 1x1 shortcut is full precision; the integer engine needs codes
OFFICIAL_NAMES = (("down_conv", "downsample.0"), ("down_bn", "downsample.1"))


def attach_bsq(model: nn.Module, magnitude_bits: int, a_bits: int) -> tuple[dict[str, BitWeight], dict[str, int]]:
    """Give every layer a BitWeight of `magnitude_bits` (its weight_fn and weight quantizer) and an activation
    quantizer; 1x1 shortcut convs keep fixed 8-bit weights and share their block's input quantizer.

    Returns ({layer name: BitWeight}, {shortcut layer name: its parameter count}).
    """
    shortcut_of = {id(m.down_conv): m for m in model.modules() if isinstance(m, BasicBlock) and m.shortcut_kind == "B"}
    bit_layers: dict[str, BitWeight] = {}
    shortcuts: dict[str, int] = {}
    for name, layer in quant_layers(model):
        if id(layer) in shortcut_of:  # reads the very codes conv1 reads, so it must use conv1's quantizer
            layer.set_quant(LayerQuant(weight=WeightQuantizer(SHORTCUT_W_BITS), act=shortcut_of[id(layer)].conv1.quant.act))
            shortcuts[name] = layer.weight.numel()
            continue
        bw = BitWeight(layer.weight, magnitude_bits)
        layer.weight.requires_grad_(False)  # kept as the fp32 starting point; the bit-planes are trained
        layer.set_quant(LayerQuant(weight=bw, act=ActQuantizer(a_bits, signed=layer.input_signed)))
        layer.weight_fn = bw.effective
        bit_layers[name] = bw
    return bit_layers, shortcuts


def group_lasso(layers: list[BitWeight], total_params: int) -> Tensor:
    """sum_l (P_l * n_l / P) * sum_b ||plane_{l,b}||_2: the bit-level group Lasso, each layer weighted
    by its memory (parameters x bits) over the total parameter count, as in the official code."""
    terms = [bw.numel() * bw.bits * bw.plane_norms().sum() for bw in layers if bw.bits and bw.form == "bits"]
    return torch.stack(terms).sum() / total_params if terms else torch.zeros(())


def faithful_clamp_params(model: nn.Module) -> list[nn.Parameter]:
    """Float parameters the official post-step clamp also hits.

    It clamps every parameter whose name contains neither "scale" nor "bn"; there the 1x1 shortcut
    is `downsample.0` (conv) and `downsample.1` (its batch norm), so our names are translated first.
    Bit variables are clamped in both modes; layer biases are bit-planes there (sign kept by the p/n
    split) but floats here, so they are left alone.
    """
    biases = {id(layer.bias) for _, layer in quant_layers(model) if layer.bias is not None}
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in biases or ".quant." in name:
            continue
        for ours, theirs in OFFICIAL_NAMES:
            name = name.replace(ours, theirs)
        if "scale" not in name and "bn" not in name:
            out.append(p)
    return out


def bit_summary(layers: dict[str, BitWeight], shortcuts: dict[str, int]) -> dict[str, Any]:
    """Per-layer bits, average weight bits and compression 32 x params / sum(params x bits), with and
    without the shortcut layers (the paper excludes them). Magnitude bits: the sign is not counted."""
    params = sum(bw.numel() for bw in layers.values())
    bits = sum(bw.numel() * bw.bits for bw in layers.values())
    params_sc = params + sum(shortcuts.values())
    bits_sc = bits + SHORTCUT_W_BITS * sum(shortcuts.values())
    return {
        "layer_bits": {name: bw.bits for name, bw in layers.items()},
        "shortcut_layers": {name: SHORTCUT_W_BITS for name in shortcuts},
        "avg_weight_bits": round(bits / params, 4),
        "compression": round(32 * params / bits, 4) if bits else None,
        "avg_weight_bits_with_shortcut": round(bits_sc / params_sc, 4),
        "compression_with_shortcut": round(32 * params_sc / bits_sc, 4) if bits_sc else None,
    }


class BSQModule(FQTModule):
    """FQTModule plus the BSQ phases; see the module docstring."""

    def __init__(self, model: nn.Module, cfg: ResolvedConfig, bsq_epochs: int, pretrained: dict[str, Any] | None = None):
        super().__init__(model, cfg)
        self.bit_layers, self.shortcuts = attach_bsq(model, cfg.bits.w - 1, cfg.bits.a)  # bits.w counts the sign
        self.total_params = sum(bw.numel() for bw in self.bit_layers.values())
        self.bsq_epochs = bsq_epochs
        self.pretrained = pretrained or {}
        self.pretraining_cost = self.pretrained.get("training_cost")
        self.history: list[dict[str, Any]] = [{"epoch": 0, "bits": self._bits()}]
        self._steps_per_epoch = 1

    @property
    def phase(self) -> str:
        return "finetune" if any(bw.form == "float" for bw in self.bit_layers.values()) else "bsq"

    def _bits(self) -> dict[str, int]:
        return {name: bw.bits for name, bw in self.bit_layers.items()}

    # -- objective ---------------------------------------------------------------------------
    def extra_loss(self) -> Tensor | None:
        alpha = self.cfg.params.alpha
        if self.phase != "bsq" or alpha == 0:
            return None
        return alpha * group_lasso(list(self.bit_layers.values()), self.total_params)

    # -- phases and re-quantization ----------------------------------------------------------
    def requantize(self, epoch: int) -> None:
        for bw in self.bit_layers.values():
            bw.requantize(self.cfg.params.threshold)
        self.history.append({"epoch": epoch, "bits": self._bits()})

    def on_train_epoch_start(self) -> None:
        e = self.current_epoch
        if self.phase != "bsq" or not (e >= self.bsq_epochs or (e > 0 and e % self.cfg.params.requant_every == 0)):
            return
        self.requantize(e)
        if e >= self.bsq_epochs:
            for bw in self.bit_layers.values():
                bw.to_float()
        self.trainer.strategy.setup_optimizers(self.trainer)  # new parameters; momentum lost, as in the paper
        strategy = self.trainer.strategy
        if self.trainer.world_size > 1 and hasattr(strategy, "configure_ddp"):
            strategy.model = self  # DDP wraps the new bit-planes (its gradient buckets are built once per wrap)
            strategy.configure_ddp()

    def on_train_end(self) -> None:
        if self.phase == "bsq":  # stopped before fine-tuning (finetune_epochs 0, max_steps, max_time)
            self.requantize(self.current_epoch)

    @torch.no_grad()
    def clamp_variables(self) -> None:
        """After each step: bit variables to [0, 2] (faithful: the official by-name clamp, shortcut
        included); in fine-tuning the float weights to [-1, 1]."""
        if self.phase == "finetune":
            targets, lo, hi = [v for bw in self.bit_layers.values() for v in bw.bit_variables()], -1.0, 1.0
        else:
            targets, lo, hi = [v for bw in self.bit_layers.values() for v in bw.bit_variables()], 0.0, 2.0
            if self.cfg.params.mode == "faithful":
                targets += faithful_clamp_params(self.model)
        for p in targets:
            p.clamp_(lo, hi)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.clamp_variables()

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.cfg.optim
        groups = self.parameter_groups()
        if o.name == "sgd":
            opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
        else:
            opt = (torch.optim.Adam if o.name == "adam" else torch.optim.AdamW)(groups, lr=o.lr)
        self._steps_per_epoch = max(1, int(self.trainer.estimated_stepping_batches) // max(1, self.trainer.max_epochs or 1))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: self.lr_factor(self.trainer.global_step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        """Learning-rate factor at a global step: `optim` over the BSQ phase, then again for fine-tuning."""
        o, spe = self.cfg.optim, self._steps_per_epoch
        bsq_steps = self.bsq_epochs * spe
        if step < bsq_steps:
            return lr_multiplier(o.schedule, bsq_steps, int(round(o.warmup_epochs * spe)), o.milestones, o.gamma)(step)
        ft_steps = max(1, self.cfg.params.finetune_epochs * spe)
        return self.cfg.params.finetune_lr_scale * lr_multiplier(o.schedule, ft_steps, 0, o.milestones, o.gamma)(step - bsq_steps)

    # -- checkpoints and the record ------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["bsq_history"] = self.history

    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        self.history = checkpoint.get("bsq_history", self.history)

    def record_extra(self) -> dict[str, Any]:
        p = self.cfg.params
        return {
            "bsq": {
                "mode": p.mode,
                "alpha": p.alpha,
                "threshold": p.threshold,
                "requant_every": p.requant_every,
                "epochs": self.bsq_epochs,
                "finetune_epochs": p.finetune_epochs,
                "start_bits": self.cfg.bits.w - 1,  # magnitude bits, like every bit count in extra.bsq
                "sign_bit_counted": False,
                **bit_summary(self.bit_layers, self.shortcuts),
                "bits_history": self.history,
                "pretrained": {k: self.pretrained.get(k) for k in ("run_id", "fp32_sim_top1")},
            }
        }
