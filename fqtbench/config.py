"""The run config: typed, validated, resolved from layers, saved with every run.

Precedence, lowest first: built-in defaults <- track file <- method defaults <- the track's
per-method overrides <- ``--config`` file <- ``--set key=value``. Every layer is a nested dict;
the merged dict is validated once. Method-specific options live in a section named after the
method (``--set ccea.pop_size=64``) and are validated by the method's own ``Config`` model; a
method may also extend the ``bits`` section (CPT adds ``bits.min``/``bits.max``).

Every mistake becomes one :class:`ConfigError` line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError, UserError

CONFIG_VERSION = 1


class StrictModel(BaseModel):
    """Unknown keys are errors; assignment is validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(StrictModel):
    name: str = "digits"
    root: str | None = None
    download: bool = False
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    val_fraction: float = Field(0.1, ge=0.0, le=0.5)
    train_subset: int | None = Field(None, ge=1)
    augment: bool = True
    num_workers: int = Field(0, ge=0)
    cache_dir: str | None = None
    image_size: int | None = Field(None, ge=1)


class ModelConfig(StrictModel):
    name: str = "cnn-s"
    options: dict[str, Any] = Field(default_factory=dict)


class OptimConfig(StrictModel):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["cosine", "constant", "step", "onecycle"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])  # fractions of training, for "step"
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class TrainerConfig(StrictModel):
    max_epochs: int = Field(30, ge=1)
    max_steps: int = Field(-1, ge=-1)
    max_time_s: float | None = Field(None, gt=0)
    accelerator: Literal["cpu", "gpu", "cuda", "auto"] = "cpu"
    devices: int = Field(1, ge=1)
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    deterministic: bool = True
    check_val_every_n_epoch: int = Field(1, ge=1)
    checkpoint_every_n_steps: int = Field(0, ge=0)  # 0: at every epoch end
    log_every_n_steps: int = Field(10, ge=1)
    progress: bool = True
    threads: int | None = Field(None, ge=1)


class BitsConfig(StrictModel):
    """Bit-widths per GEMM operand. None for a gradient role means full precision (QAT)."""

    w: int = Field(8, ge=1, le=32)
    a: int = Field(8, ge=1, le=32)
    g_input: int | None = Field(None, ge=1, le=32)
    g_weight: int | None = Field(None, ge=1, le=32)
    first_last: int | None = Field(None, ge=1, le=32)  # bits of the first and last layer (None: same as w/a)


class EngineConfig(StrictModel):
    """The shared integer engine: which backend evaluates the exported IntModel, and calibration."""

    backend: str = "int8"
    # trained: an activation quantizer keeps the range it tracked in training (the one the network
    # learned under and the method's own validation used); only ranges never trained are calibrated.
    # calibrate: every range is re-measured on calib_batches training batches (README: Integer export).
    act_ranges: Literal["trained", "calibrate"] = "trained"
    calib_batches: int = Field(8, ge=1)
    calib_method: Literal["max", "percentile"] = "max"
    percentile: float = Field(99.99, gt=50.0, le=100.0)
    overflow: Literal["split", "error"] = "split"
    ptq_bits: int = Field(8, ge=2, le=8)  # fp32 rows also record a PTQ integer accuracy at these bits


class WandbConfig(StrictModel):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "fqtbench"
    entity: str | None = None
    tags: list[str] = Field(default_factory=list)


class RunConfig(StrictModel):
    version: Literal[1] = CONFIG_VERSION
    method: str = "qat"
    track: str = "digits"
    seed: int = Field(0, ge=0)
    out: str = "runs"
    exec: Literal["sim", "int"] = "sim"
    resume: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    bits: BitsConfig = Field(default_factory=BitsConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class EmptyConfig(StrictModel):
    """For methods without options of their own."""


@dataclass
class ResolvedConfig:
    """The validated run config plus the method's own section; `as_dict` is what gets saved."""

    run: RunConfig
    params: BaseModel  # the method plugin's own options (its Config instance)

    def __getattr__(self, item):  # cfg.bits, cfg.trainer ... read through to the run config
        return getattr(self.run, item)

    def as_dict(self) -> dict[str, Any]:
        d = self.run.model_dump(mode="json")
        d[self.run.method] = self.params.model_dump(mode="json")
        return d

    def identity_hash(self, exclude: tuple[str, ...] = ()) -> str:
        """Hash of everything that decides the result (not where it is written or logged), less the
        top-level sections in `exclude`."""
        d = self.as_dict()
        for k in ("out", "wandb", "resume", *exclude):
            d.pop(k, None)
        d["trainer"] = {k: v for k, v in d["trainer"].items() if k not in ("progress", "log_every_n_steps")}
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# layers


def configs_root() -> Path:
    """Where the shipped YAML files live (configs/ in a checkout, fqtbench_configs when installed)."""
    return Path(str(resources.files("fqtbench_configs")))


def list_tracks() -> list[str]:
    return sorted(p.stem for p in (configs_root() / "tracks").glob("*.yaml"))


def load_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {p}: a folder, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what} {p}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_track(name: str) -> dict[str, Any]:
    tracks = list_tracks()
    if name not in tracks:
        raise ConfigError(f"track={name!r}: unknown track; allowed: {', '.join(tracks)}")
    data = load_yaml(configs_root() / "tracks" / f"{name}.yaml", "track file")
    data.pop("description", None)
    data.pop("notes", None)
    return data


