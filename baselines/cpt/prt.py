"""The precision range test (PRT) that picks `bits.min` when it is 'auto'.

The paper says only that the lower bound "can be identified using a simple precision range test
within the first few training epochs"; the rule is not public. fqtbench's rule:

1. Train a copy of the freshly initialised network for `steps` iterations at `bits.max` (the
   reference) and measure its training-accuracy gain: the mean training accuracy (in points) of the
   second half of those iterations minus that of the first half.
2. For b = prt.start, prt.start + 1, ... below bits.max, train a fresh copy the same way at b
   forward bits. The first b whose gain reaches `ratio` x the reference gain is bits.min: training
   at b makes real progress, not just noise.
3. If none does, bits.min = bits.max (static training), and the result says so.

Every probe starts from the same initial weights, sees the same batches (the first `steps` of the
training order), runs at the run's peak learning rate without schedule and with the run's error
bits, and starts from the same random state, so probes differ only in precision. Comparing against
the reference gain rather than a fixed number of points makes one default work on any dataset,
batch size and learning rate. The probes run under a forked random state: the run's own training
is bit-identical to a run given the chosen bits.min directly; only the probes' cost is added.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fqtbench.config import ResolvedConfig

from .quant import clear_error_draws

SetBits = Callable[[nn.Module, int], None]


def default_steps(total_steps: int) -> int:
    """2% of training per probe (the paper's 'first few epochs' of ~160), at least 20 iterations."""
    return max(20, round(0.02 * total_steps))


def _optimizer(net: nn.Module, cfg: ResolvedConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    decay = [p for p in net.parameters() if p.ndim > 1]
    rest = [p for p in net.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    return (torch.optim.Adam if o.name == "adam" else torch.optim.AdamW)(groups, lr=o.lr)


def probe(model: nn.Module, bits: int, batches: list, cfg: ResolvedConfig, set_bits: SetBits) -> dict:
    """Train a copy of `model` on `batches` at `bits`; its training-accuracy gain in points."""
    net = copy.deepcopy(model).train()
    set_bits(net, bits)
    opt = _optimizer(net, cfg)
    torch.manual_seed(cfg.seed)
    accs = []
    for x, y in batches:
        logits = net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.optim.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clear_error_draws(net)
        opt.step()
        accs.append(float((logits.argmax(1) == y).float().mean()) * 100)
    half = len(accs) // 2
    first, second = sum(accs[:half]) / half, sum(accs[half:]) / (len(accs) - half)
    return {"bits": bits, "gain": round(second - first, 3), "acc_first_half": round(first, 3), "acc_second_half": round(second, 3)}


def precision_range_test(model: nn.Module, cfg: ResolvedConfig, batches: list, set_bits: SetBits) -> dict:
    """Run the PRT (module docstring) on a copy of `model`; return the choice and the measured curve."""
    p, bits_max = cfg.params.prt, cfg.bits.max
    devices = [batches[0][0].device.index or 0] if batches[0][0].is_cuda else []
    with torch.random.fork_rng(devices=devices):
        reference = probe(model, bits_max, batches, cfg, set_bits)
        threshold = p.ratio * reference["gain"]
        curve, chosen = [], bits_max
        if reference["gain"] > 0:
            for b in range(p.start, bits_max):
                curve.append(probe(model, b, batches, cfg, set_bits))
                if curve[-1]["gain"] >= threshold:
                    chosen = b
                    break
    return {
        "chosen": chosen,
        "passed": chosen < bits_max,
        "inconclusive": reference["gain"] <= 0,  # the reference itself did not learn: raise cpt.prt.steps
        "steps": len(batches),
        "samples": sum(len(y) for _, y in batches) * (len(curve) + 1),
        "ratio": p.ratio,
        "reference": reference,
        "threshold_gain": round(threshold, 3),
        "curve": curve,
    }
