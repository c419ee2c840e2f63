"""Run records: atomic writes, and a record for every ending (ok, failed, interrupted)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fqtbench import registry
from fqtbench.harness import FQTModule
from fqtbench.method import Method
from fqtbench.records import RECORD_NAME, RunRecord, atomic_write_text, iter_records, load_record
from tests.conftest import only_record

REQUIRED = {
    "run_id", "method", "track", "model", "dataset", "seed", "config", "precision", "status", "metrics", "layers",
    "model_size_bytes", "inference_bitops", "training_cost", "versions", "host", "schema_version", "config_hash",
}


def test_crash_while_writing_leaves_previous_record_intact(tmp_path, monkeypatch):
    path = tmp_path / RECORD_NAME
    atomic_write_text(path, '{"v": 1}')

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, '{"v": 2, "half": "writ')
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == [RECORD_NAME]  # no temporary file left behind


def test_iter_records_skips_torn_files(tmp_path):
    good = RunRecord("r1", "m@1", "digits", "cnn-s", "digits", 0, "w8a8", {}, "h", {})
    good.write(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / RECORD_NAME).write_text('{"run_id": "r2", "meth')
    assert [r.run_id for _, r in iter_records(tmp_path)] == ["r1"]


def test_iter_records_ignores_the_copy_wandb_keeps(tmp_path):
    """W&B attaches the record to its run, so a copy sits under runs/<id>/wandb/...; it is not a second run."""
    rec = RunRecord("r1", "m@1", "digits", "cnn-s", "digits", 0, "w8a8", {}, "h", {})
    rec.write(tmp_path / "runs" / "r1")
    rec.write(tmp_path / "runs" / "r1" / "wandb" / "offline-run-x" / "files")
    assert [p.parent.name for p, _ in iter_records(tmp_path / "runs")] == ["r1"]
    assert len(list(iter_records(tmp_path))) == 1


class _Boom(Method):
    name, version, description = "boom-test", "1", "fails or is interrupted at step 3"
    mode = "raise"

    def build(self, model, cfg, data):
        outer = self

        class M(FQTModule):
            def training_step(self, batch, batch_idx):
                if self.global_step == 3:
                    if outer.mode == "raise":
                        raise RuntimeError("boom at step 3\nsecond line")
                    raise KeyboardInterrupt
                return super().training_step(batch, batch_idx)

        return M(model, cfg)


@pytest.fixture
def boom():
    m = _Boom()
    registry.methods.register(m)
    yield m
    registry.methods.unregister(m.name)


def test_failed_run_writes_failed_record_and_one_line(cli, tmp_path, boom):
    boom.mode = "raise"
    code, out, err = cli("run", "--method", "boom-test", "--out", str(tmp_path))
    assert code == 1
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "RuntimeError: boom at step 3" in lines[0] and "Traceback" not in err
    rec = only_record(tmp_path)
    assert rec.status == "failed: RuntimeError: boom at step 3"
    assert rec.finished_at


def test_interrupted_run_writes_interrupted_record(cli, tmp_path, boom):
    import signal

    boom.mode = "interrupt"
    handler = signal.getsignal(signal.SIGINT)
    try:
        code, out, err = cli("run", "--method", "boom-test", "--out", str(tmp_path), "--seed", "5", "--set", "trainer.max_epochs=2")
    finally:
        signal.signal(signal.SIGINT, handler)
    assert code == 130
    assert only_record(tmp_path).status == "interrupted"
    # resuming from the command line: the header names the saved run (its seed), not the command line's
    # defaults; interrupted before its first checkpoint, the run cannot resume and says so in one line
    (run_dir,) = tmp_path.glob("*/")
    code, out, err = cli("run", "--method", "boom-test", "--resume", str(run_dir))
    assert code == 2 and "(seed 5," in err and "resuming" in err
    assert err.count("error:") == 1 and "no checkpoints/last.ckpt to resume from" in err


def test_ok_record_has_every_field(cli, tmp_path):
    code, out, err = cli("run", "--method", "qat", "--out", str(tmp_path), "--set", "trainer.max_epochs=2", "--set", "bits.w=4", "--set", "bits.a=4")
    assert code == 0, err
    (path,) = tmp_path.glob(f"*/{RECORD_NAME}")
    raw = json.loads(path.read_text())
    assert REQUIRED <= set(raw)
    rec = load_record(path)
    assert rec.status == "ok" and rec.method == "qat@1" and rec.bits_tag == "w4a4"
    f = rec.metrics["final"]
    assert set(f) >= {"int_top1", "sim_top1", "gap"} and abs(f["gap"] - (f["sim_top1"] - f["int_top1"])) < 1e-6
    assert rec.config["bits"]["w"] == 4 and rec.config["qat"] == {"weight_granularity": "tensor"}
    assert [l["w_bits"] for l in rec.layers] == [4, 4, 4]
    assert rec.model_size_bytes == sum(l["params"] for l in rec.layers) * 4 / 8
    tc = rec.training_cost
    assert tc["steps"] == 2 * (1258 // 32) and tc["samples"] == tc["steps"] * 32  # a last batch under half is dropped
    assert tc["wall_s"] > 0 and tc["peak_mb"] > 0
    assert set(tc["bitops_by_role"]) == {"fwd", "grad_input", "grad_weight"}
    assert rec.versions["torch"] == torch.__version__ and rec.versions["fqtbench"]
    assert (path.parent / "config.yaml").is_file() and (path.parent / "checkpoints" / "last.ckpt").is_file()
    assert "int top-1" in out and "status" in out
