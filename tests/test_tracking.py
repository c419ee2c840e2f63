"""W&B: the mode decision, and a real offline run folder carrying the final summary and the record."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from fqtbench.tracking import decide_mode


def test_mode_is_offline_unless_online_is_asked_and_a_key_exists(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert decide_mode("offline") == "offline"
    assert decide_mode("online") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert decide_mode("online") == "online"
    assert decide_mode("offline") == "offline"
    assert decide_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert decide_mode("online") == "disabled"


def _wandb_records(path: Path):
    """Decode W&B's append-only log (32 KiB blocks of [crc32, length, type] chunks) into Record protos."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    off, block, buf = 7, 32768, b""
    while off + 7 <= len(data):
        if block - off % block < 7:
            off += block - off % block
            continue
        _, length, kind = struct.unpack("<IHB", data[off : off + 7])
        off += 7
        chunk, off = data[off : off + length], off + length
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def test_offline_run_folder_has_summary_and_record(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    code, out, err = cli("run", "--method", "qat", "--out", str(tmp_path / "runs"), "--wandb", "offline", "--set", "trainer.max_epochs=2")
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    record = json.loads((run_dir / "record.json").read_text())
    (wb,) = (run_dir / "wandb").glob("offline-run-*")
    assert json.loads((wb / "files" / "record.json").read_text())["run_id"] == record["run_id"]
    (log,) = wb.glob("*.wandb")
    summary, run_info = {}, None
    for rec in _wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "summary":
            for item in rec.summary.update:
                summary[item.key] = json.loads(item.value_json)
        elif kind == "run":
            run_info = rec.run
    assert summary["final/int_top1"] == pytest.approx(record["metrics"]["final"]["int_top1"])
    assert summary["status"] == "ok" and summary["bits"] == "w8a8"
    assert summary["cost/train_bitops"] == record["training_cost"]["train_bitops"]
    assert run_info.run_group == "digits/w8a8" and run_info.job_type == "qat"
    assert "digits" in list(run_info.tags) and run_info.run_id == record["run_id"]
