"""CC-EA starting points.

- ``pretrained``: the harness's cached fp32 model of the same track, model and seed,
  post-training-quantized into an IntModel (batch norm folded into the requantization, activation
  ranges calibrated on training batches). This is the only place CC-EA touches floating point, and
  it happens before the search; its cost is the fp32 pretraining, recorded separately.
- ``random``: random integer weight codes and power-of-two requantization shifts chosen from
  integer activation statistics -- no floating-point number enters the parameters. (The graph
  *topology* is read off the float module tree; no float value of it is used.)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fqtbench.engine.export import export_model
from fqtbench.engine.intmodel import IntModel
from fqtbench.engine.requant import FixedPoint
from fqtbench.harness import calibrate_activations
from fqtbench.harness.pretrain import pretrained_fp32
from fqtbench.nn import quant_layers
from fqtbench.quant import ActQuantizer
from fqtbench.quant.attach import attach_standard


@dataclass
class Start:
    int_model: IntModel
    margin_clip: int
    info: dict[str, Any] = field(default_factory=dict)
    pretraining: dict[str, Any] | None = None
    teacher: IntModel | None = None  # 8-bit integer twin of the pretrained network (distill fitness)
    teacher_rescale: FixedPoint | None = None  # teacher logits -> the student's logit scale


def start_model(model, cfg, data, backend) -> Start:
    p, b, e = cfg.params, cfg.bits, cfg.engine
    in_shape = (data.info.in_channels, *data.info.image_size)
    pre = teacher = rescale = None
    if p.init == "pretrained":
        pre = pretrained_fp32(cfg, data, model, p.checkpoint)
        if p.fitness == "distill":
            teacher = _quantized_export(copy.deepcopy(model), 8, 8, None, "channel", data, e, in_shape)
        im = _quantized_export(model, b.w, b.a, b.first_last, p.weight_granularity, data, e, in_shape)
        if teacher is not None:
            rescale = FixedPoint.from_real(teacher.meta["logit_scale"] / im.meta["logit_scale"], 2**40)
    else:
        im = random_int_model(model, cfg, data, backend, in_shape)
    x, _ = next(iter(data.calib_dataloader(1)))
    clip = margin_clip(im, x, backend, p.margin_clip_shift)
    info = {
        "init": p.init,
        "start_int_top1": round(im.evaluate(data.test_dataloader(), backend), 4),
        "start_val_top1": round(im.evaluate(data.val_dataloader(), backend), 4),
        "margin_clip": clip,
    }
    return Start(im, clip, info, pre, teacher, rescale)


def _quantized_export(model, w_bits, a_bits, first_last, granularity, data, e, in_shape) -> IntModel:
    """Post-training quantization of the fp32 model: quantizers attached, ranges calibrated, exported."""
    attach_standard(model, w_bits=w_bits, a_bits=a_bits, first_last_bits=first_last, weight_granularity=granularity)
    calibrate_activations(model, data.calib_dataloader(e.calib_batches), e.calib_method, e.percentile)
    return export_model(model, in_shape)


def margin_clip(im: IntModel, x: Tensor, backend, shift: int = 0) -> int:
    """The smallest power of two above the start model's median gap between its two largest logits
    on `x` (label-free), times 2^shift; at least 1; integer only."""
    logits = im.forward(x, backend).to(torch.int64)
    top2 = logits.topk(2, dim=1).values
    med = int((top2[:, 0] - top2[:, 1]).median())
    return 1 << max(0, med.bit_length() + shift)


# ---- random integer start --------------------------------------------------------------------------


def random_int_model(model, cfg, data, backend, in_shape) -> IntModel:
    b = cfg.bits
    attach_standard(model, w_bits=b.w, a_bits=b.a, first_last_bits=b.first_last, weight_granularity="tensor")
    for _, layer in quant_layers(model):  # any positive range: the numbers are replaced below
        if isinstance(layer.quant.act, ActQuantizer):
            layer.quant.act.running_max.fill_(1.0)
    im = export_model(model, in_shape)  # topology only
    g = torch.Generator().manual_seed(int(cfg.seed))
    x, _ = next(iter(data.calib_dataloader(cfg.engine.calib_batches)))
    _integer_parameters(im, x, data.info.pixel_max, g, backend)
    return im


def _shift_for(max_abs: int, target_bits: int) -> int:
    return max(0, int(max_abs).bit_length() - target_bits)


def _integer_parameters(im: IntModel, x: Tensor, pixel_max: int, g: torch.Generator, backend) -> None:
    """Random weight codes, zero biases, and shifts that fill each code range on the batch `x`.

    Every value is tracked as integer * 2^exponent; exponents are integers too.
    """
    exp: dict[int, int] = {}
    outs: dict[int, Tensor] = {}
    one = torch.ones((), dtype=torch.int64)
    for i, nd in enumerate(im.nodes):
        if nd.op == "input":
            lut = nd.tensors["lut"]
            qmax = int(im.nodes[im.gemm_nodes[0]].attrs["x_range"][1])  # the first layer's signed code range
            pix = torch.arange(pixel_max + 1, dtype=torch.int64)
            nd.tensors["lut"] = (((2 * pix - pixel_max) * qmax) // pixel_max).to(lut.dtype).expand_as(lut).contiguous()
            exp[i] = 0
        elif nd.op in ("conv", "linear"):
            lo, hi = nd.attrs["w_range"]
            w = nd.tensors["weight"]
            nd.tensors["weight"] = torch.randint(lo, hi + 1, w.shape, generator=g, dtype=torch.int64).to(w.dtype)
            nd.tensors["bias"] = torch.zeros_like(nd.tensors["bias"])
            exp[i] = exp[nd.inputs[0]]
        elif nd.op in ("requant", "avgpool"):
            probe = outs[nd.inputs[0]].to(torch.int64)
            if nd.op == "avgpool":
                probe = probe.sum(dim=(1, 2))
            hi = nd.attrs["hi"] if nd.attrs["hi"] is not None else 2**15 - 1
            s = _shift_for(int(probe.abs().max()), min(16, int(hi).bit_length()))
            c = nd.tensors["m"].shape
            nd.tensors["m"] = one.expand(c).clone()
            nd.tensors["shift"] = torch.full(c, s, dtype=torch.int64)
            exp[i] = exp[nd.inputs[0]] + s
        elif nd.op == "add":
            ea, eb = exp[nd.inputs[0]], exp[nd.inputs[1]]
            ec = min(ea, eb)
            a = outs[nd.inputs[0]].to(torch.int64) << (ea - ec)
            bb = outs[nd.inputs[1]].to(torch.int64) << (eb - ec)
            s = _shift_for(int((a + bb).abs().max()), int(nd.attrs["hi"]).bit_length())
            for key, e in (("a", ea), ("b", eb)):
                c = nd.tensors[f"m_{key}"].shape
                nd.tensors[f"m_{key}"] = torch.full(c, 1 << (e - ec), dtype=torch.int64)
                nd.tensors[f"shift_{key}"] = torch.full(c, s, dtype=torch.int64)
            exp[i] = ec + s
        else:  # maxpool, flatten, shortcut_a: exponent unchanged
            exp[i] = exp[nd.inputs[0]]
        xs = [x] if nd.op == "input" else [outs[j] for j in nd.inputs]
        outs[i] = nd.run(xs, backend)
    im._prepared.clear()
