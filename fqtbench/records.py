"""The run record: one schema-versioned JSON per run, the source of truth for every result.

Written atomically (temporary file in the same folder, fsync, rename), so a crash while writing
leaves the previous record intact. A run writes its record when it starts (status ``running``),
and again when it ends: ``ok``, ``failed: <reason>`` or ``interrupted``.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1
RECORD_NAME = "record.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see either the old or the new file, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it owner-only; give it the mode open() would
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@dataclass
class RunRecord:
    run_id: str
    method: str  # "name@version"
    track: str
    model: str
    dataset: str
    seed: int
    bits_tag: str
    config: dict[str, Any]
    config_hash: str
    precision: dict[str, Any]
    status: str = "running"  # running | ok | failed: <reason> | interrupted
    metrics: dict[str, Any] = field(default_factory=dict)  # final/best: int_top1, sim_top1, gap, ...
    layers: list[dict[str, Any]] = field(default_factory=list)  # per-layer bits and sizes
    model_size_bytes: float | None = None
    inference_bitops: int | None = None
    training_cost: dict[str, Any] = field(default_factory=dict)
    pretraining_cost: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific results (chosen bits, ...)
    versions: dict[str, str] = field(default_factory=dict)
    host: dict[str, str] = field(default_factory=dict)
    started_at: str = ""
    finished_at: str | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False, default=_json_default)

    def write(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / RECORD_NAME
        atomic_write_text(path, self.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunRecord":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _json_default(o: Any):
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_record(path: str | Path) -> RunRecord:
    p = Path(path)
    if p.is_dir():
        p = p / RECORD_NAME
    return RunRecord.from_dict(json.loads(p.read_text()))


def iter_records(*roots: str | Path) -> Iterator[tuple[Path, RunRecord]]:
    """Every readable record under the given folders (a torn or foreign JSON file is skipped).

    The copy W&B keeps of each record (under a run's ``wandb/`` folder) is not a record: skipping
    it keeps every run counted once and never reads W&B's private files.
    """
    for root in roots:
        for p in sorted(Path(root).rglob(RECORD_NAME)):
            if "wandb" in p.relative_to(root).parts[:-1]:
                continue
            try:
                yield p, load_record(p)
            except (json.JSONDecodeError, TypeError, OSError):
                continue


def git_sha(cwd: str | Path | None = None) -> str | None:
    here = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> tuple[dict[str, str], dict[str, str]]:
    """(versions, host) for the record."""
    import torch

    from . import __version__

    try:
        import pytorch_lightning as pl

        pl_version = pl.__version__
    except ImportError:  # pragma: no cover
        pl_version = "?"
    versions = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "lightning": pl_version,
        "fqtbench": __version__,
        "git_sha": git_sha() or "unknown",
    }
    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    host = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "device": device,
    }
    return versions, host
