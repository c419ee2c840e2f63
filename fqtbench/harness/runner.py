"""One run, end to end: config -> plugins -> Trainer.fit -> integer evaluation -> run record.

The record is written when the run starts (status ``running``) and again when it ends, whatever
the ending: ``ok``, ``failed: <reason>`` or ``interrupted`` (Ctrl-C).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import secrets
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
import torch

from .. import registry
from ..config import SPAWNING, ResolvedConfig, load_resolved, save_resolved
from ..errors import ConfigError, UserError
from ..records import RECORD_NAME, RunRecord, environment, load_record
from ..tracking import Tracker
from .callbacks import CostMeter
from .evaluation import evaluate_run

CONFIG_NAME = "config.yaml"


class RunInterrupted(Exception):
    """Ctrl-C during a run; the record says `interrupted`."""


class RunFailed(UserError):
    """A run that crashed; its record says `failed: <reason>`. Exit code 1 (not a usage mistake).

    The original exception is chained (`__cause__`); FQTBENCH_DEBUG=1 prints its traceback."""

    exit_code = 1


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id(cfg: ResolvedConfig, bits_tag: str) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.method}-{cfg.track}-{bits_tag}-s{cfg.seed}-{stamp}-{secrets.token_hex(2)}"


# Lightning's DDP launcher re-runs the command line once per extra local rank with this process's
# environment; the launching process leaves its run id here so every rank uses the same run folder.
RUN_ID_ENV = "FQTBENCH_RUN_ID"


def is_rank_zero() -> bool:
    """True in the process that owns the run record and the W&B run (global rank 0, or no DDP)."""
    if "RANK" in os.environ:  # torchrun
        return int(os.environ["RANK"]) == 0
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:  # srun, one task per rank
        return int(os.environ["SLURM_PROCID"]) == 0
    return int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def shared_run_id(cfg: ResolvedConfig, bits_tag: str) -> str:
    """The run id of this run in every process of a multi-process launch.

    - a rank started by Lightning's launcher inherits the id from its parent (RUN_ID_ENV);
    - ranks started independently by torchrun or srun derive it from the launch's own id
      (TORCHELASTIC_RUN_ID / SLURM_JOB_ID), identical in all of them;
    - otherwise a fresh id.
    """
    if not is_rank_zero() and os.environ.get(RUN_ID_ENV):
        return os.environ[RUN_ID_ENV]
    launch = os.environ.get("TORCHELASTIC_RUN_ID") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if launch is None and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        launch = f"{os.environ.get('SLURM_JOB_ID', '0')}.{os.environ.get('SLURM_STEP_ID', '0')}"
    if launch and launch != "none":
        tag = hashlib.sha1(launch.encode()).hexdigest()[:4]
        return f"{cfg.method}-{cfg.track}-{bits_tag}-s{cfg.seed}-launch-{tag}"
    return new_run_id(cfg, bits_tag)


def quiet_libraries() -> None:
    """Lightning's tips and warnings about things fqtbench decides on purpose."""
    import logging

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for msg in (
        ".*does not have many workers.*",
        ".*`training_step` returned `None`.*",
        ".*run with no optimizer.*",
        ".*The number of training batches.*",
        ".*Checkpoint directory .* exists and is not empty.*",
        ".*torch.cuda.amp.*",
        ".*LeafSpec.*",
        ".*isinstance.*treespec.*",
        # gradient-free modules step by hand; their checkpoint holds the state after a whole generation, as intended
        ".*ModelCheckpoint with manual optimization.*",
        # under DDP every rank validates the whole split (the datamodule shards training batches only)
        ".*when logging on epoch level in distributed setting.*",
    ):
        warnings.filterwarnings("ignore", message=msg)


def prepare_resume(cfg: ResolvedConfig) -> tuple[ResolvedConfig, Path]:
    """`resume: RUN_DIR` -> the saved config of that run (the resume path kept) and its folder.

    Checked before anything is written, so a mistaken resume cannot overwrite a run's record: the
    folder must hold a run of the same method that has not finished."""
    run_dir = Path(cfg.resume)
    if not (run_dir / CONFIG_NAME).is_file():
        raise ConfigError(f"resume={cfg.resume!r}: not a run folder (no {CONFIG_NAME} inside)")
    if not (run_dir / RECORD_NAME).is_file():
        raise ConfigError(f"resume={cfg.resume!r}: no {RECORD_NAME} inside, so it is not a run this tool started")
    saved = load_resolved(run_dir / CONFIG_NAME)
    if saved.method != cfg.method:
        raise ConfigError(f"resume={cfg.resume!r} holds a {saved.method} run, not {cfg.method}: "
                          f"resume it with --method {saved.method}")
    old = load_record(run_dir)
    _refuse_another_version(old, f"resume={cfg.resume!r}")
    if old.status == "ok":
        raise ConfigError(f"resume={cfg.resume!r}: that run already finished (status ok); nothing to resume")
    saved.run.resume = str(run_dir)
    return saved, run_dir


