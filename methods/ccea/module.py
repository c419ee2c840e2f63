"""CC-EA in the harness: one generation per training step, integer arithmetic only."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from fqtbench.harness import GradientFreeModule
from fqtbench.engine.intmodel import SPEC_VERSION, IntModel
from fqtbench.errors import ConfigError

from fqtbench.engine.requant import requantize

from .search import SearchConfig, SearchState, fitness_from_terms, fitness_terms
from .start import Start


class CCEAModule(GradientFreeModule):
    def __init__(self, cfg, start: Start, backend):
        super().__init__(cfg)
        p = cfg.params
        self.int_model: IntModel = start.int_model
        self.backend = backend
        self.margin_clip = start.margin_clip
        self.start_info = start.info
        self.pretraining_cost = (start.pretraining or {}).get("training_cost")
        self.pretraining_info = start.pretraining
        self.teacher, self.teacher_rescale = start.teacher, start.teacher_rescale
        self.scfg = SearchConfig(
            pop_size=p.pop_size, elite=p.elite, group_size=p.group_size, lr=p.lr, prior=p.prior,
            start_count=p.start_count, decay_shift=p.decay_shift, saturation=p.saturation,
            regroup_every=p.regroup_every, radius=p.radius, grouping=p.grouping,
            bias_radius=p.bias_radius if p.search_biases else None,
            scale_radius=p.scale_radius if p.search_scales else None,
        )
        self.state = SearchState.create(self.int_model, self.scfg, cfg.seed)
        for layer in self.state.layers:  # the accumulator bound must cover every reachable bias
            if layer.bias_step is not None:
                attrs = self.int_model.nodes[layer.node].attrs
                attrs["acc_bound"] = int(attrs["acc_bound"]) + p.bias_radius * int(layer.bias_step.max())
        self.last_fitness_evals = 0
        self.improvements = 0
        self._kept: _KeptBatch | None = None

    # ---- one generation ----------------------------------------------------------------------
    def generation(self, batch, batch_idx: int) -> dict[str, float]:
        stats = self.evolve(*batch)
        return {k: float(v) for k, v in stats.items()}

    @torch.no_grad()
    def evolve(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
        """One cooperative-coevolution cycle on the mini-batch (x, y); integer ops only."""
        st, c, im = self.state, self.scfg, self.int_model
        self.follow(x.device)
        li = st.pick_layer(c)
        layer = st.layers[li]
        idx = st.group(li, c)
        cand = st.sample(li, idx, c.pop_size)  # (P, G)
        flat = st.context(im, li).reshape(1, -1).repeat(c.pop_size + 1, 1)  # row 0: the context
        flat[1:, idx] = cand
        weights, biases, ms = st.split(li, flat)
        weights = weights.to(x.device, im.nodes[layer.node].tensors["weight"].dtype)
        biases = biases.to(x.device) if biases is not None else None
        ms = ms.to(x.device) if ms is not None else None  # stored into the model below: on its device
        kept = self.kept_batch(x)
        # the context's logits are kept; only the sampled candidates (rows 1..P) run, from its prefix
        logits = torch.cat([kept.acts[-1].unsqueeze(0), im.forward_population(
            x, self.backend, layer.node, weights[1:], biases=biases[1:] if biases is not None else None,
            requant=(layer.scale_node, ms[1:]) if ms is not None else None,
            prefix=kept.acts, cost_role="fitness")])
        terms = fitness_terms(logits, y, self.margin_clip, self.cfg.params.fitness, kept.target)
        terms, n = self.sum_over_ranks(terms.cpu(), int(y.numel()))
        fit, correct = fitness_from_terms(terms, n, self.margin_clip, self.cfg.params.fitness)
        order = torch.argsort(-fit, stable=True)  # ties: the context (row 0) first, then sampling order
        elite = order[: c.elite]
        st.update(li, idx, flat[elite][:, idx], c)
        best = int(order[0])
        improved = bool(fit[best] > fit[0])
        if improved:
            im.set_weight(layer.node, weights[best].clone())
            if biases is not None:
                im.nodes[layer.node].tensors["bias"] = biases[best].clone()
            if ms is not None:
                im.nodes[layer.scale_node].tensors["m"] = ms[best].clone()
            self.improvements += 1
            kept.stale_from = layer.node  # refreshed when the next generation keeps this batch
        st.generation += 1
        if st.generation % c.regroup_every == 0:
            st.regroup()
        self.last_fitness_evals = c.pop_size + 1
        return {
            "best_fitness": int(fit[best]),
            "mean_fitness": int(fit.sum()) // int(fit.numel()),
            "context_correct": int(correct[0]),
            "best_correct": int(correct[best]),
            "layer": li,
            "group_size": int(idx.numel()),
            "mean_confidence_x100": int(layer.confidence().sum()) * 100 // layer.n,
            "evals": c.pop_size + 1,
            "improved": int(improved),
        }

    def kept_batch(self, x: torch.Tensor) -> "_KeptBatch":
        """The context's reusable activations (and the teacher's logits) on batch `x`.

        Computed once per batch and kept: where the fitness batch stays the same across
        generations (digits: the whole training split every time) a generation runs only the
        candidates' suffix, and after an improvement the context is recomputed from the changed
        layer on. Exact: the kept tensors are what a fresh pass would compute."""
        im, kept = self.int_model, self._kept
        same = (kept is not None and kept.x.shape == x.shape and kept.x.device == x.device and torch.equal(kept.x, x))
        if not same:
            target = None
            if self.teacher is not None:  # the integer teacher's logits on this batch, on the student's scale
                target = requantize(self.teacher.forward(x, self.backend, cost_role="fitness"), self.teacher_rescale)
            kept = self._kept = _KeptBatch(x.clone(), im.activations(x, self.backend, cost_role="fitness"), target)
        elif kept.stale_from is not None:
            im.refresh(kept.acts, self.backend, kept.stale_from, cost_role="fitness")
        kept.stale_from = None
        return kept

    def follow(self, device: torch.device) -> None:
        """Keep the integer model(s) on the device of the batches (the EDA state stays on the CPU)."""
        self.int_model.to(device)
        if self.teacher is not None:
            self.teacher.to(device)

    def on_train_end(self):
        self.follow(torch.device("cpu"))  # the shared evaluation runs on the CPU

    def sum_over_ranks(self, terms: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
        """Sharded CC-EA: each rank evaluated every candidate on its share of the global mini-batch
        (the datamodule's shard); the integer fitness terms and sample counts add up exactly, so
        every rank applies the same update as a single process on the whole batch would."""
        dist = torch.distributed
        if self._trainer is None or self.trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return terms, n
        packed = torch.cat([terms.reshape(-1), torch.tensor([n], dtype=torch.int64)])
        if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
            packed = packed.to(self.device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        return packed[:-1].reshape(terms.shape), int(packed[-1])

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.state.generation % 50 == 0:  # a light global summary for W&B
            conf = torch.cat([l.confidence() for l in self.state.layers])
            self.log("ea/mean_confidence_all", float(conf.sum()) / conf.numel(), on_step=True, on_epoch=False)

    # ---- evaluation --------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.follow(x.device)
        pred = self.int_model.predict(x, self.backend)
        self.log("val/top1", float((pred == y).sum()) * 100.0 / len(y), on_epoch=True, prog_bar=True, batch_size=len(y))

    def on_validation_epoch_end(self):
        v = self.trainer.callback_metrics.get("val/top1")
        if v is not None and not self.trainer.sanity_checking:
            v = float(v)
            if self.best_val_top1 is None or v > self.best_val_top1:
                self.best_val_top1, self.best_val_epoch = v, int(self.current_epoch)

    best_val_top1: float | None = None
    best_val_epoch: int | None = None

    @torch.no_grad()
    def evaluate_sim(self, loader) -> float:
        """CC-EA's own model *is* the integer model: its simulated accuracy is the integer one."""
        return self.int_model.evaluate(loader, self.backend)

    def calibrate(self, loader, method: str = "max", percentile: float = 100.0, keep_trained: bool = False) -> None:
        """Nothing to calibrate: activation scales are fixed integers from the start."""

    def record_extra(self) -> dict:
        conf = torch.cat([l.confidence() for l in self.state.layers])
        return {
            **self.start_info,
            "generations": self.state.generation,
            "improvements": self.improvements,
            "mean_confidence": round(float(conf.sum()) / conf.numel(), 3),
            "pretraining": {k: v for k, v in (self.pretraining_info or {}).items() if k != "training_cost"} or None,
        }

    # ---- checkpoints: the whole EA state ----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        checkpoint["ccea"] = {
            "int_model": self.int_model.state(),
            "search": self.state.state_dict(),
            "improvements": self.improvements,
            "best": (self.best_val_top1, self.best_val_epoch),
        }

    def on_load_checkpoint(self, checkpoint):
        blob = checkpoint["ccea"]
        p = self.cfg.params
        if (p.search_biases or p.search_scales) and json.loads(blob["int_model"]["spec"]).get("version", 1) < SPEC_VERSION:
            raise ConfigError("this ccea checkpoint holds an integer model of the previous engine (biases in whole "
                              "accumulator units), so its searched biases and scales cannot continue on this one; "
                              "start the run again")
        self.int_model = IntModel.from_state(blob["int_model"])
        self._kept = None  # activations of the model just replaced
        self.state.load_state_dict(blob["search"])
        self.improvements = int(blob["improvements"])
        self.best_val_top1, self.best_val_epoch = blob["best"]


@dataclass
class _KeptBatch:
    """A fitness batch with the context's reusable activations on it (`IntModel.activations`);
    `stale_from`: the GEMM node from which they must be recomputed, after an improvement."""

    x: torch.Tensor
    acts: list
    target: torch.Tensor | None
    stale_from: int | None = None
