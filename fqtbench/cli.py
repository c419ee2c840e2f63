"""The `fqtbench` command line.

    fqtbench run --method ccea [--track digits] [--set bits.w=3] [--seed 0]
    fqtbench list methods|models|datasets|backends|tracks
    fqtbench new-method NAME

User mistakes print one line (``error: ...``) and exit with code 2; there is no traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import UserError

app = typer.Typer(
    name="fqtbench",
    help="Benchmark suite for fully-quantized training: run methods on shared integer backends and build leaderboards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console()
err_console = Console(stderr=True)

LIST_KINDS = ("methods", "models", "datasets", "backends", "tracks")


def _version(value: bool):
    if value:
        console.print(f"fqtbench {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    """fqtbench: fully-quantized training methods side by side on the same integer arithmetic."""


# ---------------------------------------------------------------------------------------------- run


@app.command()
def run(
    method: str = typer.Option(..., "--method", "-m", help="Method to train (see `fqtbench list methods`)."),
    track: Optional[str] = typer.Option(None, "--track", "-t", help="Track: dataset + model + budget (default: digits)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file with config sections, applied after track and method defaults."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override one key, e.g. --set bits.w=4 --set ccea.pop_size=64 (repeatable)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Folder for run records (default: runs/)."),
    wandb: Optional[str] = typer.Option(None, "--wandb", help="W&B mode: offline (default), online (needs an API key) or disabled."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Resume an interrupted run from its folder (its saved config is used)."),
):
    """Train one method on one track, evaluate it on the shared integer engine, write its run record.

    Precedence of settings: defaults < track < method defaults < the track's settings for the method
    < --config < --set.
    """
    from .config import resolve
    from .harness.runner import execute, is_rank_zero

    if wandb is not None and wandb not in ("online", "offline", "disabled"):
        raise UserError(f"--wandb={wandb!r}: allowed: online, offline, disabled")
    overrides = list(set_)
    if resume is not None:
        ignored = [f"--set {v}" for v in set_] + [f"{flag} {v}" for flag, v in (
            ("--track", track), ("--config", config), ("--seed", seed), ("--out", out), ("--wandb", wandb)) if v is not None]
        if ignored:
            raise UserError(f"--resume continues a run with its saved config, so these would be ignored: {', '.join(ignored)}")
        overrides.append(f"resume={resume}")
    cfg = resolve(method, track, config, overrides, seed=seed, out=out, wandb_mode=wandb)
    shown = cfg
    if resume is not None:  # the header names the resumed run's own config, not this command line's
        from .harness.runner import prepare_resume

        shown, _ = prepare_resume(cfg)
    if not is_rank_zero():  # an extra DDP rank: rank 0 reports
        execute(cfg)
        return
    err_console.print(f"[bold]fqtbench run[/] {shown.method} on {shown.track} (seed {shown.seed}, exec {shown.exec}, "
                      f"backend {shown.engine.backend})" + (f", resuming {resume}" if resume is not None else ""))
    record, path = execute(cfg, on_event=lambda stage: err_console.print(f"  [dim]{stage}...[/]"))
    print_summary([record], [path])


@app.command()
def reevaluate(
    run_dirs: list[Path] = typer.Argument(..., help="Folders of finished runs (each with record.json and checkpoints/last.ckpt)."),
):
    """Score finished runs again on the current integer engine, from their final checkpoints (no training).

    For when the shared engine changes: every row of a leaderboard must be scored by the same
    engine. Each record gets the new metrics, layers, size and BitOPs; the previous ones are kept
    in its extra.reevaluations. A run of an older method version is refused (run it again instead).
    """
    from .harness.runner import reevaluate as reevaluate_run

    records, paths, refused = [], [], []
    for run_dir in run_dirs:
        err_console.print(f"[bold]fqtbench reevaluate[/] {run_dir}", soft_wrap=True)
        try:
            record, path = reevaluate_run(run_dir)
        except UserError as exc:  # one folder's problem must not stop the others
            err_console.print(f"  refused: {exc}", soft_wrap=True, markup=False)
            refused.append(str(run_dir))
            continue
        before, after = record.extra["reevaluations"][-1]["metrics"]["final"], record.metrics["final"]
        err_console.print(f"  int top-1 {_pct(before.get('int_top1'))} -> {_pct(after.get('int_top1'))}"
                          + (f", fp32 PTQ {_pct(before.get('ptq_int_top1'))} -> {_pct(after.get('ptq_int_top1'))}"
                             if after.get("ptq_int_top1") is not None else ""))
        records.append(record)
        paths.append(path)
    if records:
        print_summary(records, paths)
    if refused:
        raise UserError(f"{len(refused)} of {len(run_dirs)} runs not re-evaluated (see above): {', '.join(refused)}")


def _fmt_bitops(v) -> str:
    if v is None:
        return "-"
    v = float(v)
    for unit, f in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if v >= f:
            return f"{v / f:.2f} {unit}"
    return f"{v:.0f}"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _summary_row(r) -> dict[str, str]:
    final = (r.metrics or {}).get("final", {})
    tc = r.training_cost or {}
    int_top1 = final.get("int_top1")
    if int_top1 is None and final.get("ptq_int_top1") is not None:
        int_cell = f"- (fp32; {final.get('ptq_bits')}-bit PTQ: {final['ptq_int_top1']:.2f})"
    else:
        int_cell = _pct(int_top1)
    evals = tc.get("fitness_evals") or None
    return {
        "method": r.method,
        "track": r.track,
        "bits": r.bits_tag,
        "int top-1 %": int_cell,
        # a method that starts from a quantized network (ccea) records where it started: the
        # search's own effect is the difference, which the final number alone hides
        **({"start int top-1 %": _pct(r.extra["start_int_top1"])} if (r.extra or {}).get("start_int_top1") is not None else {}),
        "sim top-1 %": _pct(final.get("sim_top1")),
        "train BitOPs": _fmt_bitops(tc.get("train_bitops")),
        "samples / evals": f"{tc.get('samples', '-')}" + (f" / {evals}" if evals else ""),
        "wall s": f"{tc.get('wall_s', 0):.1f}",
        "status": r.status,
    }


def print_summary(records, paths) -> None:
    """One run: a field/value table, then its record's path on a line of its own (a path folded
    inside a table cell cannot be copied); several: one row per run."""
    if len(records) == 1:
        table = Table(title="fqtbench run summary", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for k, v in _summary_row(records[0]).items():
            table.add_row(k, v)
    else:
        rows = [_summary_row(r) for r in records]
        cols = list(max(rows, key=len))  # the fullest row's columns (a ccea run adds its start), in its order
        table = Table(title="fqtbench runs")
        for col in cols:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*(row.get(c, "-") for c in cols))
    console.print(table)
    if len(records) == 1:
        console.print(f"record: {paths[0]}", soft_wrap=True, highlight=False)


# --------------------------------------------------------------------------------------------- list


@app.command("list")
def list_(
    kind: str = typer.Argument(..., help="One of: methods, models, datasets, backends, tracks."),
    pattern: Optional[str] = typer.Argument(None, help="Only names matching this shell pattern, e.g. 'resnet*'."),
):
    """Show registered plugins (name, version, distribution, description) or tracks.

    A plugin that fails to import is listed with its error; the others keep working.
    """
    import fnmatch

    from . import registry
    from .config import list_tracks, track_description

    if kind not in LIST_KINDS:
        raise UserError(f"list {kind!r}: allowed: {', '.join(LIST_KINDS)}")
    table = Table(title=f"fqtbench {kind}")
    if kind == "tracks":
        for col in ("name", "description"):
            table.add_column(col, overflow="fold")
        for name in list_tracks():
            if pattern is None or fnmatch.fnmatch(name, pattern):
                table.add_row(name, track_description(name))
        console.print(table)
        return
    for col in ("name", "version", "distribution", "description"):
        table.add_column(col, overflow="fold")
    for info in registry.REGISTRIES[kind].infos():
        if pattern is not None and not fnmatch.fnmatch(info.name, pattern):
            continue
        desc = info.description if info.ok else f"[red]BROKEN: {info.error}[/]"
        table.add_row(info.name, info.version, info.dist, desc)
    console.print(table)


# --------------------------------------------------------------------------------------- new-method


@app.command("new-method")
def new_method(
    name: str = typer.Argument(..., metavar="NAME", help="Method name, e.g. my-quant (lower-case letters, digits, '-' and '_', starting with a letter)."),
    directory: Optional[Path] = typer.Option(None, "--dir", "-d", help="Where to write the plugin (default: ./fqtbench-<name>)."),
):
    """Write a ready-to-install plugin skeleton (pyproject, method, test) for a new method."""
    from .scaffold import write_plugin

    target = write_plugin(name, directory)
    console.print(f"wrote plugin skeleton to {target}")
    console.print(f"  pip install -e {target} && fqtbench run --method {name}")
    console.print(f"  pytest {target}/tests")


# -------------------------------------------------------------------------------------------- suite


@app.command()
def suite(
    file: str = typer.Argument(..., help="Suite YAML (or the name of one under configs/suites/)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the suite's runs (default: runs/suites/<name>)."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Runs at a time on this machine (local executor)."),
    executor: str = typer.Option("local", help="local, slurm (submitit) or submitit-local (submitit's local executor)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would run and what is already done; run nothing."),
    partition: Optional[str] = typer.Option(None, help="SLURM partition (slurm executor)."),
    time_min: int = typer.Option(120, help="Time limit per job in minutes (submitit executors)."),
    gpus: int = typer.Option(0, help="GPUs per job (slurm executor); a run can use them with trainer.devices."),
    cpus_per_task: Optional[int] = typer.Option(None, help="CPUs per SLURM task."),
    array_parallelism: int = typer.Option(16, help="At most this many SLURM array jobs at once."),
    nodes: int = typer.Option(1, min=1, help="Nodes per job (slurm executor); match the runs' trainer.num_nodes."),
    tasks_per_node: int = typer.Option(1, min=1, help="Tasks (DDP processes) per node (slurm executor); match the "
                                                      "runs' trainer.devices. Lightning reads the ranks from SLURM."),
):
    """Run a grid of methods x tracks x settings x seeds; cells with an ok record are skipped.

    Every run is its own `fqtbench run` process; a failed run is recorded and the suite goes on.
    Re-running an interrupted suite runs only what is missing.
    """
    import time as _time

    from .suite import check_executor, expand, load_suite, mark_done, run_local, run_submitit, write_manifest

    if executor not in ("local", "slurm", "submitit-local"):
        raise UserError(f"--executor={executor!r}: allowed: local, slurm, submitit-local")
    if not dry_run:
        check_executor(executor)
    spec = load_suite(file)
    out = out or Path("runs") / "suites" / spec.name
    cells = expand(spec, out)
    mark_done(cells, out)
    pending = [c for c in cells if c.status == "pending"]
    err_console.print(f"[bold]suite {spec.name}[/]: {len(cells)} runs, {len(cells) - len(pending)} already done, {len(pending)} to run -> {out}")
    if dry_run:
        _suite_table(cells, title=f"suite {spec.name} (dry run)")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(spec, cells, out)
    t0 = _time.time()
    done = [0]

    def on_done(cell):
        done[0] += 1
        err_console.print(f"  [{done[0]}/{len(pending)}] {cell.label}: {cell.status}", markup=False, highlight=False)

    if executor == "local":
        run_local(cells, out, jobs, on_done)
    else:
        slurm = {"timeout_min": time_min, "slurm_partition": partition, "gpus_per_node": gpus or None,
                 "cpus_per_task": cpus_per_task, "slurm_array_parallelism": array_parallelism,
                 "nodes": nodes, "tasks_per_node": tasks_per_node}
        run_submitit(cells, out, "slurm" if executor == "slurm" else "local", slurm, on_done)
    _suite_table(cells, title=f"suite {spec.name}: {_time.time() - t0:.0f} s")
    failed = [c for c in cells if c.status.startswith("failed") or c.status == "interrupted"]
    if failed:
        raise typer.Exit(code=1)


def _suite_table(cells, title: str) -> None:
    table = Table(title=title)
    for col in ("method", "track", "seed", "setting", "status"):
        table.add_column(col, overflow="fold")
    for c in cells:
        setting = " ".join(f"{k}={v}" for k, v in c.setting.items()) or "-"
        status = {"pending": "would run"}.get(c.status, c.status)
        table.add_row(c.method, c.track, str(c.seed), setting, status)
    counts = {k: sum(1 for c in cells if c.status.startswith(k)) for k in ("ok", "skipped", "failed", "pending")}
    console.print(table)
    console.print(f"ran ok: {counts['ok']}, skipped (already done): {counts['skipped']}, failed: {counts['failed']}"
                  + (f", to run: {counts['pending']}" if counts["pending"] else ""))


# -------------------------------------------------------------------------------------- leaderboard

leaderboard_app = typer.Typer(name="leaderboard", help="Build and publish leaderboards from run records.",
                              no_args_is_help=True, add_completion=False, rich_markup_mode=None)
app.add_typer(leaderboard_app, name="leaderboard")


@leaderboard_app.command("build")
def leaderboard_build(
    runs: list[Path] = typer.Option([Path("runs")], "--runs", "-r", help="Folders with run records (repeatable)."),
    out: Path = typer.Option(Path("leaderboard"), "--out", "-o", help="Output folder."),
    note: Optional[str] = typer.Option(None, "--note", help="A paragraph shown under the title (the machine, caveats)."),
):
    """Aggregate run records over seeds into README.md, results.csv, index.html and PNG plots."""
    from .leaderboard import build

    lb = build(runs, out, note)
    console.print(f"{len(lb.rows)} rows from {len(lb.runs)} runs ({len(lb.failed)} not ok) -> {lb.out}")


@leaderboard_app.command("publish")
def leaderboard_publish(
    wandb_project: str = typer.Option(..., "--wandb-project", help="W&B project to publish to."),
    folder: Path = typer.Option(Path("leaderboard"), "--dir", help="A built leaderboard folder."),
    entity: Optional[str] = typer.Option(None, help="W&B entity."),
    mode: str = typer.Option("offline", help="offline (default; `wandb sync` later), online (needs a key), disabled."),
):
    """Log the tables as wandb.Tables and the folder as an artifact (works offline)."""
    from .leaderboard import publish

    if mode not in ("online", "offline", "disabled"):
        raise UserError(f"--mode={mode!r}: allowed: online, offline, disabled")
    used, offline_run = publish(folder, wandb_project, entity, mode)
    console.print(f"published {folder} to W&B project {wandb_project} ({used})")
    if offline_run is not None:
        console.print(f"  offline run: {offline_run}; upload it with `wandb sync {offline_run}`",
                      markup=False, highlight=False, soft_wrap=True)


# -------------------------------------------------------------------------------------------- bench

from .bench import load_benchmarks  # noqa: E402

app.add_typer(load_benchmarks(), name="bench")


# ---------------------------------------------------------------------------------------------- main


def _is_click_exception(exc: BaseException) -> bool:
    return any(c.__name__ == "ClickException" for c in type(exc).__mro__) and hasattr(exc, "format_message")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one line and exit code 2."""
    from .harness.runner import RunInterrupted

    try:
        # Without standalone mode click *returns* the code of a typer.Exit instead of raising it.
        code = app(args=argv, standalone_mode=False)
    except UserError as exc:
        if os.environ.get("FQTBENCH_DEBUG") and exc.__cause__ is not None:
            import traceback

            traceback.print_exception(exc.__cause__)
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except RunInterrupted as exc:
        err_console.print(f"{exc}", markup=False, highlight=False)
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        return 130
    except Exception as exc:  # click usage errors (typer may vendor its own click)
        if type(exc).__name__ == "Exit" and hasattr(exc, "exit_code"):
            return exc.exit_code
        if type(exc).__name__ == "Abort":
            err_console.print("aborted", markup=False)
            return 130
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `fqtbench`: the help is the answer
            console.print(exc.format_message(), markup=False, highlight=False)
            return 0
        if _is_click_exception(exc):
            err_console.print(f"error: {exc.format_message()}", markup=False, highlight=False, soft_wrap=True)
            return exc.exit_code
        raise
    return code if isinstance(code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
