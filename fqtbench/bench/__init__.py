"""Performance benchmarks: `fqtbench bench <name>`.

Each module in this package adds one subcommand to `bench_app` (modules are imported
automatically). Benchmarks measure side by side in one process and print ratios, so a number
never depends on another run's machine state; `--json` prints the same rows for machines.
Speed targets are checked here, never by timed assertions in tests.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

bench_app = typer.Typer(
    name="bench",
    help="Performance benchmarks (ratios measured side by side in one run).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


def load_benchmarks() -> typer.Typer:
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_") and mod.name != "common":
            importlib.import_module(f"{__name__}.{mod.name}")
    return bench_app
