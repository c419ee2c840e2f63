"""The CPT LightningModule: cyclic forward bits per iteration, the precision range test, and
validation / export at one declared precision."""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from fqtbench import cost
from fqtbench.config import ResolvedConfig
from fqtbench.errors import ConfigError
from fqtbench.harness import FQTModule

from .prt import default_steps, precision_range_test
from .quant import clear_error_draws, cyclic_quantizers
from .schedule import cycle_length, cyclic_bits


class CPTModule(FQTModule):
    """FQTModule whose cyclic layers get their forward bits from the schedule before every batch.

    Validation, the final simulated evaluation, calibration and integer export all run at
    `eval_bits` (cpt.eval_bits, default bits.max), never at the point of the cycle training reached,
    so `val/top1`, best and final accuracies are comparable across runs and with static rows.
    """

    def __init__(self, model: nn.Module, cfg: ResolvedConfig, data):
        super().__init__(model, cfg)
        b = cfg.bits
        self.data = data  # the precision range test reads its first training batches
        self.bits_max = b.max
        self.eval_bits = cfg.params.eval_bits or b.max
        self.bits_min: int | None = None if b.min == "auto" else b.min
        self.prt: dict | None = None
        self.total_steps: int | None = None
        self.cycle: int | None = None
        self.steps_at_bits: dict[int, int] = {}
        self._cyclic = cyclic_quantizers(model, self.eval_bits, b.first_last)

    # -- precision ---------------------------------------------------------------------------
    def set_forward_bits(self, bits: int) -> None:
        """Weight and activation bits of every cyclic layer (the fixed layers keep theirs)."""
        for q in self._cyclic:
            q.bits = bits

    def _set_net_bits(self, net: nn.Module, bits: int) -> None:
        for q in cyclic_quantizers(net, self.eval_bits, self.cfg.bits.first_last):
            q.bits = bits

    def on_train_start(self) -> None:
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigError("trainer.max_epochs/trainer.max_steps: cpt needs a finite number of training steps for its schedule")
        self.total_steps = int(total)
        static = self.bits_min == self.bits_max  # no cycle to fit into the training steps
        self.cycle = self.total_steps if static else cycle_length(self.total_steps, self.cfg.params.num_cycles)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.bits_min is None:
            self._range_test()
        bits = cyclic_bits(self.global_step, self.cycle, self.bits_min, self.bits_max)
        self.set_forward_bits(bits)
        self.steps_at_bits[bits] = self.steps_at_bits.get(bits, 0) + 1
        self.log("cpt/fw_bits", float(bits), on_step=True, on_epoch=False)

    def on_after_backward(self) -> None:
        clear_error_draws(self.model)

    def on_validation_epoch_start(self) -> None:
        self.set_forward_bits(self.eval_bits)

    def on_train_end(self) -> None:
        self.set_forward_bits(self.eval_bits)

    @torch.no_grad()
    def evaluate_sim(self, loader) -> float:
        self.set_forward_bits(self.eval_bits)
        return super().evaluate_sim(loader)

    @torch.no_grad()
    def calibrate(self, loader, method: str = "max", percentile: float = 100.0, keep_trained: bool = False) -> None:
        """Calibrate (and so export) at the declared precision."""
        self.set_forward_bits(self.eval_bits)
        super().calibrate(loader, method, percentile, keep_trained)

    # -- precision range test -----------------------------------------------------------------
    def _range_test(self) -> None:
        """Pick bits.min before the first step; runs inside the cost meter's tally of that step."""
        steps = self.cfg.params.prt.steps or default_steps(self.total_steps)
        batches: list = []
        with torch.random.fork_rng(devices=[]):  # a DataLoader iterator draws its base seed from the global RNG
            while len(batches) < steps:
                for x, y in self.data.train_dataloader():
                    batches.append((x.to(self.device), y.to(self.device)))
                    if len(batches) == steps:
                        break
        # Probes are training work: count them in the meter's open tally (and keep their own total).
        outer = cost._stack()[-1] if cost.is_recording() else None
        with cost.tally() as spent:
            result = precision_range_test(self.model, self.cfg, batches, self._set_net_bits)
        if outer is not None:
            outer.merge(spent)
        result["bitops"] = int(spent.total_bitops)
        result["chosen"] = int(self.trainer.strategy.broadcast(result["chosen"], src=0))
        self.prt, self.bits_min = result, result["chosen"]
        self.log("cpt/prt_bits_min", float(self.bits_min), on_step=True, on_epoch=False)
        if self.trainer.is_global_zero:
            print(f"cpt: precision range test chose bits.min={self.bits_min} ({describe_prt(result)})", file=sys.stderr)

    # -- state and record ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["cpt"] = {"bits_min": self.bits_min, "prt": self.prt, "steps_at_bits": dict(self.steps_at_bits),
                             "rng": torch.get_rng_state(), "cuda_rng": _cuda_rng_states()}

    def on_load_checkpoint(self, checkpoint) -> None:
        """Also restore the random state: stochastic rounding draws from it, so a resumed run
        continues bit-identically."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("cpt", {})
        self.bits_min = state.get("bits_min", self.bits_min)
        self.prt = state.get("prt")
        self.steps_at_bits = dict(state.get("steps_at_bits", {}))
        if "rng" in state:
            torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def record_extra(self) -> dict:
        steps = sum(self.steps_at_bits.values())
        mean = sum(b * n for b, n in self.steps_at_bits.items()) / steps if steps else None
        return {
            "cpt": {
                "bits_min": self.bits_min,
                "bits_min_from": "prt" if self.prt is not None else "config",
                "bits_max": self.bits_max,
                "grad_bits": self.cfg.bits.grad,
                "eval_bits": self.eval_bits,
                "num_cycles": self.cfg.params.num_cycles,
                "cycle_steps": self.cycle,
                "steps_at_bits": {str(b): n for b, n in sorted(self.steps_at_bits.items())},
                "mean_fw_bits": round(mean, 4) if mean is not None else None,
                "prt": self.prt,
            }
        }


def _cuda_rng_states() -> list | None:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def describe_prt(result: dict) -> str:
    """One line: the reference gain, the threshold and each probe's gain."""
    ref = result["reference"]
    probes = ", ".join(f"{p['bits']}b {p['gain']:+.1f}" for p in result["curve"]) or "none"
    head = f"gain over {result['steps']} steps at {ref['bits']}b {ref['gain']:+.1f} pts, threshold {result['threshold_gain']:+.1f}"
    tail = "; inconclusive: the reference did not learn, raise cpt.prt.steps" if result["inconclusive"] else ""
    return f"{head}; probes {probes}{tail}"
