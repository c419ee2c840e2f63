"""Leaderboards: run records -> tables, plots, a static page; mirrored to W&B on request."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..records import atomic_write_text
from .aggregate import METRICS, aggregate, collect, expected_seeds, setting_index
from .render import html_page, markdown, plot_track, write_csv

PLOTS = (("train_bitops", "training BitOPs", "bitops"), ("model_size_kb", "model size (KiB)", "size"))


@dataclass
class Leaderboard:
    out: Path
    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    failed: list[dict[str, Any]]


def build(runs: list[str | Path], out: str | Path, note: str | None = None) -> Leaderboard:
    """Read every record under `runs`, aggregate, and write README.md, results.csv, index.html and plots.

    `note`: a paragraph for the reader (the machine the runs shared, known caveats), on both pages."""
    roots = [Path(r) for r in runs]
    for r in roots:
        if not r.is_dir():
            raise DataError(f"--runs {r}: " + ("a file, not a folder of run records" if r.exists() else "no such folder"))
    if Path(out).exists() and not Path(out).is_dir():
        raise DataError(f"--out {out}: a file, not a folder (the leaderboard is a folder of pages and plots)")
    ok_runs, failed = collect(roots)
    if not ok_runs:
        raise DataError(f"no ok run records under {', '.join(map(str, roots))}")
    rows = aggregate(ok_runs, expected_seeds(roots), setting_index(roots))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    plots: dict[str, list[Path]] = {}
    for track in sorted({r["track"] for r in rows}):
        for key, label, suffix in PLOTS:
            path = out / f"{track}-{suffix}.png"
            plot_track(rows, track, key, label, path)
            plots.setdefault(track, []).append(path)
    write_csv(rows, out / "results.csv")
    atomic_write_text(out / "README.md", markdown(rows, failed, {t: [p.name for p in ps] for t, ps in plots.items()}, generated, note))
    atomic_write_text(out / "index.html", html_page(rows, plots, generated, note))
    return Leaderboard(out, rows, ok_runs, failed)


def publish(folder: str | Path, project: str, entity: str | None = None, mode: str = "offline") -> tuple[str, Path | None]:
    """Log each track's table as a wandb.Table and the whole folder as an artifact; returns the mode
    used and, offline, the W&B run folder that `wandb sync` uploads later."""
    import csv

    from ..tracking import _prepare_env, decide_mode

    folder = Path(folder)
    if not (folder / "results.csv").is_file():
        raise DataError(f"{folder} has no results.csv: run `fqtbench leaderboard build --out {folder}` first")
    mode = decide_mode(mode)
    if mode == "disabled":
        return mode, None
    _prepare_env(mode)
    import wandb

    with open(folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    run = wandb.init(project=project, entity=entity, job_type="leaderboard", mode=mode, dir=str(folder.parent),
                     name=f"leaderboard-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}")
    cols = list(rows[0].keys()) if rows else []
    for track in sorted({r["track"] for r in rows}):
        run.log({f"leaderboard/{track}": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows if r["track"] == track])})
    art = wandb.Artifact("leaderboard", type="leaderboard", description="fqtbench leaderboard (tables, plots, page)")
    art.add_dir(str(folder))
    run.log_artifact(art)
    run_folder = Path(run.dir).parent if mode == "offline" else None
    run.finish()
    # finish() can return before the W&B service has written the offline log (seen once, under
    # load: only the file header on disk); shutting the service down waits for it
    wandb.teardown()
    return mode, run_folder


__all__ = ["METRICS", "Leaderboard", "build", "publish"]
