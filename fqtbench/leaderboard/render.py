"""Leaderboard outputs: markdown tables, CSV, PNG plots and a self-contained sortable HTML page."""

from __future__ import annotations

import base64
import csv
import math
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader

from .aggregate import METRIC, METRICS

Y_SPAN = 15.0  # points below the best row that a plot's y-axis shows

CSV_COLUMNS = ["track", "method", "bits", "n", "expected_n", "incomplete", "seeds"] + [m.key for m in METRICS]


def fmt(key: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    m = METRIC.get(key)
    return m.fmt.format(v) if m and isinstance(v, (int, float)) else str(v)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (" ".join(map(str, r[k])) if k == "seeds" else ("" if r.get(k) is None else r.get(k))) for k in CSV_COLUMNS})


MD_COLUMNS = ["method", "bits", "n", "int_top1", "int_top1_std", "int_top1_ci95", "sim_top1", "gap", "gap_to_fp32",
              "train_bitops", "pretrain_bitops", "evals_or_samples", "wall_s", "model_size_kb", "inference_bitops", "avg_w_bits"]


def markdown(rows: list[dict[str, Any]], failed: list[dict[str, Any]], plots: dict[str, list[str]], generated: str,
             note: str | None = None) -> str:
    out = ["# fqtbench leaderboard", "",
           f"Generated {generated} by `fqtbench leaderboard build` from local run records. Integer top-1 is measured "
           "by the shared integer engine on every method's exported IntModel; the simulated top-1 is the method's own "
           "evaluation; `int − fp32` compares with the fp32 row's (float) accuracy on the same track. Means over seeds; "
           "± is the sample standard deviation and the 95% Student-t interval. Rows marked ⚠ have fewer seeds than "
           "their suite asked for. fp32 rows have no integer model: their 8-bit post-training-quantized integer "
           "accuracy is given as a reference. Training BitOPs are the method's own; methods that start from the "
           "track's fp32 network (ccea, bsq) also list that pretraining's BitOPs, paid once per seed.", ""]
    if note:
        out += [note, ""]
    for track in sorted({r["track"] for r in rows}):
        out += [f"## {track}", ""]
        head = [METRIC[c].title if c in METRIC else c for c in MD_COLUMNS]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in (r for r in rows if r["track"] == track):
            cells = []
            for c in MD_COLUMNS:
                v = fmt(c, r.get(c))
                if c == "n" and r.get("incomplete"):
                    v = f"⚠ {r['n']}/{r['expected_n']}"
                if c == "int_top1" and r.get("int_top1") is None and r.get("ptq_int_top1") is not None:
                    v = f"– (PTQ-8: {fmt('ptq_int_top1', r['ptq_int_top1'])})"
                cells.append(v)
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        for p in plots.get(track, []):
            out += [f"![{p}]({p})", ""]
    if failed:
        out += ["## Runs that did not finish", "", "| track | method | bits | seed | status |", "|---|---|---|---|---|"]
        out += [f"| {f['track']} | {f['method']} | {f['bits']} | {f['seed']} | {f['status']} |" for f in failed]
        out.append("")
    return "\n".join(out)


def plot_track(rows: list[dict[str, Any]], track: str, x_key: str, x_label: str, path: Path) -> None:
    """Integer top-1 (fp32 rows: float, hollow) against `x_key`, log x, one colour per method.

    The y-axis spans at most Y_SPAN points below the best row, so one far-off row (say a method
    from a random start) does not flatten every other difference; such rows sit on the bottom edge
    as a down-triangle labelled with their real value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.6), dpi=110)
    pts = [r for r in rows if r["track"] == track and r.get(x_key)]
    y_of = {id(r): (r["int_top1"] if r["int_top1"] is not None else r["sim_top1"]) for r in pts}
    ys = [y for y in y_of.values() if y is not None]
    if ys:
        top = max(ys)
        low = max(min(ys), top - Y_SPAN)
        ax.set_ylim(low - 0.08 * (top - low + 0.5), top + 0.08 * (top - low + 0.5))
    markers = "osD^v<>phX*"
    offsets = [(5, 5), (5, -11), (-8, 9), (-8, -15)]  # staggered so neighbouring labels overlap less
    methods = sorted({r["method"] for r in pts})
    k = 0
    for i, method in enumerate(methods):
        rs = [r for r in pts if r["method"] == method and y_of[id(r)] is not None]
        for j, r in enumerate(rs):
            y = y_of[id(r)]
            label = r["bits"]
            if ys and y < low:
                label, y = f"{label} ({y:.1f} %)", low
                ax.plot(r[x_key], y, marker="v", color=f"C{i}", markersize=9, label=method if j == 0 else None)
            else:
                ax.errorbar(r[x_key], y, yerr=r.get("int_top1_std") or 0, fmt=markers[i % len(markers)], color=f"C{i}",
                            capsize=3, label=method if j == 0 else None,
                            markerfacecolor="none" if r["int_top1"] is None else None)
            ax.annotate(label, (r[x_key], y), textcoords="offset points", xytext=offsets[k % len(offsets)], fontsize=6.5,
                        ha="left" if offsets[k % len(offsets)][0] > 0 else "right")
            k += 1
    ax.set_xscale("log")
    ax.set_xlabel(x_label + " (log)")
    ax.set_ylabel("integer top-1 % (fp32: float, hollow)")
    ax.set_title(f"{track}: accuracy vs {x_label}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def html_page(rows: list[dict[str, Any]], plot_files: dict[str, list[Path]], generated: str, note: str | None = None) -> str:
    env = Environment(loader=PackageLoader("fqtbench.leaderboard", "templates"), autoescape=True)  # names come from plugins and configs: always escape
    cols = ["track", "method", "bits", "n"] + [c for c in MD_COLUMNS if c not in ("method", "bits", "n")]
    plots = []
    for track, files in sorted(plot_files.items()):
        for f in files:
            plots.append({"track": track, "name": f.name, "src": "data:image/png;base64," + base64.b64encode(f.read_bytes()).decode()})
    table = []
    for r in rows:
        table.append({
            "cells": [{"key": c, "text": ("⚠ " if c == "n" and r.get("incomplete") else "") + fmt(c, r.get(c)),
                       "sort": "" if r.get(c) is None else r.get(c)} for c in cols],
            "track": r["track"], "bits": r["bits"],
        })
    headers = [{"key": c, "title": METRIC[c].title if c in METRIC else c,
                "dir": "desc" if (METRIC.get(c) and METRIC[c].higher_is_better) else "asc"} for c in cols]
    return env.get_template("page.html.jinja").render(
        headers=headers, rows=table, plots=plots, generated=generated, note=note,
        tracks=sorted({r["track"] for r in rows}), bits=sorted({r["bits"] for r in rows}),
    )
