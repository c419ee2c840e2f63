"""Shared test set-up: W&B off unless a test turns it on, helpers to call the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["WANDB_ERROR_REPORTING"] = "false"

REPO = Path(__file__).resolve().parents[1]
CIFAR_ROOT = Path(os.environ.get("FQTBENCH_CIFAR_ROOT", REPO.parent / "shared" / "data" / "cifar10-jpeg"))


def cifar_available() -> bool:
    return (CIFAR_ROOT / "train").is_dir() and (CIFAR_ROOT / "test").is_dir()


requires_cifar = pytest.mark.skipif(
    not cifar_available(), reason=f"CIFAR-10 ImageFolder copy not found at {CIFAR_ROOT} (set FQTBENCH_CIFAR_ROOT)"
)


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from fqtbench.cli import main

    def _run(*args: str):
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


def only_record(folder: Path):
    from fqtbench.records import load_record

    paths = sorted(Path(folder).glob("*/record.json"))
    assert len(paths) == 1, paths
    return load_record(paths[0])
