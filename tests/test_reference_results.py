"""The benchmark's own regression guard: the `reference` suite (every method, digits, seed 0, a short
budget) must land each method inside its band of configs/reference_results.yaml, in either direction:
a drop means a method broke, a jump means the benchmark changed what it measures."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from fqtbench.config import configs_root
from fqtbench.records import iter_records


@pytest.fixture(scope="module")
def reference() -> dict:
    return yaml.safe_load((configs_root() / "reference_results.yaml").read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory, reference) -> dict[str, float]:
    out = tmp_path_factory.mktemp("reference")
    # Its own pretraining cache: the fp32 starting networks are trained inside the suite, under the
    # suite's thread settings, exactly as when the reference values were measured.
    env = {**os.environ, "WANDB_MODE": "disabled", "COLUMNS": "200", "FQTBENCH_CACHE": str(tmp_path_factory.mktemp("reference-cache"))}
    res = subprocess.run([sys.executable, "-m", "fqtbench.cli", "suite", reference["suite"], "--out", str(out), "--jobs", "2"],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = {}
    for _, rec in iter_records(out):
        f = rec.metrics["final"]
        got[f"{rec.method.split('@')[0]} {rec.bits_tag}"] = f["int_top1"] if f["int_top1"] is not None else f["ptq_int_top1"]
    return got


def test_every_reference_row_ran(reference, results):
    assert set(results) == set(reference["results"])


@pytest.mark.parametrize("row", sorted(yaml.safe_load((configs_root() / "reference_results.yaml").read_text())["results"]))
def test_method_stays_in_its_band(row, reference, results):
    band = reference["results"][row]
    got = results[row]
    assert abs(got - band["int_top1"]) <= band["tol"], (
        f"{row}: int_top1 {got:.2f} left its band {band['int_top1']} ± {band['tol']}; if the change is intended, "
        "update configs/reference_results.yaml and say why in the commit")
