"""Suites: grid expansion, skipping finished cells, resuming after a kill, failures, submitit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fqtbench.records import iter_records
from fqtbench.suite import expand, load_suite, mark_done

ENV = {**os.environ, "WANDB_MODE": "disabled", "COLUMNS": "200"}


def _suite(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fqtbench.cli", *args], capture_output=True, text=True, env=ENV, timeout=900, **kw)


def _ok(out: Path) -> list:
    return [r for _, r in iter_records(out) if r.ok]


def test_expand_resolves_every_cell_and_rejects_a_bad_one(tmp_path):
    spec = load_suite("tiny")
    cells = expand(spec, tmp_path)
    assert [(c.method, c.seed) for c in cells] == [("fp32", 0), ("fp32", 1), ("qat", 0), ("qat", 1)]
    assert cells[2].cfg.bits.w == 4 and cells[0].cfg.trainer.max_epochs == 2
    assert len({c.key for c in cells}) == 4
    from fqtbench.errors import ConfigError

    bad = _suite(tmp_path, {"name": "bad", "tracks": ["digits"], "methods": [{"method": "qat", "settings": [{"bits.w": 0}]}]})
    with pytest.raises(ConfigError, match="bits.w=0"):
        expand(load_suite(bad), tmp_path)


def test_suite_resumes_after_a_kill_and_runs_only_what_is_missing(tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "fqtbench.cli", "suite", "tiny", "--out", str(out), "--jobs", "2"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not _ok(out):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the suite and its running children, mid-flight
    proc.wait()
    done_before = {r.config_hash for r in _ok(out)}
    assert 1 <= len(done_before) < 4
    res = _cli("suite", "tiny", "--out", str(out), "--jobs", "2")
    assert res.returncode == 0, res.stderr
    assert f"{len(done_before)} already done, {4 - len(done_before)} to run" in res.stderr
    ok = _ok(out)
    assert len({r.config_hash for r in ok}) == 4 and len(ok) == 4  # nothing ran twice
    assert "skipped (already done): " + str(len(done_before)) in res.stdout
    again = _cli("suite", "tiny", "--out", str(out), "--dry-run")
    assert "4 already done, 0 to run" in again.stderr
    manifest = json.loads((out / "suite.json").read_text())
    assert manifest["seeds"] == [0, 1] and len(manifest["cells"]) == 4


def test_a_failing_run_is_recorded_and_the_suite_goes_on(tmp_path):
    path = _suite(tmp_path, {
        "name": "mixed", "tracks": ["digits"], "seeds": [0], "overrides": {"trainer.max_epochs": 1},
        "methods": [
            {"method": "qat", "settings": [{"data.name": "imagefolder", "data.root": str(tmp_path / "missing")}]},
            {"method": "fp32"},
        ],
    })
    out = tmp_path / "runs"
    res = _cli("suite", str(path), "--out", str(out))
    assert res.returncode == 1
    recs = {r.method: r for _, r in iter_records(out)}
    assert recs["fp32@1"].ok
    assert recs["qat@1"].status.startswith("failed:") and "missing" in recs["qat@1"].status
    assert "failed: 1" in res.stdout and "ran ok: 1" in res.stdout


def test_submitit_executor_runs_cells(tmp_path):
    path = _suite(tmp_path, {"name": "sub", "tracks": ["digits"], "seeds": [3], "overrides": {"trainer.max_epochs": 1},
                             "methods": [{"method": "qat"}]})
    out = tmp_path / "runs"
    res = _cli("suite", str(path), "--out", str(out), "--executor", "submitit-local", "--time-min", "10")
    assert res.returncode == 0, res.stderr + res.stdout
    (rec,) = _ok(out)
    assert rec.seed == 3
    assert (out / ".suite" / "submitit").is_dir()
    spec = load_suite(path)
    cells = expand(spec, out)
    mark_done(cells, out)
    assert [c.status for c in cells] == ["skipped"]


def test_dry_run_runs_nothing(tmp_path):
    res = _cli("suite", "tiny", "--out", str(tmp_path / "o"), "--dry-run")
    assert res.returncode == 0 and "would run" in res.stdout
    assert not (tmp_path / "o").exists()
