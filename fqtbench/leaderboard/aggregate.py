"""Run records -> leaderboard rows: grouped by track, method@version and precision, aggregated over seeds.

Only records are read (never W&B's files). A group's accuracy is the mean over its seeds with the
sample standard deviation and a 95% Student-t confidence interval (scipy). Each metric declares
whether higher is better, which is how tables and pages sort it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..records import RunRecord, iter_records


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    higher_is_better: bool | None  # None: descriptive, not ranked
    fmt: str = "{:.2f}"


METRICS = [
    Metric("int_top1", "integer top-1 %", True),
    Metric("int_top1_std", "± std", None),
    Metric("int_top1_ci95", "95% CI ±", None),
    Metric("sim_top1", "simulated top-1 %", True),
    Metric("gap", "sim − int", None),
    Metric("gap_to_fp32", "int − fp32", True),
    Metric("ptq_int_top1", "8-bit PTQ int top-1 % (fp32 rows)", True),
    Metric("train_bitops", "training BitOPs", False, "{:.3g}"),
    Metric("pretrain_bitops", "+ fp32 pretraining BitOPs", False, "{:.3g}"),
    Metric("evals_or_samples", "fitness evals / samples", False, "{:.0f}"),
    Metric("wall_s", "wall s", False, "{:.0f}"),
    Metric("model_size_kb", "model size KiB", False, "{:.1f}"),
    Metric("inference_bitops", "inference BitOPs / image", False, "{:.3g}"),
    Metric("avg_w_bits", "avg weight bits", False, "{:.2f}"),
]
METRIC = {m.key: m for m in METRICS}


def avg_weight_bits(rec: RunRecord) -> float | None:
    """Parameter-weighted average weight bits over the exported layers (None for fp32)."""
    layers = [l for l in rec.layers if l.get("params")]
    if not layers or rec.metrics.get("final", {}).get("int_top1") is None:
        return None
    return sum(l["params"] * l["w_bits"] for l in layers) / sum(l["params"] for l in layers)


def run_row(path: Path, rec: RunRecord) -> dict[str, Any]:
    """The per-run values the leaderboard aggregates."""
    f = rec.metrics.get("final", {})
    tc = rec.training_cost or {}
    evals = tc.get("fitness_evals") or tc.get("samples")
    return {
        "track": rec.track, "method": rec.method, "bits": rec.bits_tag, "seed": rec.seed, "run_id": rec.run_id,
        "record": str(path),
        "int_top1": f.get("int_top1"), "sim_top1": f.get("sim_top1"), "gap": f.get("gap"),
        "ptq_int_top1": f.get("ptq_int_top1"),
        "train_bitops": tc.get("train_bitops"), "pretrain_bitops": (rec.pretraining_cost or {}).get("train_bitops"),
        "evals_or_samples": evals, "wall_s": tc.get("wall_s"),
        "model_size_kb": rec.model_size_bytes / 1024 if rec.model_size_bytes is not None else None,
        "inference_bitops": rec.inference_bitops, "avg_w_bits": avg_weight_bits(rec),
        "config_hash": rec.config_hash,
    }


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def ci95(xs: list[float]) -> float | None:
    """Half-width of the 95% Student-t interval of the mean."""
    from scipy import stats

    xs = [x for x in xs if x is not None]
    s = _std(xs)
    if s is None:
        return None
    return float(stats.t.ppf(0.975, len(xs) - 1) * s / math.sqrt(len(xs)))


def expected_seeds(roots: Iterable[Path]) -> dict[tuple[str, str], int]:
    """(track, config identity without the seed) -> how many seeds a suite asked for."""
    want: dict[tuple[str, str], set[int]] = defaultdict(set)
    for root in roots:
        for manifest in Path(root).rglob("suite.json"):
            doc = json.loads(manifest.read_text())
            for c in doc.get("cells", []):
                want[(c["track"], c["method"] + json.dumps(c["setting"], sort_keys=True))].add(c["seed"])
    return {k: len(v) for k, v in want.items()}


def collect(roots: Iterable[str | Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(ok run rows, not-ok run rows) from every record under `roots`; a re-run of one identity counts once.

    A failed or interrupted record is listed unless a later re-run of the same identity ended ok
    (a resumed suite's earlier attempts are history, not open failures)."""
    ok: dict[str, dict[str, Any]] = {}
    ok_finished: dict[str, str] = {}
    bad: list[tuple[str, str, dict[str, Any]]] = []  # (identity, finished_at, row)
    for path, rec in sorted(iter_records(*roots), key=lambda pr: (pr[1].finished_at or "", str(pr[0]))):
        if rec.ok:
            ok[rec.config_hash] = run_row(path, rec)  # the newest ok record of an identity wins
            ok_finished[rec.config_hash] = rec.finished_at or ""
        elif rec.status != "running":
            bad.append((rec.config_hash, rec.finished_at or "", {"track": rec.track, "method": rec.method, "bits": rec.bits_tag,
                                                                 "seed": rec.seed, "status": rec.status, "record": str(path)}))
    open_failures = [row for key, finished, row in bad if not ok_finished.get(key, "") > finished]
    return list(ok.values()), open_failures


def aggregate(runs: list[dict[str, Any]], expected: dict[tuple[str, str], int] | None = None,
              setting_of: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per (track, method@version, bits) with means over seeds and the statistics."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[(r["track"], r["method"], r["bits"])].append(r)
    fp32 = {}
    for (track, method, _), rs in groups.items():
        if method.split("@")[0] == "fp32":
            fp32[track] = _mean([r["sim_top1"] for r in rs])
    rows = []
    for (track, method, bits), rs in sorted(groups.items()):
        ints = [r["int_top1"] for r in rs]
        row: dict[str, Any] = {"track": track, "method": method, "bits": bits, "n": len(rs), "seeds": sorted(r["seed"] for r in rs)}
        row["int_top1"] = _mean(ints)
        row["int_top1_std"] = _std(ints)
        row["int_top1_ci95"] = ci95(ints)
        for key in ("sim_top1", "gap", "ptq_int_top1", "train_bitops", "pretrain_bitops", "evals_or_samples", "wall_s", "model_size_kb", "inference_bitops", "avg_w_bits"):
            row[key] = _mean([r[key] for r in rs])
        ref = fp32.get(track)
        row["gap_to_fp32"] = (row["int_top1"] - ref) if row["int_top1"] is not None and ref is not None else None
        want = None
        if expected and setting_of:
            wants = [expected.get((track, setting_of.get(r["config_hash"], ""))) for r in rs]
            want = max((w for w in wants if w), default=None)
        row["expected_n"] = want
        row["incomplete"] = bool(want and len(rs) < want)
        rows.append(row)
    rows.sort(key=lambda r: (r["track"], -(r["int_top1"] if r["int_top1"] is not None else (r["sim_top1"] or 0) + 1000)))
    return rows


def setting_index(roots: Iterable[Path]) -> dict[str, str]:
    """config_hash -> the suite cell key (method + setting) it was run for."""
    out = {}
    for root in roots:
        for manifest in Path(root).rglob("suite.json"):
            for c in json.loads(manifest.read_text()).get("cells", []):
                out[c["config_hash"]] = c["method"] + json.dumps(c["setting"], sort_keys=True)
    return out
