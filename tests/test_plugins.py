"""Plugin discovery through real entry points: fixture distributions are pip-installed into the
test environment, exercised through the `fqtbench` CLI in a subprocess, and uninstalled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fqtbench import registry
from fqtbench.registry import DuplicateNameError, Registry

FIXTURES = Path(__file__).parent / "fixtures" / "plugins"
DISTS = {"fqtbench-toy": "fqtbench-toy", "fqtbench-dup": "fqtbench-dup", "fqtbench-broken": "fqtbench-broken"}


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True, capture_output=True)


def fqtbench(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "WANDB_MODE": "disabled", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "fqtbench.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Install the fixture distributions for this module only."""
    build = tmp_path_factory.mktemp("pip-build")
    for folder in DISTS:
        _pip("install", "--no-deps", "--no-build-isolation", "--no-cache-dir", str(FIXTURES / folder))
    try:
        yield
    finally:
        _pip("uninstall", "-y", *DISTS.values())
        registry.methods.reload()
        registry.models.reload()
        assert build.exists()


def test_list_shows_third_party_duplicate_and_broken_plugins(installed):
    res = fqtbench("list", "methods")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "toy" in out and "fqtbench-toy" in out and "0.3" in out
    assert "fqtbench-broken" in out and "ModuleNotFoundError" in out
    assert "fqtbench-dup" in out and "duplicate" in out
    qat_rows = [l for l in out.splitlines() if l.strip("│ ").startswith("qat ")]
    assert len(qat_rows) == 2 and all("BROKEN" in l for l in qat_rows)  # neither may run, so neither looks usable
    assert "fp32" in out  # the others keep working


def test_third_party_method_and_model_run_end_to_end(installed, tmp_path):
    res = fqtbench("run", "--method", "toy", "--out", str(tmp_path), "--set", "model.name=toy-mlp", "--set", "trainer.max_epochs=4")
    assert res.returncode == 0, res.stderr
    (path,) = tmp_path.glob("*/record.json")
    rec = json.loads(path.read_text())
    assert rec["status"] == "ok"
    assert rec["method"] == "toy@0.3" and rec["model"] == "toy-mlp" and rec["bits_tag"] == "toy6"
    assert rec["metrics"]["final"]["int_top1"] > 80.0  # it learns, and the shared engine evaluates it


def test_duplicate_name_is_refused_with_both_distributions(installed, tmp_path):
    res = fqtbench("run", "--method", "qat", "--out", str(tmp_path))
    assert res.returncode == 2
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    assert "duplicate" in lines[0] and "'fqtbench'" in lines[0] and "'fqtbench-dup'" in lines[0]


def test_broken_plugin_fails_alone(installed, tmp_path):
    res = fqtbench("run", "--method", "broken", "--out", str(tmp_path))
    assert res.returncode == 2
    assert "fqtbench-broken" in res.stderr and "failed to load" in res.stderr and "Traceback" not in res.stderr
    ok = fqtbench("run", "--method", "fp32", "--out", str(tmp_path), "--set", "trainer.max_epochs=1")
    assert ok.returncode == 0, ok.stderr


def test_runtime_registration_refuses_duplicates():
    reg: Registry = Registry("widget", "fqtbench.tests.none")

    class W:
        name, version, description = "w", "1", "a widget"

    reg.register(W(), dist="a")
    with pytest.raises(DuplicateNameError, match="'a' and 'b'"):
        reg.register(W(), dist="b")
    assert reg.names() == ["w"]


def test_an_entry_point_must_load_an_instance_of_its_own_name():
    reg: Registry = Registry("method", "fqtbench.tests.none")

    class M:
        name, version, description = "m", "1", "a method"

    assert "point it at an instance (e.g. PLUGIN = M())" in reg._entry_point_problem("m", M)
    assert "loads a str with no 'name'" in reg._entry_point_problem("m", "fqtbench_m:METHOD")
    assert "named 'm'; the two names must match" in reg._entry_point_problem("n", M())
    assert reg._entry_point_problem("m", M()) is None


def test_new_method_skeleton_installs_and_its_test_passes(tmp_path):
    res = fqtbench("new-method", "my-q", "--dir", str(tmp_path / "plugin"))
    assert res.returncode == 0, res.stderr
    _pip("install", "--no-deps", "--no-build-isolation", "--no-cache-dir", str(tmp_path / "plugin"))
    try:
        test = subprocess.run([sys.executable, "-m", "pytest", "-q", str(tmp_path / "plugin" / "tests")],
                              capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert test.returncode == 0, test.stdout + test.stderr
        assert "2 passed" in test.stdout
    finally:
        _pip("uninstall", "-y", "fqtbench-my-q")
    bad = fqtbench("new-method", "Bad Name")
    assert bad.returncode == 2 and "Bad Name" in bad.stderr
