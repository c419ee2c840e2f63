"""The EBS training module: a search phase, then a retrain phase, inside one Lightning run.

Search (the first ``search_epochs`` epochs): every searched layer computes with its strength-weighted
mixture of quantized meta weights and quantized inputs; the loss is the task loss plus the
complexity penalty on the expected BitOPs. The strengths are one more parameter group of the same
optimiser (own learning rate, no weight decay), updated according to ``search_optimizer``:

- ``single-level``: the gradient of (training loss + penalty), like the weights;
- ``bilevel`` (first-order DARTS): the gradient of (validation loss + penalty); the training loss
  sees the strengths detached;
- ``mixed-level`` (MiLeNAS): the gradient of (training loss + penalty) + lambda * validation loss.

Retrain (the remaining epochs): each layer gets plain quantizers at its argmax bits (lowered where
needed to meet the target), the strengths are frozen, and the same meta weights train on under the
same optimiser and learning-rate schedule. The export is then the standard one.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fqtbench.config import ResolvedConfig
from fqtbench.data.base import mix_seed
from fqtbench.harness import CostMeter, FQTModule
from fqtbench.harness.module import make_optimizer

from .search import Decision, SearchSpace

VAL_STREAM = 0xEB5  # seed stream of the validation batches drawn for the strengths


class EBSModule(FQTModule):
    """Search, decide, retrain (see the module docstring); `record_extra` reports both phases."""

    ddp_find_unused_parameters = True  # the strengths take no gradient once the retrain phase starts

    def __init__(self, model, cfg: ResolvedConfig, space: SearchSpace, target: float, reference_bitops: int,
                 val_split: tuple[Tensor, Tensor] | None):
        super().__init__(model, cfg)
        p = cfg.params
        self.space = space
        self.target = float(target)
        self.reference_bitops = int(reference_bitops)
        self.search_epochs = max(1, round(p.search_fraction * cfg.trainer.max_epochs))
        self.phase = "search"
        self.decision: Decision | None = None
        self.end_of_search: dict[str, Any] = {}
        self.counts = {"search": {"steps": 0, "samples": 0, "val_samples": 0}, "retrain": {"steps": 0, "samples": 0}}
        self.meter_at_switch: dict[str, Any] | None = None
        self._val = val_split
        self._val_gen = torch.Generator().manual_seed(mix_seed(cfg.seed, VAL_STREAM))
        self._val_grads: tuple[Tensor, ...] | None = None
        space.state.gumbel = p.gumbel
        space.state.temperature = p.temperature
        space.attach_search()

    def forward(self, x: Tensor) -> Tensor:
        logits = super().forward(x)
        return self.space.scale_logits(logits) if self.phase == "search" else logits

    # ---- optimisation ------------------------------------------------------------------------
    def parameter_groups(self):
        """The network's groups (weight decay on conv/linear weights) plus the strengths, which
        always form the last group so that a resumed optimiser state lines up in either phase."""
        wd = self.cfg.optim.weight_decay
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim <= 1]
        strengths = list(self.space.parameters())
        return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0},
                {"params": strengths, "weight_decay": 0.0, "lr": self.cfg.params.strength_lr}]

    def configure_optimizers(self):
        return make_optimizer(self.parameter_groups(), self.cfg, self.trainer)

    def extra_loss(self) -> Tensor | None:
        """lambda * |log(E[BitOPs] / target)|: pulls the expected cost onto the target from either
        side (the budget is spent, not just capped) and is independent of the network's scale."""
        if self.phase != "search":
            return None
        expected = self.space.expected_bitops()
        self.log("search/expected_bitops_ratio", (expected / self.target).detach(), on_step=True, on_epoch=False)
        return self.cfg.params.cost_weight * torch.log(expected / self.target).abs()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip the network's gradient norm (not the strengths'): a low-bit candidate can zero a whole
        output channel, and batch norm then returns a 1/sqrt(eps) gradient that would blow up W."""
        clip = self.cfg.params.grad_clip
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], clip)

    def training_step(self, batch, batch_idx):
        searching = self.phase == "search"
        how = self.cfg.params.search_optimizer
        self._val_grads = self._validation_strength_grads() if searching and how != "single-level" else None
        self.space.state.detach = searching and how == "bilevel"
        try:
            return super().training_step(batch, batch_idx)
        finally:
            self.space.state.detach = False

    def _validation_strength_grads(self) -> tuple[Tensor, ...]:
        """d(validation loss)/d(strengths) on one batch drawn (with replacement) from the val split."""
        x_all, y_all = self._val
        idx = torch.randint(0, len(y_all), (self.cfg.data.batch_size,), generator=self._val_gen)
        x, y = x_all[idx].to(self.device), y_all[idx].to(self.device)
        self.counts["search"]["val_samples"] += len(y)
        loss = F.cross_entropy(self(x), y)
        self.log("search/val_loss", loss.detach(), on_step=True, on_epoch=False)
        return torch.autograd.grad(loss, self.space.search_parameters())

    def on_after_backward(self):
        if self._val_grads is None:
            return
        coef = 1.0 if self.cfg.params.search_optimizer == "bilevel" else self.cfg.params.mixed_level_lambda
        for a, g in zip(self.space.search_parameters(), self._val_grads):
            a.grad = coef * g if a.grad is None else a.grad.add_(g, alpha=coef)
        self._val_grads = None

    # ---- phases ------------------------------------------------------------------------------
    def on_train_epoch_start(self):
        if self.phase == "search" and self.current_epoch >= self.search_epochs:
            self.finish_search()

    def on_train_end(self):
        if self.phase == "search":  # the budget ended inside the search: decide, export without retraining
            self.finish_search()

    def finish_search(self) -> None:
        """Decide the bits, switch every layer to plain quantizers and start counting retrain cost."""
        with torch.no_grad():
            self.end_of_search = {"expected_bitops": float(self.space.expected_bitops()), "strengths": self.space.describe()}
            if self.space.log_logit_scale is not None:
                self.end_of_search["logit_scale"] = float(self.space.log_logit_scale.exp())
        self.decision = self.space.decide(self.target)
        self.meter_at_switch = self._meter_totals()
        self.space.attach_final(self.decision.bits)
        self.phase = "retrain"
        self.best_val_top1 = self.best_val_epoch = None  # "best" refers to the mixed-precision network only


    def on_train_batch_start(self, batch, batch_idx):
        if self.phase == "search":
            p = self.cfg.params
            total = max(1, self.search_epochs * self.trainer.num_training_batches)
            t = min(1.0, self.global_step / total)
            self.space.state.temperature = p.temperature * (p.final_temperature / p.temperature) ** t

    def on_train_batch_end(self, outputs, batch, batch_idx):
        c = self.counts[self.phase]
        c["steps"] += 1
        c["samples"] += int(len(batch[1]))

    def _meter_totals(self) -> dict[str, Any] | None:
        trainer = self._trainer
        meter = next((cb for cb in trainer.callbacks if isinstance(cb, CostMeter)), None) if trainer else None
        if meter is None:
            return None
        return {"train_bitops": int(meter.total.total_bitops), "train_macs": int(meter.total.total_macs),
                "bitops_by_role": {k: int(v) for k, v in sorted(meter.total.bitops.items())}}

    # ---- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["ebs"] = {"phase": self.phase, "decision": asdict(self.decision) if self.decision else None,
                             "end_of_search": self.end_of_search, "counts": self.counts,
                             "meter_at_switch": self.meter_at_switch}

    def on_load_checkpoint(self, checkpoint):
        """Runs before the state dict is loaded: rebuild the retrain quantizers it holds."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("ebs")
        if not state:
            return
        self.counts, self.end_of_search, self.meter_at_switch = state["counts"], state["end_of_search"], state["meter_at_switch"]
        if state["phase"] == "retrain":
            d = state["decision"]
            self.decision = Decision({k: tuple(v) for k, v in d["bits"].items()}, d["argmax_bitops"], d["bitops"], d["repairs"])
            self.space.attach_final(self.decision.bits)
            self.phase = "retrain"

    # ---- the record ----------------------------------------------------------------------------
    def record_extra(self) -> dict[str, Any]:
        p = self.cfg.params
        d = self.decision
        final = self._meter_totals()
        search_cost = dict(self.counts["search"], epochs=self.search_epochs)
        retrain_cost = dict(self.counts["retrain"], epochs=max(0, self.cfg.trainer.max_epochs - self.search_epochs))
        if final is not None and self.meter_at_switch is not None:
            search_cost.update(self.meter_at_switch)
            retrain_cost.update({k: final[k] - self.meter_at_switch[k] for k in ("train_bitops", "train_macs")})
        layers = []
        for row in self.end_of_search.get("strengths", []):
            w, a = d.bits[row["name"]]
            layers.append({**row, "w_bits": w, "a_bits": a})
        return {
            "search_optimizer": p.search_optimizer,
            "gumbel": p.gumbel,
            "logit_scale": self.end_of_search.get("logit_scale"),
            "temperature": [p.temperature, p.final_temperature],
            "candidates": {"w": sorted(p.w_candidates), "a": sorted(p.a_candidates)},
            "target_bitops": self.target,
            "target_ratio": None if p.target_bitops is not None else p.target_ratio,
            "reference": f"w{self.cfg.bits.w}a{self.cfg.bits.a}",
            "reference_bitops": self.reference_bitops,
            "expected_bitops_end_of_search": self.end_of_search.get("expected_bitops"),
            "argmax_bitops": d.argmax_bitops,
            "final_bitops": d.bitops,
            "repaired": bool(d.repairs),
            "repairs": d.repairs,
            "searched_bits": layers,
            "search_cost": search_cost,
            "retrain_cost": retrain_cost,
        }