def track_description(name: str) -> str:
    data = load_yaml(configs_root() / "tracks" / f"{name}.yaml", "track file")
    return str(data.get("description", "")).strip()


def parse_set(items: list[str]) -> dict[str, Any]:
    """`["bits.w=3", "ccea.pop_size=64"]` -> nested dict; values are read as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set bits.w=4")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: empty key part in {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(out, key, value)
    return out


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = d.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: '{part}' is a value, not a section")
        d = nxt
    d[parts[-1]] = value


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):  # model.options merge too
            out[k] = {**out[k], **v}
        else:
            out[k] = copy.deepcopy(v)
    return out


# ---------------------------------------------------------------------------------------------
# validation errors -> one line


def _fmt_loc(prefix: str, loc: tuple) -> str:
    return ".".join(([prefix] if prefix else []) + [str(p) for p in loc])


def _allowed_keys(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    cls: Any = model_cls
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cls is None:
            return []
    return sorted(getattr(cls, "model_fields", {}).keys())


def _one_line_validation_error(exc: ValidationError, model_cls: type[BaseModel], prefix: str = "") -> ConfigError:
    err = exc.errors()[0]
    loc = tuple(err.get("loc", ()))
    key = _fmt_loc(prefix, loc) or (prefix or "config")
    value = err.get("input")
    etype = err.get("type", "")
    if etype == "missing":
        return ConfigError(f"{key}: required, and missing")
    if etype == "extra_forbidden":
        allowed = _allowed_keys(model_cls, loc)
        hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
        return ConfigError(f"unknown key '{key}'{hint}")
    msg = err.get("msg", "invalid value")
    ctx = err.get("ctx") or {}
    if etype == "literal_error" and "expected" in ctx:
        msg = f"must be one of {ctx['expected']}"
    return ConfigError(f"{key}={value!r}: {msg[0].lower() + msg[1:] if msg else msg}")


def validate(model_cls: type[BaseModel], data: dict[str, Any], prefix: str = "") -> BaseModel:
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise _one_line_validation_error(exc, model_cls, prefix) from None


# ---------------------------------------------------------------------------------------------
# resolution


def resolve(
    method: str,
    track: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    seed: int | None = None,
    out: str | None = None,
    wandb_mode: str | None = None,
) -> ResolvedConfig:
    """Build the validated config for one run from all layers (see module docstring)."""
    from . import registry  # late: registry loads plugins

    over = parse_set(overrides) if isinstance(overrides, list) else dict(overrides or {})
    file_layer = load_yaml(config_file) if config_file else {}
    # top-level selectors may come from any layer; the CLI flags win
    track = track or over.get("track") or file_layer.get("track") or "digits"
    if not isinstance(track, str):
        raise ConfigError(f"track={track!r}: must be a track name; allowed: {', '.join(list_tracks())}")
    for where, layer in (("--set", over), ("the config file", file_layer)):
        if "method" in layer and layer["method"] != method:
            raise ConfigError(f"method={layer['method']!r} in {where}: the method is chosen by --method "
                              f"(here {method!r}); remove the key or pass --method {layer['method']}")
    plugin = registry.methods.get(method)

    merged: dict[str, Any] = RunConfig().model_dump(mode="python")
    track_layer = load_track(track)
    per_method = track_layer.pop("methods", {}) or {}
    merged = deep_merge(merged, track_layer)
    merged = deep_merge(merged, _method_defaults(plugin))
    merged = deep_merge(merged, per_method.get(method, {}) or {})
    merged = deep_merge(merged, file_layer)
    merged = deep_merge(merged, over)
    merged["method"] = method
    merged["track"] = track
    if seed is not None:
        merged["seed"] = seed
    if out is not None:
        merged["out"] = out
    if wandb_mode is not None:
        merged.setdefault("wandb", {})["mode"] = wandb_mode

    others = sorted(k for k in merged if k != method and k not in RunConfig.model_fields and k in registry.methods)
    if others:
        raise ConfigError(f"{others[0]}.*: options of the {others[0]} method, but this run's method is {method}; "
                          f"use --method {others[0]} or drop them")
    method_section = merged.pop(method, {}) or {}
    if not isinstance(method_section, dict):
        raise ConfigError(f"{method}={method_section!r}: must be a section of {method} options")
    run_cls = _run_config_class(plugin)
    run = validate(run_cls, merged)
    method_cfg = validate(getattr(plugin, "Config", EmptyConfig), method_section, prefix=method)
    _check_names(run)
    if hasattr(plugin, "validate_config"):
        plugin.validate_config(ResolvedConfig(run, method_cfg))
    return ResolvedConfig(run=run, params=method_cfg)


def _method_defaults(plugin: Any) -> dict[str, Any]:
    """The plugin's own `defaults` dict, then configs/methods/<name>.yaml if one ships."""
    layer = copy.deepcopy(getattr(plugin, "defaults", {}) or {})
    path = configs_root() / "methods" / f"{plugin.name}.yaml"
    if path.is_file():
        layer = deep_merge(layer, load_yaml(path, "method defaults"))
    return layer


