"""Shared helpers for benchmarks: timing and output (a rich table, or JSON with --json)."""

from __future__ import annotations

import json
import statistics
import time
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
from rich.console import Console
from rich.table import Table

from ..errors import UserError

# Input shapes of the architectures the engine benchmarks build (untrained: timings do not depend on weights).
SHAPES = {
    "cnn-s": SimpleNamespace(image_size=(8, 8), in_channels=1, num_classes=10, pixel_max=16, mean=(0.3,), std=(0.4,)),
    "resnet20": SimpleNamespace(image_size=(32, 32), in_channels=3, num_classes=10, pixel_max=255, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26)),
}


def shape_info(name: str) -> SimpleNamespace:
    if name not in SHAPES:
        raise UserError(f"--models: unknown model {name!r}; allowed: {', '.join(SHAPES)}")
    return SHAPES[name]


def time_call(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5, min_time: float = 0.0) -> float:
    """Median seconds per call after `warmup` calls; repeats at least `repeat` times (and `min_time` s)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def emit(title: str, rows: Sequence[dict[str, Any]], as_json: bool, notes: Sequence[str] = ()) -> None:
    """Print rows as a table (or one JSON document with the rows, notes and machine facts)."""
    if as_json:
        print(json.dumps({"title": title, "rows": list(rows), "notes": list(notes), "machine": machine()}, indent=2))
        return
    console = Console()
    if not console.is_terminal:  # piped into a log: room for the whole table instead of 80 columns
        console = Console(width=160)
    table = Table(title=title)
    cols = list(rows[0].keys()) if rows else []
    for c in cols:
        table.add_column(c, justify="right" if isinstance(rows[0][c], (int, float)) else "left")
    for r in rows:
        table.add_row(*[_fmt(r[c]) for c in cols])
    console.print(table)
    for n in notes:
        console.print(n)
    m = machine()
    console.print(f"[dim]torch {m['torch']}, {m['threads']} threads, {m['device']}[/]")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 1e6:
            return f"{v:,.2f}"
        return f"{v:.3g}"
    return str(v)


def machine() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
