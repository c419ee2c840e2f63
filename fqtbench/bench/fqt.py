"""FQT benchmarks: the variance of the quantized gradient (`fqt-variance`) and the step time (`fqt-step`).

`fqt-variance` measures the statistical claim of Chen et al. (NeurIPS 2020) on one fixed batch and
model. Two views of the same quantizers:

- dH: each layer's output gradient dL/dH (from one exact backward pass) quantized K times by the
  grad-input quantizer -- the quantizer's own variance, layer by layer;
- dW: the weight gradient of a full FQT backward pass (both gradient paths quantized, errors
  propagating to earlier layers), K times, around the QAT gradient (same quantized forward, exact
  backward) -- the estimator the optimiser sees, with its bias.

`fqt-step` times a training step of each quantizer against a `qat` step, interleaved in one process.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
import typer
from torch import Tensor, nn

from .. import registry
from ..config import ResolvedConfig, resolve
from ..errors import ConfigError
from ..harness.pretrain import pretrained_fp32
from ..nn import quant_layers
from . import bench_app
from .common import emit

QUANTIZERS = ("ptq", "psq", "bhq")


@dataclass
class Setup:
    cfg: ResolvedConfig
    data: Any
    model: nn.Module  # the network without quantizers (weights as loaded / trained)
    x: Tensor
    y: Tensor


def fqt_config(track: str, overrides: list[str], seed: int, kind: str, bits: int, g_weight: int | None = None) -> ResolvedConfig:
    """The fqt run config of one quantizer and gradient bit-width (g_weight: bits of the weight path, default the same)."""
    over = [*overrides, f"fqt.quantizer={kind}", f"bits.g_input={bits}", f"bits.g_weight={g_weight or bits}", "wandb.mode=disabled"]
    return resolve("fqt", track=track, overrides=over, seed=seed)


def setup(track: str, overrides: list[str], seed: int, batch: int | None = None, train_steps: int = 0,
          checkpoint: str | None = None) -> Setup:
    """Data, a model and one training batch. The model has the weights of `checkpoint`, then
    `train_steps` SGD steps: per-sample gradients spread out as training goes on, which is where
    the quantizers differ (at initialisation every sample's gradient looks alike)."""
    cfg = fqt_config(track, overrides, seed, "bhq", 8)
    if batch is not None:
        cfg.run.data.batch_size = batch
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    torch.manual_seed(seed)
    data = registry.datasets.get(cfg.data.name).build(cfg.data, seed)
    model = registry.models.get(cfg.model.name).build(data.info, **cfg.model.options).train()
    if checkpoint:
        pretrained_fp32(cfg, data, model, checkpoint)
    batches = iter(data.train_dataloader())
    x, y = next(batches)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    for _ in range(train_steps):
        try:
            xb, yb = next(batches)
        except StopIteration:
            batches = iter(data.train_dataloader())
            xb, yb = next(batches)
        train_step(model, opt, xb, yb)
    return Setup(cfg, data, model, x, y)


def attach(model: nn.Module, cfg: ResolvedConfig, data, exact: bool = False) -> nn.Module:
    """A copy of `model` with fqt's quantizers (float gradients when `exact`: the QAT reference)."""
    model = copy.deepcopy(model)
    registry.methods.get("fqt").build(model, cfg, data)
    if exact:
        for _, layer in quant_layers(model):
            layer.quant.grad_input = None
            layer.quant.grad_weight = None
    return model.train()


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def weight_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The gradient of the loss on (x, y) w.r.t. every conv/linear weight, flattened into one vector."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return torch.cat([layer.weight.grad.reshape(-1) for _, layer in quant_layers(model)])


def output_gradients(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """dL/dH of every layer that passes a gradient on (the first layer does not), from one backward pass."""
    grads: dict[str, Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(module, inputs, out: Tensor) -> None:
            out.register_hook(lambda g: grads.__setitem__(name, g.detach().clone()))
        return hook

    handles = [layer.register_forward_hook(keep(name)) for name, layer in quant_layers(model) if layer.position != "first"]
    try:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    return grads


def moments(draw: Callable[[], Tensor], exact: Tensor, draws: int) -> dict[str, float]:
    """Variance (sum over elements) and squared bias of `draws` stochastic estimates of `exact`."""
    total = torch.zeros_like(exact, dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for _ in range(draws):
        g = draw().double()
        total += g
        total_sq += g * g
    mean = total / draws
    return {
        "var": float(((total_sq - draws * mean * mean) / (draws - 1)).clamp_min(0).sum()),
        "bias2": float(((mean - exact.double()) ** 2).sum()),
        "norm2": float((exact.double() ** 2).sum()),
    }


def output_gradient_variance(grads: dict[str, Tensor], model: nn.Module, draws: int) -> float:
    """Mean over layers of Var[Q(dL/dH)] / ||dL/dH||^2, Q the grad-input quantizer of each layer of `model`."""
    layers = dict(quant_layers(model))
    rel = []
    for name, g in grads.items():
        quantize = layers[name].quant.grad_input
        m = moments(lambda: quantize(g).dequant(), g, draws)
        if m["norm2"] > 0:
            rel.append(m["var"] / m["norm2"])
    return sum(rel) / len(rel)


def weight_gradient_moments(s: Setup, track: str, overrides: list[str], kind: str, bits: int, draws: int,
                            g_weight: int | None = None, seed: int = 0) -> dict[str, float]:
    """Variance and bias of the FQT weight gradient around the QAT one (relative to ||g_qat||^2)."""
    exact = weight_gradient(attach(s.model, s.cfg, s.data, exact=True), s.x, s.y)
    model = attach(s.model, fqt_config(track, overrides, seed, kind, bits, g_weight), s.data)
    torch.manual_seed(seed)
    return moments(lambda: weight_gradient(model, s.x, s.y), exact, draws)


@bench_app.command("fqt-variance")
def fqt_variance(
    track: str = typer.Option("digits", "--track", help="Track whose data and model to use (cifar10-r20-cpu: ResNet-20)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Config override, e.g. --set data.root=../shared/data/cifar10-jpeg."),
    bits: str = typer.Option("4,5", "--bits", help="Gradient bit-widths, comma-separated."),
    g_weight: int = typer.Option(0, "--g-weight", help="Bits of the grad-weight path for dW (0: the same; StatQuant's default is 8)."),
    draws: int = typer.Option(16, "--draws", min=2, help="Stochastic draws per quantizer and bit-width."),
    batch: int = typer.Option(None, "--batch", min=2, help="Batch size (default: the track's)."),
    train_steps: int = typer.Option(100, "--train-steps", min=0, help="SGD steps before measuring (0: the initial or loaded model)."),
    checkpoint: str = typer.Option(None, "--checkpoint", help="Start from these weights (a run's checkpoints/last.ckpt or a state_dict)."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Variance and bias of the quantized gradient around the exact (QAT) one, per quantizer and bit-width."""
    try:
        bits_list = [int(b) for b in bits.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--bits={bits!r}: expected comma-separated integers, e.g. 4,5") from None
    if not bits_list or any(not 2 <= b <= 15 for b in bits_list + ([g_weight] if g_weight else [])):
        raise ConfigError(f"--bits={bits!r} / --g-weight={g_weight}: each bit-width must be in 2..15")
    overrides = list(set_)
    s = setup(track, overrides, seed, batch, train_steps, checkpoint)
    grads = output_gradients(attach(s.model, s.cfg, s.data, exact=True), s.x, s.y)
    rows = []
    for b in bits_list:
        res = {}
        for kind in QUANTIZERS:
            torch.manual_seed(seed)
            dh = output_gradient_variance(grads, attach(s.model, fqt_config(track, overrides, seed, kind, b), s.data), draws)
            dw = weight_gradient_moments(s, track, overrides, kind, b, draws, g_weight or None, seed)
            res[kind] = (dh, dw)
        dh_bhq, dw_bhq = res["bhq"]
        for kind, (dh, dw) in res.items():
            rows.append({
                "bits": f"g{b}" + (f"-{g_weight}" if g_weight else ""),
                "quantizer": kind,
                "dH var": dh,
                "dH/bhq": dh / dh_bhq,
                "dW var": dw["var"] / dw["norm2"],
                "dW/bhq": dw["var"] / dw_bhq["var"],
                "dW bias2": dw["bias2"] / dw["norm2"],
                "bias/noise": dw["bias2"] * draws / dw["var"],
            })
    emit(
        f"FQT gradient variance: {s.cfg.model.name} on {s.cfg.data.name}, batch {len(s.y)}, {draws} draws, "
        f"{'from ' + checkpoint + ', ' if checkpoint else ''}after {train_steps} SGD steps",
        rows,
        as_json,
        notes=[
            "dH var: mean over layers of Var[Q(dL/dH)] / ||dL/dH||^2 (the grad-input quantizer alone)",
            "dW var, dW bias2: of the FQT weight gradient (both paths quantized) around the QAT one, / ||g_qat||^2",
            "bias/noise: draws * ||mean - g_qat||^2 / var of dW, about 1 for an unbiased estimator",
        ],
    )


@bench_app.command("fqt-step")
def fqt_step(
    track: str = typer.Option("digits", "--track", help="Track whose data and model to use."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Config override, e.g. --set data.root=..."),
    bits: int = typer.Option(4, "--bits", min=2, max=15, help="Gradient bits (both paths)."),
    batch: int = typer.Option(None, "--batch", min=2, help="Batch size (default: the track's)."),
    repeat: int = typer.Option(30, "--repeat", min=1, help="Timed steps per variant (interleaved)."),
    exec_mode: str = typer.Option("sim", "--exec", help="sim or int (the fqt variants; qat always runs sim)."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Training-step time (forward, backward, SGD update) of ptq/psq/bhq relative to a qat step."""
    if exec_mode not in ("sim", "int"):
        raise ConfigError(f"--exec={exec_mode!r}: allowed: sim, int")
    overrides = [*set_, f"exec={exec_mode}"]
    s = setup(track, overrides, seed, batch)
    # qat keeps float gradients, which have no integer GEMM: its step always runs exec sim
    qat_cfg = resolve("qat", track=track, overrides=[*set_, "wandb.mode=disabled"], seed=seed)
    variants = {"qat": registry.methods.get("qat").build(copy.deepcopy(s.model), qat_cfg, s.data).model}
    for kind in QUANTIZERS:
        variants[kind] = attach(s.model, fqt_config(track, overrides, seed, kind, bits), s.data)
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(repeat + 2):  # two warm-up rounds
        for k, m in variants.items():
            t0 = time.perf_counter()
            train_step(m, opts[k], s.x, s.y)
            if i >= 2:
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["qat"])
    rows = [{"variant": k, "bits": f"w{s.cfg.bits.w}a{s.cfg.bits.a}" + ("" if k == "qat" else f"g{bits}"),
             "step_ms": 1e3 * statistics.median(t), "vs_qat": statistics.median(t) / base} for k, t in times.items()]
    emit(f"FQT training step: {s.cfg.model.name}, batch {len(s.y)}, exec {exec_mode}, median of {repeat}",
         rows, as_json, notes=["target: bhq at most 2x qat"])
