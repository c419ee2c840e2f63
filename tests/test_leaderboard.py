"""Leaderboard: numbers equal an independent recomputation from the records, incomplete rows are
marked, the page works in a real headless browser, and publishing works offline."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
from pathlib import Path

import pytest
from scipy import stats

from fqtbench.cli import main
from fqtbench.records import RunRecord

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# (track, method, bits, seed) -> (int_top1, sim_top1); fp32 rows have no integer model
ACCURACY = {
    ("digits", "fp32@1", "fp32", 0): (None, 98.0), ("digits", "fp32@1", "fp32", 1): (None, 97.5),
    ("digits", "fp32@1", "fp32", 2): (None, 98.5),
    ("digits", "qat@1", "w4a4", 0): (96.1, 96.4), ("digits", "qat@1", "w4a4", 1): (97.3, 97.0),
    ("digits", "qat@1", "w4a4", 2): (95.2, 95.9),
    ("digits", "ccea@1", "w3a3", 0): (97.9, 97.9), ("digits", "ccea@1", "w3a3", 1): (98.3, 98.3),  # seed 2 missing
    ("cifar10-r20-cpu", "fp32@1", "fp32", 0): (None, 80.0),
    ("cifar10-r20-cpu", "qat@1", "w4a4", 0): (71.0, 72.5),
}


def _record(track, method, bits, seed, int_top1, sim_top1) -> RunRecord:
    name = method.split("@")[0]
    final = {"sim_top1": sim_top1, "int_top1": int_top1,
             "gap": None if int_top1 is None else round(sim_top1 - int_top1, 4)}
    if int_top1 is None:
        final["ptq_int_top1"] = sim_top1 - 0.3
    w = 32 if int_top1 is None else int(bits[1])
    params = 1000 + seed  # a per-run value, so means are not trivially equal to any one run
    return RunRecord(
        run_id=f"{name}-{track}-{bits}-s{seed}", method=method, track=track, model="m", dataset="d", seed=seed,
        bits_tag=bits, config={"method": name}, config_hash=f"{track}-{name}-{bits}-{seed}", precision={},
        status="ok", metrics={"final": final},
        layers=[{"name": "l0", "params": params, "w_bits": w, "a_bits": w}, {"name": "l1", "params": 3 * params, "w_bits": 8, "a_bits": 8}],
        model_size_bytes=params * w / 8, inference_bitops=params * w * w,
        training_cost={"train_bitops": 1e12 * (1 + seed) * w, "samples": 5000 * (seed + 1), "wall_s": 10.0 + seed},
        finished_at=f"2026-12-01T00:00:0{seed}",
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for (track, method, bits, seed), (i, s) in ACCURACY.items():
        _record(track, method, bits, seed, i, s).write(root / f"{track}-{method}-{bits}-{seed}")
    bad = _record("digits", "qat@1", "w4a4", 3, 1.0, 1.0)
    bad.status, bad.config_hash = "failed: loss is NaN at step 12", "digits-qat-w4a4-3"
    bad.write(root / "failed-run")
    # an interrupted first attempt of a cell that a re-run then finished: history, not an open failure
    earlier = _record("digits", "qat@1", "w4a4", 1, 2.0, 2.0)
    earlier.status, earlier.finished_at = "interrupted", "2026-11-30T23:59:59"
    earlier.write(root / "interrupted-then-rerun")
    # the suite asked for 3 seeds of ccea: its row must be marked incomplete
    cells = [{"method": m.split("@")[0], "track": t, "seed": sd, "setting": {"bits": b}, "config_hash": f"{t}-{m.split('@')[0]}-{b}-{sd}"}
             for (t, m, b, sd) in ACCURACY if t == "digits"]
    cells.append({"method": "ccea", "track": "digits", "seed": 2, "setting": {"bits": "w3a3"}, "config_hash": "never-ran"})
    (root / "suite.json").write_text(json.dumps({"name": "t", "seeds": [0, 1, 2], "tracks": ["digits"], "cells": cells}))
    return root


@pytest.fixture(scope="module")
def board(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("board")
    assert main(["leaderboard", "build", "--runs", str(runs), "--out", str(out), "--note", "Runs shared a <2-core> machine."]) == 0
    return out


def _csv(board: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    with open(board / "results.csv") as f:
        return {(r["track"], r["method"], r["bits"]): r for r in csv.DictReader(f)}


def _independent(runs: Path) -> dict[tuple[str, str, str], dict[str, float | None]]:
    """The same statistics, recomputed straight from the JSON files with the standard library and scipy."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for path in runs.rglob("record.json"):
        raw = json.loads(path.read_text())
        if raw["status"] == "ok":
            groups.setdefault((raw["track"], raw["method"], raw["bits_tag"]), []).append(raw)
    fp32 = {t: statistics.mean(r["metrics"]["final"]["sim_top1"] for r in rs) for (t, m, _), rs in groups.items() if m == "fp32@1"}
    want = {}
    for key, rs in groups.items():
        ints = [r["metrics"]["final"]["int_top1"] for r in rs if r["metrics"]["final"]["int_top1"] is not None]
        row: dict[str, float | None] = {"n": len(rs), "sim_top1": statistics.mean(r["metrics"]["final"]["sim_top1"] for r in rs)}
        row["int_top1"] = statistics.mean(ints) if ints else None
        row["int_top1_std"] = statistics.stdev(ints) if len(ints) > 1 else None
        row["int_top1_ci95"] = (stats.t.ppf(0.975, len(ints) - 1) * statistics.stdev(ints) / math.sqrt(len(ints))) if len(ints) > 1 else None
        row["gap_to_fp32"] = row["int_top1"] - fp32[key[0]] if ints else None
        row["train_bitops"] = statistics.mean(r["training_cost"]["train_bitops"] for r in rs)
        row["wall_s"] = statistics.mean(r["training_cost"]["wall_s"] for r in rs)
        row["model_size_kb"] = statistics.mean(r["model_size_bytes"] / 1024 for r in rs)
        row["inference_bitops"] = statistics.mean(r["inference_bitops"] for r in rs)
        row["avg_w_bits"] = (statistics.mean(sum(l["params"] * l["w_bits"] for l in r["layers"]) / sum(l["params"] for l in r["layers"])
                                             for r in rs) if ints else None)
        want[key] = row
    return want


