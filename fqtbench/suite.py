"""Suites: a grid of methods x tracks x settings x seeds, run by an existing executor.

A suite file (``configs/suites/NAME.yaml``)::

    name: digits
    tracks: [digits]
    seeds: [0, 1, 2]
    overrides: {trainer.threads: 1}          # --set for every run (optional)
    track_overrides:                         # --set per track (optional)
      cifar10-r20-cpu: {data.root: ../shared/data/cifar10-jpeg}
    methods:
      - method: fp32
      - method: qat
        settings: [{bits.w: 8, bits.a: 8}, {bits.w: 4, bits.a: 4}]

Each cell is resolved to a full run config; a cell whose identity hash already has an ``ok`` record
under the output folder is skipped, so an interrupted suite resumes where it stopped. Every run is
its own ``fqtbench run`` process (a crash or a kill takes one run down, not the suite); a failed
run leaves its failed record and the suite goes on. Executors: ``local`` (``--jobs N`` processes on
this machine) and ``slurm`` through submitit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import Field

from .config import ResolvedConfig, StrictModel, configs_root, load_yaml, resolve, save_resolved, validate
from .errors import ConfigError, UserError
from .records import atomic_write_text, iter_records

MANIFEST = "suite.json"


class MethodEntry(StrictModel):
    method: str
    settings: list[dict[str, Any]] = Field(default_factory=lambda: [{}])
    overrides: dict[str, Any] = Field(default_factory=dict)


class SuiteSpec(StrictModel):
    name: str
    tracks: list[str] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    overrides: dict[str, Any] = Field(default_factory=dict)
    track_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    methods: list[MethodEntry] = Field(min_length=1)


@dataclass
class Cell:
    """One run of the grid."""

    method: str
    track: str
    seed: int
    setting: dict[str, Any]
    cfg: ResolvedConfig
    status: str = "pending"  # pending | skipped | ok | failed: ... | interrupted
    record: str | None = None

    @property
    def key(self) -> str:
        return self.cfg.identity_hash()

    @property
    def label(self) -> str:
        s = " ".join(f"{k}={v}" for k, v in self.setting.items())
        return f"{self.method} {self.track} seed={self.seed}" + (f" {s}" if s else "")


def load_suite(path: str | Path) -> SuiteSpec:
    p = Path(path)
    if not p.is_file():
        candidate = configs_root() / "suites" / f"{path}.yaml"
        if candidate.is_file():
            p = candidate
        elif not p.exists():
            shipped = sorted(f.stem for f in (configs_root() / "suites").glob("*.yaml"))
            raise ConfigError(f"suite {str(path)!r}: no such file, nor a shipped suite; shipped: {', '.join(shipped)}")
    return validate(SuiteSpec, load_yaml(p, "suite file"))


def _sets(d: dict[str, Any]) -> list[str]:
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in d.items()]


def expand(spec: SuiteSpec, out: Path) -> list[Cell]:
    """Every cell of the grid, resolved and validated (a bad cell is an error before anything runs)."""
    cells = []
    for entry in spec.methods:
        for setting in entry.settings:
            for track in spec.tracks:
                for seed in spec.seeds:
                    over = {**spec.overrides, **spec.track_overrides.get(track, {}), **entry.overrides, **setting}
                    try:
                        cfg = resolve(entry.method, track, overrides=_sets(over), seed=seed, out=str(out))
                    except UserError as exc:
                        raise ConfigError(f"suite {spec.name}, {entry.method} on {track} {setting or ''}: {exc}") from None
                    cells.append(Cell(entry.method, track, seed, dict(setting), cfg))
    return cells


def mark_done(cells: list[Cell], out: Path) -> None:
    """Cells with an ok record of the same identity under `out` are skipped."""
    done = {}
    if out.exists():
        for path, rec in iter_records(out):
            if rec.ok:
                done[rec.config_hash] = str(path)
    for c in cells:
        if c.key in done:
            c.status, c.record = "skipped", done[c.key]


def write_manifest(spec: SuiteSpec, cells: list[Cell], out: Path) -> None:
    """What the suite asked for; the leaderboard marks groups with fewer seeds than this."""
    expected: dict[str, int] = {}
    for c in cells:
        k = f"{c.track}|{c.method}|{json.dumps(c.setting, sort_keys=True)}"
        expected[k] = expected.get(k, 0) + 1
    doc = {"name": spec.name, "seeds": spec.seeds, "tracks": spec.tracks,
           "cells": [{"method": c.method, "track": c.track, "seed": c.seed, "setting": c.setting, "config_hash": c.key} for c in cells]}
    atomic_write_text(out / MANIFEST, json.dumps(doc, indent=2))


# ---- executors ------------------------------------------------------------------------------------


def _job_files(cell: Cell, out: Path) -> Path:
    path = out / ".suite" / f"{cell.key}.yaml"
    save_resolved(cell.cfg, path)
    return path


def run_cell_process(config_path: str, method: str, threads: int | None) -> tuple[int, str]:
    """Run one cell as its own `fqtbench run` process; returns (exit code, last stderr line)."""
    cmd = [sys.executable, "-m", "fqtbench.cli", "run", "--method", method, "--config", config_path]
    env = dict(os.environ)
    if threads:  # through the environment: a --set would change the run's identity and defeat resuming
        env["OMP_NUM_THREADS"] = str(threads)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    return res.returncode, (lines[-1] if lines else "")


def run_local(cells: list[Cell], out: Path, jobs: int, on_done: Callable[[Cell], None]) -> None:
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs)) if jobs > 1 else None
    todo = [c for c in cells if c.status == "pending"]

    def one(cell: Cell) -> Cell:
        code, last = run_cell_process(str(_job_files(cell, out)), cell.method, threads)
        _settle(cell, out, code, last)
        on_done(cell)
        return cell

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, todo))


def check_executor(executor: str) -> None:
    """Refuse an executor this machine cannot run, before anything is written."""
    if executor == "local":
        return
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError(f"--executor {executor} needs submitit: pip install submitit") from None
    if executor == "slurm" and shutil.which("sbatch") is None:
        raise UserError("--executor slurm: no SLURM on this machine (sbatch is not on PATH); use --executor local")


def run_submitit(cells: list[Cell], out: Path, cluster: str, slurm: dict[str, Any], on_done: Callable[[Cell], None]) -> None:
    """Submit every pending cell as one job (a SLURM array) through submitit and wait for them."""
    check_executor("slurm" if cluster == "slurm" else "submitit-local")
    import submitit

    todo = [c for c in cells if c.status == "pending"]
    if not todo:
        return
    executor = submitit.AutoExecutor(folder=str(out / ".suite" / "submitit"), cluster=cluster)
    params = {k: v for k, v in slurm.items() if v is not None}
    if cluster != "slurm":  # submitit's local executor (tests) knows only the generic parameters
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    executor.update_parameters(**params)
    paths = [str(_job_files(c, out)) for c in todo]
    with executor.batch():
        jobs = [executor.submit(run_cell_process, p, c.method, None) for p, c in zip(paths, todo)]
    for job, cell in zip(jobs, todo):
        try:
            code, last = job.result()
        except Exception as exc:  # the job itself died (node failure, time limit)
            code, last = 1, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _settle(cell, out, code, last)
        on_done(cell)


def _settle(cell: Cell, out: Path, code: int, last_line: str) -> None:
    """The cell's status is its newest finished record's; without one, the process's exit."""
    finished = [(rec.finished_at or "", str(path), rec.status) for path, rec in iter_records(out)
                if rec.config_hash == cell.key and rec.status != "running"]
    if finished:
        _, cell.record, cell.status = max(finished)
    else:
        cell.status = "ok" if code == 0 else f"failed: {last_line.removeprefix('error: ') or f'exit code {code}'}"


@dataclass
class SuiteResult:
    cells: list[Cell] = field(default_factory=list)
    wall_s: float = 0.0

    def count(self, prefix: str) -> int:
        return sum(c.status.startswith(prefix) for c in self.cells)
