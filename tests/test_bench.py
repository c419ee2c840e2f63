"""The benchmarks are tested themselves: they run, check their paths agree, and report consistent
ratios. (Their numbers are read by people in the bench output, never asserted as timings here.)"""

from __future__ import annotations

import json

import pytest


def _bench(cli, *args) -> dict:
    code, out, err = cli("bench", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_bench_backends_reports_every_backend_against_fp32(cli):
    doc = _bench(cli, "backends", "--models", "cnn-s", "--batch", "32", "--repeat", "1")
    rows = doc["rows"]
    assert [r["engine"] for r in rows] == ["fp32 float"] + [f"IntModel w8a8 on {b}" for b in ("int8", "bitserial", "reference")]
    fp32 = rows[0]["images/s"]
    for r in rows:
        assert r["images/s"] > 0 and r["vs fp32"] == pytest.approx(r["images/s"] / fp32, rel=1e-9)
    assert "every backend's logits checked identical" in doc["notes"] and doc["machine"]["torch"]


def test_bench_ccea_compares_naive_and_batched_paths(cli):
    doc = _bench(cli, "ccea", "--models", "cnn-s", "--batch", "16", "--pop", "3", "--repeat", "1")
    rows = doc["rows"]
    assert [r["fitness batch"].split()[0] for r in rows] == ["fresh", "kept"]  # both regimes the search runs in
    for row in rows:
        assert row["model"] == "cnn-s" and row["candidates"] == 3 and row["layers"] >= 3
        assert row["speed-up"] == pytest.approx(row["batched+incremental evals/s"] / row["naive evals/s"], rel=1e-9)
        assert row["speed-up, layers uniform"] > 0
    fresh = rows[0]  # the context's full pass bounds a fresh batch's saving below the candidate count
    assert 0 < fresh["suffix-only bound"] <= fresh["candidates"]
    assert rows[1]["suffix-only bound"] > 0
    assert any("checked bit-identical on every layer" in n for n in doc["notes"])
    assert any(n.startswith("suffix-only bound:") for n in doc["notes"])
    assert "target: batched+incremental >= 5x naive on resnet20 (resnet20 not measured in this run)" in doc["notes"]


def test_bench_ccea_says_which_regime_meets_the_target():
    from fqtbench.bench.ccea import _target_note

    rows = [{"model": "resnet20", "fitness batch": "fresh", "speed-up": 4.27},
            {"model": "resnet20", "fitness batch": "kept", "speed-up": 5.77}, {"model": "cnn-s", "fitness batch": "kept", "speed-up": 9.0}]
    assert _target_note(rows).endswith(": fresh 4.27x (not met), kept 5.77x (met)")


def test_bench_ccea_ranks_compares_one_and_two_processes(cli):
    doc = _bench(cli, "ccea", "--ranks", "2", "--models", "cnn-s", "--batch", "16", "--pop", "3", "--repeat", "1")
    (row,) = doc["rows"]
    assert row["model"] == "cnn-s" and row["threads/process"] == 1
    assert row["1 process evals/s"] > 0 and row["2 processes evals/s"] > 0
    assert row["speed-up"] == pytest.approx(row["2 processes evals/s"] / row["1 process evals/s"], rel=1e-9)
    assert "sharded fitness checked identical to the whole batch's" in doc["notes"]


def test_bench_refuses_an_unknown_model(cli):
    code, out, err = cli("bench", "ccea", "--models", "vgg99")
    assert code == 2 and "vgg99" in err and err.count("\n") <= 1