_RUN_CLASSES: dict[type, type[RunConfig]] = {}


def _run_config_class(plugin: Any) -> type[RunConfig]:
    """RunConfig, with `bits` replaced by the method's own BitsConfig subclass when it has one."""
    bits_cls = getattr(plugin, "Bits", BitsConfig)
    if bits_cls is BitsConfig:
        return RunConfig
    if bits_cls not in _RUN_CLASSES:
        from pydantic import create_model

        _RUN_CLASSES[bits_cls] = create_model(  # type: ignore[call-overload]
            f"RunConfig_{bits_cls.__name__}",
            __base__=RunConfig,
            bits=(bits_cls, Field(default_factory=bits_cls)),
        )
    return _RUN_CLASSES[bits_cls]


def _check_names(run: RunConfig) -> None:
    from . import registry

    for key, reg, value in (
        ("data.name", registry.datasets, run.data.name),
        ("model.name", registry.models, run.model.name),
        ("engine.backend", registry.backends, run.engine.backend),
    ):
        if value not in reg:
            try:
                reg.get(value)
            except UserError as exc:
                raise ConfigError(f"{key}={value!r}: {exc}") from None
    _check_strategy(run.trainer.strategy)


SPAWNING = ("ddp_spawn", "ddp_fork", "ddp_notebook")


def _check_strategy(strategy: str) -> None:
    """A Lightning strategy name, refused here rather than when the run has started; the spawning
    ones never work (the launching process must evaluate its own trained module)."""
    from pytorch_lightning.strategies import StrategyRegistry

    if strategy == "auto" or (strategy in StrategyRegistry.available_strategies() and not strategy.startswith(SPAWNING)):
        return
    why = "spawned processes cannot hand back a method's state" if strategy.startswith(SPAWNING) else "unknown"
    raise ConfigError(f"trainer.strategy={strategy!r}: {why}; allowed: auto or ddp (adapted to the method), "
                      "or another of Lightning's strategies that is not a spawn/fork/notebook variant")


def save_resolved(cfg: ResolvedConfig, path: Path) -> None:
    from .records import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.as_dict(), sort_keys=False))


def load_resolved(path: str | Path) -> ResolvedConfig:
    """Re-create a ResolvedConfig from a saved resolved config (resume, suites)."""
    from . import registry

    data = load_yaml(path, "resolved config")
    method = data.get("method")
    if not isinstance(method, str):
        raise ConfigError(f"{path}: no 'method' key")
    plugin = registry.methods.get(method)
    section = data.pop(method, {}) or {}
    run = validate(_run_config_class(plugin), data)
    return ResolvedConfig(run=run, params=validate(getattr(plugin, "Config", EmptyConfig), section, prefix=method))
