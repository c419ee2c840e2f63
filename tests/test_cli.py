"""The CLI end to end on the digits track, and its listing and help output."""

from __future__ import annotations

import pytest

from tests.conftest import only_record


@pytest.mark.parametrize(
    "kind, names",
    [
        ("methods", ["fp32", "qat"]),
        ("models", ["mlp", "cnn-s", "resnet20", "resnet32", "resnet56", "resnet18"]),
        ("datasets", ["digits", "cifar10", "imagefolder"]),
        ("backends", ["reference", "int8", "bitserial"]),
        ("tracks", ["digits", "cifar10-r20-cpu", "cifar10-r20"]),
    ],
)
def test_list(cli, kind, names, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = cli("list", kind)
    assert code == 0, err
    for n in names:
        assert n in out
    if kind != "tracks":
        assert "fqtbench" in out  # the distribution column


@pytest.mark.parametrize("cmd, needles", [
    (["run"], ["--method", "--track", "--set", "--seed", "--out", "--wandb", "--config", "--resume", "Precedence"]),
    (["list"], ["methods", "backends", "tracks"]),
    (["new-method"], ["NAME", "--dir"]),
    ([], ["run", "list", "new-method"]),
])
def test_help_is_useful(cli, cmd, needles):
    code, out, err = cli(*cmd, "--help")
    assert code == 0
    for n in needles:
        assert n in out


@pytest.mark.parametrize("method, bits, bar", [("fp32", None, 97.0), ("qat", 8, 97.0), ("qat", 4, 96.0)])
def test_run_on_digits_learns(cli, tmp_path, method, bits, bar):
    """A method is done when it learns: the issue's digits bars, on seed 0."""
    args = ["run", "--method", method, "--out", str(tmp_path)]
    if bits:
        args += ["--set", f"bits.w={bits}", "--set", f"bits.a={bits}"]
    code, out, err = cli(*args)
    assert code == 0, err
    rec = only_record(tmp_path)
    final = rec.metrics["final"]
    assert final["sim_top1"] >= bar
    if method == "fp32":
        assert final["int_top1"] is None and final["ptq_int_top1"] >= bar - 1.0
    else:
        assert final["int_top1"] >= bar
        assert abs(final["gap"]) <= (0.5 if bits == 8 else 1.0)
    assert "summary" in out
