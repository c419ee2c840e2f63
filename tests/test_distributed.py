"""One run on two processes (Lightning DDP on gloo, CPU) against the same run on one process.

Each process is a real `python -m fqtbench run` launched by Lightning's own DDP launcher, as a
user's `--set trainer.devices=2 --set trainer.strategy=ddp` does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fqtbench import registry
from fqtbench.config import resolve
from fqtbench.records import load_record

ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
DDP = ["--set", "trainer.devices=2", "--set", "trainer.strategy=ddp"]


def _run(out: Path, *args: str) -> Path:
    """Run the CLI in a subprocess; return the single run folder it wrote."""
    res = subprocess.run([sys.executable, "-m", "fqtbench", "run", *args, "--out", str(out), "--set", "trainer.progress=false"],
                         capture_output=True, text=True, env=ENV, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 1, f"expected one run folder (one record for all ranks), found {folders}"
    assert (folders[0] / "record.json").is_file()
    return folders[0]


def _cost(record) -> dict:
    tc = record.training_cost
    return {k: tc[k] for k in ("train_bitops", "train_macs", "bitops_by_role", "samples", "steps", "fitness_evals")}


def test_qat_on_two_processes_matches_one_process(tmp_path):
    one = load_record(_run(tmp_path / "one", "--method", "qat", "--seed", "0"))
    two = load_record(_run(tmp_path / "two", "--method", "qat", "--seed", "0", *DDP))
    assert one.ok and two.ok
    # the same global batches (each rank takes half of each), so the same work is counted once
    assert _cost(two) == _cost(one)
    assert two.training_cost["train_bitops"] > 0
    # per-rank batch-norm statistics differ a little from the whole batch's; accuracy must not
    assert abs(two.metrics["final"]["int_top1"] - one.metrics["final"]["int_top1"]) <= 0.5
    assert two.metrics["final"]["int_top1"] >= 97.0


def _same(a, b, where: str = "") -> None:
    """Recursive exact equality of checkpoint contents (tensors compared element by element)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _same(u, v, f"{where}[{i}]")
    else:
        assert a == b, where


def test_ccea_on_two_processes_is_bit_identical_to_one_process(tmp_path):
    args = ("--method", "ccea", "--seed", "1", "--set", "trainer.max_steps=40")
    one_dir = _run(tmp_path / "one", *args)
    two_dir = _run(tmp_path / "two", *args, *DDP)
    one, two = load_record(one_dir), load_record(two_dir)
    assert one.ok and two.ok
    assert two.metrics == one.metrics
    assert two.extra == one.extra and one.extra["improvements"] > 0  # the search did move
    assert _cost(two) == _cost(one)
    blob1 = torch.load(one_dir / "checkpoints" / "last.ckpt", weights_only=False)["ccea"]
    blob2 = torch.load(two_dir / "checkpoints" / "last.ckpt", weights_only=False)["ccea"]
    _same(blob1["int_model"], blob2["int_model"], "int_model")  # the final integer weights and biases
    _same(blob1["search"], blob2["search"], "search")  # counts, RNG state, generation


@pytest.mark.parametrize("method, extra", [
    ("fp32", []), ("fqt", []), ("cpt", []),
    ("bsq", ["bsq.finetune_epochs=1"]),  # re-quantization replaces the bit-planes: DDP is re-wrapped
    ("ebs", []),  # the strengths stop training at the switch to retraining: unused-parameter detection
])
def test_every_gradient_method_trains_on_two_processes(method, extra, tmp_path):
    """Two epochs on 2 processes: both phases of the two-phase methods, one record, the work of one process."""
    sets = ["trainer.max_epochs=2", *extra]
    rec = load_record(_run(tmp_path, "--method", method, *[a for kv in sets for a in ("--set", kv)], *DDP))
    assert rec.ok, rec.status
    cfg = resolve(method, overrides=sets)
    data = registry.datasets.get(cfg.data.name).build(cfg.data, cfg.seed)
    one_epoch = sum(len(y) for _, y in data.train_dataloader())  # what one process sees per epoch
    assert rec.training_cost["samples"] == 2 * one_epoch  # summed over ranks: each sample once
    assert rec.training_cost["train_bitops"] > 0


def test_the_ddp_strategy_is_adapted_to_the_method_and_spawn_is_refused():
    import pytorch_lightning as pl
    from torch import nn

    from fqtbench.errors import ConfigError
    from fqtbench.harness.runner import ddp_strategy_for

    class WithGrads(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

    class UnusedSometimes(WithGrads):
        ddp_find_unused_parameters = True

    class GradientFree(pl.LightningModule):
        pass

    assert ddp_strategy_for(WithGrads(), "auto", processes=1) == "auto"
    assert ddp_strategy_for(WithGrads(), "auto", processes=2) == "ddp"  # what Lightning would pick, made explicit
    assert ddp_strategy_for(UnusedSometimes(), "ddp", processes=2) == "ddp_find_unused_parameters_true"
    free = ddp_strategy_for(GradientFree(), "auto", processes=2)
    assert type(free).__name__ == "GradientFreeDDPStrategy" and free._setup_model("m") == "m"  # no DDP wrapper
    with pytest.raises(ConfigError, match="ddp_spawn"):
        ddp_strategy_for(WithGrads(), "ddp_spawn", processes=2)