def test_numbers_equal_an_independent_recomputation(runs, board):
    got, want = _csv(board), _independent(runs)
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        for col, v in w.items():
            if v is None:
                assert g[col] == "", (key, col, g[col])
            else:
                assert float(g[col]) == pytest.approx(v, rel=1e-9), (key, col)


def test_incomplete_rows_and_failed_runs_are_marked(board):
    got = _csv(board)
    assert got[("digits", "ccea@1", "w3a3")]["incomplete"] == "True" and got[("digits", "ccea@1", "w3a3")]["expected_n"] == "3"
    assert got[("digits", "qat@1", "w4a4")]["incomplete"] == "False"
    md = (board / "README.md").read_text()
    assert "⚠ 2/3" in md and "loss is NaN at step 12" in md
    assert "interrupted" not in md  # its identity was re-run and ended ok
    assert "## digits" in md and "## cifar10-r20-cpu" in md
    assert "Runs shared a <2-core> machine." in md  # the build's --note, on both pages (escaped in HTML)
    assert "Runs shared a &lt;2-core&gt; machine." in (board / "index.html").read_text()
    for track in ("digits", "cifar10-r20-cpu"):
        for kind in ("bitops", "size"):
            png = board / f"{track}-{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_build_refuses_a_missing_folder(tmp_path, capsys):
    assert main(["leaderboard", "build", "--runs", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it with apt-get "
                    "where it can; `apt-get install chromium` to run this test)")
def test_page_in_a_headless_browser(board):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    n_rows = len(_csv(board))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto((board / "index.html").as_uri())
        rows = page.locator("#leaderboard tbody tr")
        assert rows.count() == n_rows
        # sorting by integer top-1 (higher is better: descending first) reorders the rows
        col = page.locator("#leaderboard th").all_inner_texts().index("integer top-1 %")

        def column() -> list[float | None]:
            vals = page.eval_on_selector_all("#leaderboard tbody tr", f"rs => rs.map(r => r.cells[{col}].dataset.sort)")
            return [float(v) if v else None for v in vals]

        before = column()
        page.locator("#leaderboard th", has_text="integer top-1 %").click()
        after = [v for v in column() if v is not None]
        assert after == sorted(after, reverse=True) and column() != before
        page.locator("#leaderboard th", has_text="integer top-1 %").click()
        after = [v for v in column() if v is not None]
        assert after == sorted(after)
        # the track filter hides the other track's rows and plots
        page.select_option("#track-filter", "cifar10-r20-cpu")
        visible = page.eval_on_selector_all("#leaderboard tbody tr", "rs => rs.filter(r => !r.hidden).map(r => r.dataset.track)")
        assert visible and set(visible) == {"cifar10-r20-cpu"}
        assert page.eval_on_selector_all(".plots img", "is => is.filter(i => !i.hidden).map(i => i.dataset.track)") == ["cifar10-r20-cpu"] * 2
        page.select_option("#track-filter", "")
        # every plot image decodes
        sizes = page.eval_on_selector_all(".plots img", "is => is.map(i => i.complete ? i.naturalWidth : 0)")
        assert len(sizes) == 4 and all(w > 100 for w in sizes)
        browser.close()


def test_publish_offline_writes_a_run_to_sync_later(board, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    copy = tmp_path / "lb"
    shutil.copytree(board, copy)
    assert main(["leaderboard", "publish", "--wandb-project", "fqtbench-test", "--dir", str(copy)]) == 0
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert f"wandb sync {run_dir}" in capsys.readouterr().out  # the user is told where it went
    (log,) = run_dir.glob("*.wandb")
    assert log.stat().st_size > 0
    blob = log.read_bytes()
    assert b"leaderboard/digits" in blob and b"leaderboard/cifar10-r20-cpu" in blob


def test_publish_needs_a_built_folder(tmp_path, capsys):
    assert main(["leaderboard", "publish", "--wandb-project", "p", "--dir", str(tmp_path)]) == 2
    assert "leaderboard build" in capsys.readouterr().err
