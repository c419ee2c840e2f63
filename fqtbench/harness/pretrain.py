"""The shared fp32 starting point: an fp32 model of the same track, data, model and seed.

Methods that start from a pretrained network (CC-EA's `init: pretrained`, BSQ) get it here. It is
trained once by the harness -- an ordinary `fp32` run with its own record -- and cached under
``$FQTBENCH_CACHE/pretrained`` (default ``~/.cache/fqtbench/pretrained``), keyed by the hash of
that fp32 run's resolved config less its engine section (`pretraining_key`), so every method and
seed pairing reuses the same weights and the pretraining cost is reported once, separately from
the method's own cost.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import ResolvedConfig, resolve
from ..errors import ConfigError
from ..records import load_record


def cache_root() -> Path:
    base = os.environ.get("FQTBENCH_CACHE")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "fqtbench"


def fp32_config(cfg: ResolvedConfig) -> ResolvedConfig:
    """The fp32 run that `cfg` starts from: same track, data, model and seed; the track's fp32 budget."""
    # the data *source* of the run; batch sizes stay the fp32 track's (a method's batch is its own business)
    data = cfg.run.data.model_dump(mode="json", exclude={"batch_size", "eval_batch_size", "num_workers"})
    over = {
        "data": data,
        "model": cfg.run.model.model_dump(mode="json"),
        "trainer": {"accelerator": cfg.trainer.accelerator, "threads": cfg.trainer.threads, "progress": cfg.trainer.progress},
        "wandb": {"mode": "disabled"},
    }
    return resolve("fp32", track=cfg.track, overrides=over, seed=cfg.seed)


def pretraining_key(fcfg: ResolvedConfig) -> str:
    """The cache key: what decides the fp32 weights. The integer engine's settings score a network
    and do not train it, so a new engine option does not retrain every cached network."""
    return fcfg.identity_hash(exclude=("engine",))


def pretrained_fp32(cfg: ResolvedConfig, data, model: nn.Module, checkpoint: str | None = None) -> dict[str, Any]:
    """Load fp32 weights into `model` (in place); return the pretraining record's summary.

    `checkpoint`: a Lightning checkpoint or a plain state_dict file to load instead of the cache.
    """
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise ConfigError(f"pretrained checkpoint {checkpoint!r} does not exist")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"pretrained checkpoint {checkpoint!r}: not a run's last.ckpt or a state_dict file ({first[:120]})") from None
        if not isinstance(blob, dict):
            raise ConfigError(f"pretrained checkpoint {checkpoint!r}: holds a {type(blob).__name__}, not a state_dict")
        _load_into(model, blob)
        return {"source": str(path), "training_cost": None}
    fcfg = fp32_config(cfg)
    key = pretraining_key(fcfg)
    folder = cache_root() / "pretrained" / f"{cfg.track}-{cfg.model.name}-s{cfg.seed}-{key}"
    weights = folder / "model.pt"
    if not weights.is_file():
        from .runner import execute

        fcfg.run.out = str(folder / "runs")
        with _rng_preserved():  # the caller's run must not depend on whether the cache existed
            record, record_path = execute(fcfg)
        ckpt = torch.load(record_path.parent / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        tmp = weights.with_suffix(f".{os.getpid()}.tmp")  # two runs of a suite may pretrain the same network at once
        torch.save({"state_dict": state, "record": str(record_path)}, tmp)
        tmp.replace(weights)
    blob = torch.load(weights, map_location="cpu", weights_only=True)
    _load_into(model, blob["state_dict"])
    record = load_record(blob["record"])
    return {
        "source": blob["record"],
        "run_id": record.run_id,
        "fp32_sim_top1": (record.metrics.get("final") or {}).get("sim_top1"),
        "training_cost": record.training_cost,
    }


@contextmanager
def _rng_preserved():
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


def _load_into(model: nn.Module, blob: dict) -> None:
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    state = {k.removeprefix("model."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # quantizer buffers (running ranges) are not part of an fp32 checkpoint; anything else is a mismatch
    missing = [k for k in missing if ".quant." not in k]
    unexpected = [k for k in unexpected if ".quant." not in k]
    if missing or unexpected:
        raise ConfigError(f"pretrained weights do not fit model: missing {missing[:3]}, unexpected {unexpected[:3]}")
