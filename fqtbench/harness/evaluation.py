"""After training: the method's own (simulated) accuracy and the shared integer engine's accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import registry
from ..config import ResolvedConfig


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    model_size_bytes: float | None = None
    inference_bitops: int | None = None


def evaluate_run(method, module, cfg: ResolvedConfig, data) -> EvalResult:
    """Export through the method, evaluate the IntModel on `engine.backend`, record the gap.

    Full-precision rows (export returns None) record `int_top1: null` and, as a reference, the
    integer accuracy of an `engine.ptq_bits` post-training-quantized copy.
    """
    from ..engine.export import ptq_export

    backend = registry.backends.get(cfg.engine.backend).with_overflow(cfg.engine.overflow)
    test = data.test_dataloader()
    int_model = method.export(module, cfg, data)
    sim_top1 = module.evaluate_sim(test)
    sim_top1 = round(sim_top1, 4)
    final: dict[str, Any] = {"sim_top1": sim_top1}
    best = {"val_sim_top1": getattr(module, "best_val_top1", None), "epoch": getattr(module, "best_val_epoch", None)}
    if int_model is not None:
        # The gap is taken between the rounded numbers the record shows, so it adds up exactly there.
        int_top1 = round(int_model.evaluate(test, backend), 4)
        final.update(int_top1=int_top1, gap=round(sim_top1 - int_top1, 4))
        layers = int_model.layer_table()
        size, bitops = int_model.size_bytes(), int_model.bitops_per_sample()
    else:
        ptq = ptq_export(module.model, cfg.engine.ptq_bits, cfg, data)
        final.update(int_top1=None, gap=None, ptq_bits=cfg.engine.ptq_bits, ptq_int_top1=round(ptq.evaluate(test, backend), 4))
        layers = [dict(l, w_bits=32, a_bits=32) for l in ptq.layer_table()]
        size = float(sum(l["params"] * 4 for l in layers))
        bitops = int(sum(l["macs"] * 32 * 32 for l in layers))
    return EvalResult(
        metrics={"final": final, "best": best, "backend": backend.name, "test_size": data.info.test_size},
        layers=layers,
        model_size_bytes=size,
        inference_bitops=bitops,
    )


__all__ = ["EvalResult", "evaluate_run"]
