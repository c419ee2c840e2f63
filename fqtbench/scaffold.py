"""`fqtbench new-method NAME`: a ready-to-install plugin skeleton with a passing test."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,40}$")

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fqtbench-{name}"
version = "0.1.0"
description = "{name}: a fqtbench method plugin"
requires-python = ">=3.10"
dependencies = ["fqtbench"]

[project.entry-points."fqtbench.methods"]
{name} = "{pkg}:METHOD"

[tool.setuptools]
packages = ["{pkg}"]
"""

METHOD = '''\
"""{name}: a fqtbench method plugin.

Start from this straight-through QAT example and change `build` (and `precision`, `Config`) to
your method. Bump `version` whenever the behaviour changes: run records carry name@version.
"""

from __future__ import annotations

from fqtbench.config import ResolvedConfig, StrictModel
from fqtbench.harness import FQTModule
from fqtbench.method import Method
from fqtbench.quant.attach import attach_standard


class Config(StrictModel):
    """Options of this method: set them with --set {name}.<option>=<value>."""

    weight_granularity: str = "tensor"


class {cls}(Method):
    name = "{name}"
    version = "1"
    description = "{name}: describe the method in one line"
    Config = Config

    def build(self, model, cfg: ResolvedConfig, data) -> FQTModule:
        attach_standard(model, w_bits=cfg.bits.w, a_bits=cfg.bits.a, weight_granularity=cfg.params.weight_granularity)
        return FQTModule(model, cfg)


METHOD = {cls}()
'''

TEST = '''\
"""Runs the plugin end to end on the digits track through the fqtbench CLI."""

import json
import os

from fqtbench import registry
from fqtbench.cli import main


def test_registered():
    assert "{name}" in registry.methods.names()


def test_learns_on_digits(tmp_path):
    os.environ["WANDB_MODE"] = "disabled"
    code = main(["run", "--method", "{name}", "--out", str(tmp_path), "--set", "trainer.max_epochs=8"])
    assert code == 0
    (record,) = tmp_path.glob("*/record.json")
    data = json.loads(record.read_text())
    assert data["status"] == "ok"
    assert data["metrics"]["final"]["int_top1"] >= 90.0
'''

README = """\
# fqtbench-{name}

A method plugin for fqtbench, the fully-quantized training benchmark.

    pip install -e .
    fqtbench list methods          # shows {name}
    fqtbench run --method {name}   # digits track
    pytest tests
"""


def write_plugin(name: str, directory: Path | None = None) -> Path:
    if not NAME_RE.match(name):
        raise UserError(f"new-method {name!r}: a name is lower-case letters, digits, '-' and '_', starting with a letter")
    from . import registry

    if name in registry.methods.names():
        raise UserError(f"new-method {name!r}: a method of that name is already installed; choose another name")
    ident = name.replace("-", "_")
    pkg = f"fqtbench_plugin_{ident}"
    cls = "".join(part.capitalize() for part in re.split(r"[-_]", name)) + "Method"
    target = Path(directory) if directory else Path(f"fqtbench-{name}")
    if target.exists() and not target.is_dir():
        raise UserError(f"new-method --dir {target}: a file, not a folder")
    if target.exists() and any(target.iterdir()):
        raise UserError(f"new-method: {target} exists and is not empty")
    (target / pkg).mkdir(parents=True, exist_ok=True)
    (target / "tests").mkdir(exist_ok=True)
    fmt = {"name": name, "pkg": pkg, "cls": cls}
    (target / "pyproject.toml").write_text(PYPROJECT.format(**fmt))
    (target / pkg / "__init__.py").write_text(METHOD.format(**fmt))
    (target / "tests" / f"test_{ident}.py").write_text(TEST.format(**fmt))
    (target / "README.md").write_text(README.format(**fmt))
    return target
