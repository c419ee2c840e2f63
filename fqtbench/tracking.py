"""Weights & Biases, isolated from the core: a mirror of the run record, never the source of truth.

The mode is decided once, before anything touches wandb (a failed online init followed by an
offline one hangs in the same process): ``online`` only when asked for *and* an API key is
available, ``disabled`` on request, ``offline`` otherwise. Error reporting to Sentry is off, and
an online init has a short timeout so that a run never hangs for lack of network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .config import ResolvedConfig
from .records import RECORD_NAME, RunRecord


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    try:
        return netrc.is_file() and "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def decide_mode(requested: str) -> str:
    """`requested` is the config's wandb.mode; an environment WANDB_MODE=disabled always wins."""
    if os.environ.get("WANDB_MODE") == "disabled" or requested == "disabled":
        return "disabled"
    if requested == "online" and _has_api_key():
        return "online"
    return "offline"


def _prepare_env(mode: str) -> None:
    os.environ["WANDB_ERROR_REPORTING"] = "false"
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "30")
    os.environ.setdefault("WANDB_CONSOLE", "off")


class Tracker:
    """Creates the Lightning WandbLogger for a run and mirrors the final record into its summary."""

    def __init__(self, cfg: ResolvedConfig, run_dir: Path, run_id: str, group: str, job_type: str):
        self.mode = decide_mode(cfg.wandb.mode)
        self.logger = None
        if self.mode == "disabled":
            return
        if cfg.wandb.mode == "online" and self.mode == "offline":
            print("wandb: online asked for, but no API key (WANDB_API_KEY or ~/.netrc): logging offline; "
                  f"upload later with `wandb sync {run_dir}/wandb/offline-run-*`", file=sys.stderr)
        _prepare_env(self.mode)
        from pytorch_lightning.loggers import WandbLogger

        self.logger = WandbLogger(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            name=run_id,
            id=run_id,
            group=group,
            job_type=job_type,
            tags=list(cfg.wandb.tags) + [cfg.track, cfg.method],
            save_dir=str(run_dir),
            config=cfg.as_dict(),
            mode=self.mode,
            resume="allow",
        )
        # Lightning passes anonymous=None, which wandb answers with a deprecation warning on every run
        getattr(self.logger, "_wandb_init", {}).pop("anonymous", None)

    @property
    def run_dir(self) -> str | None:
        if self.logger is None:
            return None
        return str(Path(self.logger.experiment.dir).parent)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=step)

    def finish(self, record: RunRecord, record_path: Path) -> None:
        """Final metrics into the run summary; the record file attached; the run closed."""
        if self.logger is None:
            return
        import wandb

        exp = self.logger.experiment
        summary = {"status": record.status, "bits": record.bits_tag}
        for section in ("final", "best"):
            for k, v in (record.metrics.get(section) or {}).items():
                if isinstance(v, (int, float)) or v is None:
                    summary[f"{section}/{k}"] = v
        for k, v in (record.training_cost or {}).items():
            if isinstance(v, (int, float)):
                summary[f"cost/{k}"] = v
        exp.summary.update(summary)
        try:
            exp.save(str(record_path), base_path=str(record_path.parent), policy="now")
        except Exception:  # attaching is best effort; the record on disk is what counts
            pass
        wandb.finish(exit_code=0 if record.ok else 1)


def offline_run_dirs(run_dir: Path) -> list[Path]:
    """The offline W&B run folders under a run directory (for `wandb sync`)."""
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))


__all__ = ["Tracker", "decide_mode", "offline_run_dirs", "RECORD_NAME"]
