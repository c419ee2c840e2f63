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

    Precedence of settings: defaults < track < method defaults < --config < --set.
    """
    from .config import resolve
    from .harness.runner import execute

    if wandb is not None and wandb not in ("online", "offline", "disabled"):
        raise UserError(f"--wandb={wandb!r}: allowed: online, offline, disabled")
    overrides = list(set_)
    if resume is not None:
        overrides.append(f"resume={resume}")
    cfg = resolve(method, track, config, overrides, seed=seed, out=out, wandb_mode=wandb)
    err_console.print(f"[bold]fqtbench run[/] {cfg.method} on {cfg.track} (seed {cfg.seed}, exec {cfg.exec}, backend {cfg.engine.backend})")
    record, path = execute(cfg, on_event=lambda stage: err_console.print(f"  [dim]{stage}...[/]"))
    print_summary([record], [path])


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
        "sim top-1 %": _pct(final.get("sim_top1")),
        "train BitOPs": _fmt_bitops(tc.get("train_bitops")),
        "samples / evals": f"{tc.get('samples', '-')}" + (f" / {evals}" if evals else ""),
        "wall s": f"{tc.get('wall_s', 0):.1f}",
        "status": r.status,
    }


def print_summary(records, paths) -> None:
    """One run: a field/value table; several: one row per run."""
    if len(records) == 1:
        table = Table(title="fqtbench run summary", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for k, v in _summary_row(records[0]).items():
            table.add_row(k, v)
        table.add_row("record", str(paths[0]))
    else:
        rows = [_summary_row(r) for r in records]
        table = Table(title="fqtbench runs")
        for col in rows[0]:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*row.values())
    console.print(table)


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
    name: str = typer.Argument(..., help="Method name, e.g. my-quant (letters, digits, '-' and '_')."),
    directory: Optional[Path] = typer.Option(None, "--dir", "-d", help="Where to write the plugin (default: ./fqtbench-<name>)."),
):
    """Write a ready-to-install plugin skeleton (pyproject, method, test) for a new method."""
    from .scaffold import write_plugin

    target = write_plugin(name, directory)
    console.print(f"wrote plugin skeleton to {target}")
    console.print(f"  pip install -e {target} && fqtbench run --method {name}")
    console.print(f"  pytest {target}/tests")


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
        app(args=argv, standalone_mode=False)
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
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