def method_id(method) -> str:
    """`name@version`, as records name the method that made them."""
    return f"{method.name}@{method.version}"


def _refuse_another_version(record: RunRecord, where: str) -> None:
    """A run folder of another version of its method cannot be continued or re-scored: the two
    versions train differently (bsq v1's checkpoints hold weights v2 cannot even export)."""
    installed = method_id(registry.methods.get(record.method.split("@")[0]))
    if record.method != installed:
        raise ConfigError(f"{where} holds a {record.method} run, but the installed method is {installed}: "
                          "the two versions train differently; run it again")


def _build(cfg: ResolvedConfig, method):
    """(data, module) of a run: seeded, so a resumed or re-scored run rebuilds what it trained."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = registry.datasets.get(cfg.data.name).build(cfg.data, cfg.seed)
    return data, method.build(build_model(cfg, data.info), cfg, data)


def execute(cfg: ResolvedConfig, on_event: Callable[[str], None] | None = None) -> tuple[RunRecord, Path]:
    """Run one configuration; return its final record and the record's path.

    Raises the original exception (after writing the failed/interrupted record).
    """
    quiet_libraries()
    say = on_event or (lambda msg: None)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    method = registry.methods.get(cfg.method)
    resume_ckpt = None
    if cfg.resume:
        cfg, run_dir = prepare_resume(cfg)
        old = load_record(run_dir)
        run_id = old.run_id
        last = run_dir / "checkpoints" / "last.ckpt"
        resume_ckpt = str(last) if last.is_file() else None
        if resume_ckpt is None:
            raise ConfigError(f"resume={cfg.resume!r}: no checkpoints/last.ckpt to resume from")
    else:
        run_id = shared_run_id(cfg, method.bits_tag(cfg))
        run_dir = Path(cfg.out) / run_id
    rank_zero = is_rank_zero()
    if rank_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir / CONFIG_NAME)

    versions, host = environment()
    record = RunRecord(
        run_id=run_id,
        method=method_id(method),
        track=cfg.track,
        model=cfg.model.name,
        dataset=cfg.data.name,
        seed=cfg.seed,
        bits_tag=method.bits_tag(cfg),
        config=cfg.as_dict(),
        config_hash=cfg.identity_hash(),
        precision=method.precision(cfg).as_dict(),
        versions=versions,
        host=host,
        started_at=_now(),
    )
    record_path = run_dir / RECORD_NAME
    if rank_zero:
        record.write(run_dir)
    tracker = Tracker(cfg, run_dir, run_id, group=f"{cfg.track}/{record.bits_tag}", job_type=method.name) if rank_zero else None
    trainer = None
    meter: CostMeter | None = None
    inherited = os.environ.get(RUN_ID_ENV)
    if rank_zero:
        os.environ[RUN_ID_ENV] = run_id  # for the ranks Lightning's launcher starts from this process
    try:
        say("data")
        data, module = _build(cfg, method)
        meter = CostMeter()
        trainer = make_trainer(cfg, run_dir, meter, tracker.logger if tracker else None, module)
        say("train")
        trainer.fit(module, datamodule=data, ckpt_path=resume_ckpt)
        if trainer.interrupted:
            raise KeyboardInterrupt
        if not trainer.is_global_zero:  # rank 0 evaluates and writes the record
            return record, record_path
        say("evaluate")
        result = evaluate_run(method, module, cfg, data)
        record.metrics = result.metrics
        record.layers = result.layers
        record.model_size_bytes = result.model_size_bytes
        record.inference_bitops = result.inference_bitops
        record.extra.update(getattr(module, "record_extra", lambda: {})())
        record.training_cost = meter.summary()
        record.pretraining_cost = getattr(module, "pretraining_cost", None)
        record.status = "ok"
    except (KeyboardInterrupt, SystemExit) as exc:
        if isinstance(exc, SystemExit) and not (trainer is not None and trainer.interrupted):
            _finish(record, record_path, tracker, f"failed: exited with code {exc.code}", rank_zero, meter)
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _finish(record, record_path, tracker, "interrupted", rank_zero, meter)
        raise RunInterrupted(f"interrupted; record at {record_path}") from None
    except UserError as exc:
        _finish(record, record_path, tracker, f"failed: {exc}", rank_zero, meter)
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        _finish(record, record_path, tracker, f"failed: {type(exc).__name__}: {first}", rank_zero, meter)
        raise RunFailed(f"run failed: {type(exc).__name__}: {first} (record: {record_path})") from exc
    finally:
        if rank_zero:
            if inherited is None:
                os.environ.pop(RUN_ID_ENV, None)
            else:
                os.environ[RUN_ID_ENV] = inherited
    _finish(record, record_path, tracker, "ok", rank_zero, meter)
    return record, record_path


def reevaluate(run_dir: str | Path) -> tuple[RunRecord, Path]:
    """Evaluate a finished run's final checkpoint again, on the current integer engine, without
    training: when the shared engine changes, every published run must be scored by the same one.

    Lightning restores the checkpoint (the budget is spent, so nothing trains), then the run's own
    evaluation exports and scores it. The record keeps its training cost; its metrics, layers, size
    and BitOPs are replaced, and the previous ones are appended to `extra.reevaluations`. A config
    key added since the run (e.g. `engine.act_ranges`) takes its default, which is what scored it
    now: the record's config, `config.yaml` and identity hash say so, so that suites recognise the
    run as done and leaderboards count it once.
    """
    import tempfile

    quiet_libraries()
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_NAME).is_file() or not (run_dir / RECORD_NAME).is_file():
        raise ConfigError(f"reevaluate {str(run_dir)!r}: not a run folder (needs {CONFIG_NAME} and {RECORD_NAME})")
    record = load_record(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    if record.status != "ok":
        raise ConfigError(f"reevaluate {str(run_dir)!r}: status {record.status!r}; only finished (ok) runs can be re-evaluated")
    if not last.is_file():
        raise ConfigError(f"reevaluate {str(run_dir)!r}: no checkpoints/last.ckpt to evaluate")
    cfg = load_resolved(run_dir / CONFIG_NAME)
    cfg.trainer.progress = False
    # scoring is one process, here, whatever the run trained on (a sharded run's checkpoint is whole)
    cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.strategy = 1, 1, "auto"
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    _refuse_another_version(record, f"reevaluate {str(run_dir)!r}")
    method = registry.methods.get(cfg.method)
    data, module = _build(cfg, method)
    # A spent budget makes Lightning skip the fit loop, on_train_end included; that hook is where a
    # run ending mid-phase finishes it (bsq's last re-quantization, ebs's decision), so call it then.
    ended, on_train_end = [], module.on_train_end

    def noting_train_end():
        ended.append(True)
        return on_train_end()

    module.on_train_end = noting_train_end
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():  # the run's own checkpoints stay untouched
        warnings.filterwarnings("ignore", message="The dirpath has changed")  # on purpose: see above
        trainer = make_trainer(cfg, Path(tmp), CostMeter(), None, module)
        trainer.fit(module, datamodule=data, ckpt_path=str(last))
    del module.on_train_end
    if not ended:
        module.on_train_end()
    result = evaluate_run(method, module, cfg, data)
    versions, _ = environment()
    scored = load_resolved(run_dir / CONFIG_NAME)  # as saved: the scoring tweaks above are not the run's
    previous = {"metrics": record.metrics, "layers": record.layers, "model_size_bytes": record.model_size_bytes,
                "inference_bitops": record.inference_bitops, "versions": record.versions,
                "config_hash": record.config_hash, "replaced_at": _now()}
    record.extra["reevaluations"] = list(record.extra.get("reevaluations", [])) + [previous]
    record.metrics, record.layers = result.metrics, result.layers
    record.model_size_bytes, record.inference_bitops = result.model_size_bytes, result.inference_bitops
    record.versions = versions
    record.config, record.config_hash = scored.as_dict(), scored.identity_hash()
    save_resolved(scored, run_dir / CONFIG_NAME)
    return record, record.write(run_dir)


def build_model(cfg: ResolvedConfig, info):
    """The track's model; a model option it rejects is the user's to fix, so it is named in one line."""
    options = dict(cfg.model.options)
    try:
        return registry.models.get(cfg.model.name).build(info, **options)
    except (TypeError, ValueError) as exc:
        if not options:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"model.options={options!r} for model {cfg.model.name!r}: {first}") from exc


def _finish(record: RunRecord, path: Path, tracker: Tracker | None, status: str, rank_zero: bool,
            meter: CostMeter | None = None) -> None:
    """Write the final record. An interrupted or failed run still says what it spent (a resume
    carries on from its last checkpoint, so its final record may count fewer steps than this one)."""
    if meter is not None and not record.training_cost:
        try:
            record.training_cost = meter.summary()
        except Exception:  # the record must be written whatever the meter's state
            pass
    record.status = status
    record.finished_at = _now()
    if not rank_zero:
        return
    record.write(path.parent)
    if tracker is not None:
        try:
            tracker.finish(record, path)
        except Exception as exc:  # the record on disk is what counts; W&B is a mirror
            print(f"warning: W&B could not finish the run: {exc}", file=sys.stderr)


def make_trainer(cfg: ResolvedConfig, run_dir: Path, meter: CostMeter, logger, module: pl.LightningModule | None = None) -> pl.Trainer:
    from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar

    t = cfg.trainer
    ckpt = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step-{step}", auto_insert_metric_name=False,
        save_last=True,  # Lightning writes last.ckpt only alongside a regular checkpoint, so keep one (the latest)
        save_top_k=1,
        every_n_train_steps=t.checkpoint_every_n_steps or None,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    callbacks: list[pl.Callback] = [meter, ckpt]
    show_bar = t.progress and sys.stderr.isatty()
    if show_bar:
        callbacks.append(RichProgressBar(leave=False))
    max_time = None
    if t.max_time_s:
        max_time = _dt.timedelta(seconds=t.max_time_s)
    accel = "gpu" if t.accelerator == "cuda" else t.accelerator
    strategy = ddp_strategy_for(module, t.strategy, t.devices * t.num_nodes)
    return pl.Trainer(
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        max_time=max_time,
        accelerator=accel,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        deterministic=t.deterministic,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_progress_bar=show_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        log_every_n_steps=t.log_every_n_steps,
        default_root_dir=str(run_dir),
        # the datamodule shards each global batch itself (fqtbench.data.base), so that a run on N
        # processes sees exactly the single-process batches, and gradient-free methods can split them
        use_distributed_sampler=False,
    )


def ddp_strategy_for(module: pl.LightningModule | None, strategy: str, processes: int = 1):
    """`trainer.strategy=ddp` (or `auto` on several devices) adapted to the method, so users never
    pick DDP variants by hand: gradient-free modules get DDP without the gradient wrapper; modules
    whose parameters go unused in some phase (EBS's strengths after the search) declare
    `ddp_find_unused_parameters = True`. Spawn-based strategies are refused: the launching process
    evaluates and writes the record, and they hand it back only the parameters, not a method's
    own state (CC-EA's integer model, BSQ's bit structure)."""
    if strategy.startswith(SPAWNING):
        raise ConfigError(f"trainer.strategy={strategy!r} is not supported: use 'ddp' (the same processes, "
                          "launched as subprocesses, and rank 0 evaluates its own trained module)")
    if strategy == "auto" and processes > 1:
        strategy = "ddp"
    if strategy != "ddp" or module is None:
        return strategy
    if not any(p.requires_grad for p in module.parameters()):
        return gradient_free_ddp()
    if getattr(module, "ddp_find_unused_parameters", False):
        return "ddp_find_unused_parameters_true"
    return strategy


def gradient_free_ddp():
    """Lightning's DDP strategy without the DistributedDataParallel wrapper, for gradient-free methods.

    The processes, the launcher and torch.distributed are Lightning's own; there are just no
    gradients to synchronise (DistributedDataParallel refuses a module without trainable
    parameters). The module all-reduces what it needs itself (CC-EA: its integer fitness terms).
    """
    from pytorch_lightning.strategies import DDPStrategy

    class GradientFreeDDPStrategy(DDPStrategy):
        def _setup_model(self, model):
            return model

    return GradientFreeDDPStrategy()


__all__ = ["execute", "reevaluate", "make_trainer", "new_run_id", "RunFailed", "RunInterrupted", "CONFIG_NAME"]
