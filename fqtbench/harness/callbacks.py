"""Harness callbacks: the training-cost meter."""

from __future__ import annotations

import resource
import time
from typing import Any

import pytorch_lightning as pl
import torch

from .. import cost


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU), or peak allocated CUDA memory if on a GPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class CostMeter(pl.Callback):
    """Counts, per training step, the MACs and BitOPs of each GEMM role, samples seen and wall time.

    Every fqtbench layer (and the integer engine for gradient-free fitness evaluations) reports its
    GEMMs to `fqtbench.cost`; this callback opens a tally around each training batch only, so
    validation and export cost nothing. Totals are kept in checkpoints so resumed runs add up.
    Under DDP the totals are summed over ranks at the end.
    """

    def __init__(self):
        self.total = cost.CostTally()
        self.samples = 0
        self.steps = 0
        self.fitness_evals = 0
        self.wall_s = 0.0
        self._t0: float | None = None
        self._tally_cm = None

    # a tally per batch ---------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._tally_cm = cost.tally()
        self._tally = self._tally_cm.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._tally_cm is None:
            return
        self._tally_cm.__exit__(None, None, None)
        self._tally_cm = None
        self.total.merge(self._tally)
        self.samples += int(len(batch[1]) if isinstance(batch, (tuple, list)) else len(batch))
        self.steps += 1
        self.fitness_evals += int(getattr(pl_module, "last_fitness_evals", 0) or 0)
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            pl_module.log_dict(
                {"cost/train_bitops": float(self.total.total_bitops), "cost/samples": float(self.samples)},
                on_step=True, on_epoch=False,
            )

    # wall time -------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if self._t0 is not None:
            self.wall_s += time.perf_counter() - self._t0
            self._t0 = None
        if self._tally_cm is not None:  # interrupted mid-batch
            self._tally_cm.__exit__(None, None, None)
            self._tally_cm = None
        self._reduce_over_ranks(trainer)

    def on_exception(self, trainer, pl_module, exception):
        self.on_train_end(trainer, pl_module)

    def _reduce_over_ranks(self, trainer) -> None:
        if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return
        keys = sorted(set(self.total.macs) | set(cost.ROLES))
        vec = torch.tensor(  # int64: exact (BitOPs pass 2^53 on CIFAR), and gloo sums int64
            [self.total.macs.get(k, 0) for k in keys] + [self.total.bitops.get(k, 0) for k in keys] + [self.samples],
            dtype=torch.int64,
        )
        torch.distributed.all_reduce(vec)
        n = len(keys)
        self.total = cost.CostTally()
        for i, k in enumerate(keys):
            if int(vec[i]):  # roles no rank used stay absent, as in a single-process tally
                self.total.macs[k] = int(vec[i])
                self.total.bitops[k] = int(vec[n + i])
        self.samples = int(vec[-1])

    # checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        wall = self.wall_s + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)
        return {
            "tally": self.total.as_dict(),
            "samples": self.samples,
            "steps": self.steps,
            "fitness_evals": self.fitness_evals,
            "wall_s": wall,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = cost.CostTally()
        for k, v in state["tally"]["macs"].items():
            self.total.macs[k] = int(v)
        for k, v in state["tally"]["bitops"].items():
            self.total.bitops[k] = int(v)
        self.samples = int(state["samples"])
        self.steps = int(state["steps"])
        self.fitness_evals = int(state.get("fitness_evals", 0))
        self.wall_s = float(state["wall_s"])

    def summary(self) -> dict[str, Any]:
        return {
            "train_bitops": int(self.total.total_bitops),
            "train_macs": int(self.total.total_macs),
            "bitops_by_role": {k: int(v) for k, v in sorted(self.total.bitops.items())},
            "macs_by_role": {k: int(v) for k, v in sorted(self.total.macs.items())},
            "samples": int(self.samples),
            "steps": int(self.steps),
            "fitness_evals": int(self.fitness_evals),
            "wall_s": round(self.wall_s, 3),
            "peak_mb": round(peak_memory_mb(), 1),
        }
