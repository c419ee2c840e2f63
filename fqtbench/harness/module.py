"""Base LightningModules: one for gradient methods, one for gradient-free ones."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ResolvedConfig
from ..nn import quant_layers
from ..quant import ActQuantizer


class FQTModule(pl.LightningModule):
    """Automatic optimisation: cross-entropy (+ `extra_loss`), the optimiser and schedule of `optim`.

    Methods subclass it and override the hooks they need (`extra_loss`, `on_train_batch_start`,
    `configure_optimizers`, `evaluate_sim`).
    """

    def __init__(self, model: nn.Module, cfg: ResolvedConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.best_val_top1: float | None = None
        self.best_val_epoch: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def extra_loss(self) -> Tensor | None:
        """A regulariser added to the task loss (BSQ's group Lasso, EBS's complexity term)."""
        return None

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.optim.label_smoothing)
        extra = self.extra_loss()
        total = loss if extra is None else loss + extra
        acc = (logits.argmax(1) == y).float().mean()
        self.log_dict({"train/loss": loss.detach(), "train/acc": acc}, on_step=True, on_epoch=False, prog_bar=False)
        if extra is not None:
            self.log("train/extra_loss", extra.detach(), on_step=True, on_epoch=False)
        return total

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/top1", (logits.argmax(1) == y).float().mean() * 100, on_epoch=True, prog_bar=True, batch_size=len(y))

    def on_validation_epoch_end(self):
        v = self.trainer.callback_metrics.get("val/top1")
        if v is not None and not self.trainer.sanity_checking:
            v = float(v)
            if self.best_val_top1 is None or v > self.best_val_top1:
                self.best_val_top1, self.best_val_epoch = v, int(self.current_epoch)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["fqtbench_best"] = (self.best_val_top1, self.best_val_epoch)

    def on_load_checkpoint(self, checkpoint):
        self.best_val_top1, self.best_val_epoch = checkpoint.get("fqtbench_best", (None, None))

    # -- optimisation ------------------------------------------------------------------------
    def parameter_groups(self):
        """Weight decay on conv/linear weights only, not on batch-norm or biases."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 else decay).append(p)
        wd = self.cfg.optim.weight_decay
        return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        return make_optimizer(self.parameter_groups(), self.cfg, self.trainer)

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_sim(self, loader) -> float:
        """The method's own (simulated) top-1 in percent, in eval mode."""
        return evaluate_float(self.model, loader)

    @torch.no_grad()
    def calibrate(self, loader, method: str = "max", percentile: float = 100.0, keep_trained: bool = False) -> None:
        """Set the activation quantizers' evaluation ranges from a few training batches (with
        `keep_trained`, only those that tracked no range in training)."""
        calibrate_activations(self.model, loader, method, percentile, keep_trained)


class GradientFreeModule(pl.LightningModule):
    """Manual optimisation with no optimiser: one `generation(batch)` per training step.

    Lightning counts `global_step` by optimiser steps; stepping the mock optimiser Lightning
    supplies when `configure_optimizers` returns None keeps `max_steps` and step-based
    checkpoints working.
    """

    def __init__(self, cfg: ResolvedConfig):
        super().__init__()
        self.cfg = cfg
        self.automatic_optimization = False

    def configure_optimizers(self):
        return None

    def generation(self, batch, batch_idx: int) -> dict[str, float]:
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        stats = self.generation(batch, batch_idx)
        self.optimizers().step()  # advances trainer.global_step
        if stats:
            self.log_dict({f"ea/{k}": float(v) for k, v in stats.items()}, on_step=True, on_epoch=False, prog_bar=False)
        return None


# -------------------------------------------------------------------------------------------------


def make_optimizer(params, cfg: ResolvedConfig, trainer: pl.Trainer):
    o = cfg.optim
    if o.name == "sgd":
        opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    elif o.name == "adam":
        opt = torch.optim.Adam(params, lr=o.lr)
    else:
        opt = torch.optim.AdamW(params, lr=o.lr)
    total = max(1, int(trainer.estimated_stepping_batches))
    epochs = max(1, trainer.max_epochs or 1)
    warmup = int(round(o.warmup_epochs * total / epochs))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lr_multiplier(o.schedule, total, warmup, o.milestones, o.gamma))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lr_multiplier(schedule: str, total: int, warmup: int, milestones, gamma: float):
    """Per-step learning-rate factor: linear warm-up, then the schedule over the remaining steps."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        if schedule == "onecycle":  # warm-up then linear decay to zero
            return max(0.0, 1.0 - t)
        if schedule == "step":
            return gamma ** sum(t >= m for m in milestones)
        return 1.0

    return f


@torch.no_grad()
def evaluate_float(model: nn.Module, loader) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(_device(model)), y.to(_device(model))
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    return 100.0 * correct / max(1, total)


@torch.no_grad()
def calibrate_activations(model: nn.Module, loader, method: str = "max", percentile: float = 100.0,
                          keep_trained: bool = False) -> None:
    """Measure activation ranges on `loader` (eval mode). `keep_trained` leaves every quantizer that
    already tracked a range in training as it is: the network learned under that grid."""
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)
                  and not (keep_trained and bool(m.initialized))]
    if not quantizers:
        return
    was = model.training
    model.eval()
    for q in quantizers:
        q.start_calibration(method, percentile)
    for x, _ in loader:
        model(x.to(_device(model)))
    for q in quantizers:
        q.finish_calibration()
    model.train(was)


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


__all__ = ["FQTModule", "GradientFreeModule", "calibrate_activations", "evaluate_float", "lr_multiplier", "make_optimizer", "quant_layers"]
