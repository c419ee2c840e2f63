"""Export a network of fqtbench.nn layers to an integer-only IntModel.

Principle: **the integer model rounds exactly where the simulated model quantizes.** Values
between two quantization points stay integer accumulators (with their real scale tracked here);
they are requantized once, by fixed-point multipliers, straight into the codes of the quantizer
that consumes them. Batch norm is folded into the requantization multiplier and a bias in
(fractional) accumulator units, so the weight codes are exactly the trained codes. ReLU becomes the lower clamp
of the requantization. Where a linear op (global average pool) sits between a producer and its
quantizer, the producer is requantized with 8 extra fractional bits first, so the final result is
still rounded once. A residual add rescales both inputs by fixed-point multipliers to 16 guard
bits and rounds their sum (the terms' own roundings move only ties within 2^-16). A folded bias is
added with up to 8 fractional accumulator bits (the accumulator is shifted left to meet it): whole
accumulator units would be a rounding of their own, about half an output code at w2a2.

Max-pool, flatten and ReLU commute with a monotone requantization and are applied on codes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, UserError
from ..nn import BasicBlock, ConvBNReLU, GlobalAvgPool, Normalize, QConv2d, QLinear, QNet, quant_layers
from ..quant import ActQuantizer
from .intmodel import IntModel, Node
from .intrange import INT32_MAX, IntRange
from .requant import FixedPoint

FINE_BITS = 8  # extra fractional bits before a linear op (average pool)
BIAS_FRAC_BITS = 8  # fractional accumulator bits that carry a folded bias (fewer if int32 would overflow)
GUARD_BITS = 16  # guard bits inside a residual add
MAX_ENGINE_BITS = 8


class ExportError(UserError):
    """The network cannot be expressed in integers (missing quantizer, too many bits, ...)."""


def check_exportable_bits(bits, method: str, keys=("w", "a", "first_last")) -> None:
    """Refuse forward bit-widths the engine cannot evaluate when the config resolves: the export
    comes after training, so a run would otherwise spend its whole budget and then fail."""
    for key in keys:
        v = getattr(bits, key)
        if v is not None and v > MAX_ENGINE_BITS:
            raise ConfigError(f"bits.{key}={v}: {method} exports to the shared integer engine, which evaluates "
                              f"at most {MAX_ENGINE_BITS}-bit weights and activations; allowed: up to {MAX_ENGINE_BITS}")


@dataclass
class Val:
    """A value flowing through the exporter: materialised codes, an accumulator, or a pending sum."""

    kind: str  # "codes" | "acc" | "sum"
    shape: tuple[int, ...]  # (C, H, W) or (F,)
    node: int | None = None
    scale: Tensor | None = None  # real value per integer unit: scalar (codes) or per channel (acc)
    range: IntRange | None = None  # declared range (codes)
    bound: int = 0  # bound on |value| (acc)
    quantizer: int | None = None  # id() of the quantizer whose codes these are
    relu: bool = False
    parts: list["Val"] = field(default_factory=list)  # sum
    post: list[tuple] = field(default_factory=list)  # pending commuting ops on the materialised codes


class Builder:
    """Emits IntModel nodes while the exporter walks the float network."""

    def __init__(self):
        self.nodes: list[Node] = []
        self.layers: list[dict[str, Any]] = []

    def emit(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    # ---- quantization points -----------------------------------------------------------------
    def input(self, normalize: Normalize, q: ActQuantizer, in_shape: tuple[int, int, int]) -> Val:
        """Pixels -> first-layer codes through a per-channel lookup table computed with the float ops."""
        if not isinstance(q, ActQuantizer):
            raise ExportError("cannot export the first layer to integers: it has no activation quantizer")
        _check_bits(q.bits, "input activation")
        c = in_shape[0]
        pixels = torch.arange(normalize.pixel_max + 1, dtype=torch.float32).view(1, 1, 1, -1).expand(1, c, 1, -1)
        with torch.no_grad():
            qt = q(normalize(pixels))
        lut = qt.q.reshape(c, -1).round().to(torch.int16)
        idx = self.emit(Node("input", [], {"pixel_max": normalize.pixel_max}, {"lut": lut}))
        return Val("codes", in_shape, idx, scale=qt.scale.detach().double().reshape(()), range=qt.range, quantizer=id(q))

    def materialize(self, v: Val, q: ActQuantizer | None, layer_name: str = "") -> Val:
        """The codes of quantizer `q` for value `v` (requantize, then pending pool/flatten ops)."""
        if q is None or not isinstance(q, ActQuantizer):
            raise ExportError(f"cannot export layer '{layer_name}' to integers: it has no activation quantizer")
        _check_bits(q.bits, f"{layer_name} activation")
        if v.kind == "codes" and v.quantizer == id(q):
            return self._apply_post(v, None, None)
        s_t = q.eval_scale.detach().double().reshape(())
        lo_t, hi_t = (-q.qmax, q.qmax) if q.signed else (0, q.qmax)
        fine = any(op[0] == "avgpool" for op in v.post)
        if fine:  # keep FINE_BITS extra bits until the average pool rounds
            s_mid, lo, hi = s_t / 2**FINE_BITS, (0 if v.relu else -(2**31)), 2**31 - 1
        else:
            s_mid, lo, hi = s_t, (max(0, lo_t) if v.relu else lo_t), hi_t
        idx = self._requant_to(v, s_mid, lo, hi)
        out = Val("codes", v.shape, idx, scale=s_mid, range=IntRange(lo, hi), quantizer=None if fine else id(q), post=list(v.post))
        return self._apply_post(out, (s_t, lo_t, hi_t) if fine else None, id(q))

    def _requant_to(self, v: Val, s_out: Tensor, lo: int, hi: int) -> int:
        if v.kind == "sum":
            a, b = v.parts
            ma = FixedPoint.from_real(_per_channel(a) / s_out, _bound(a))
            mb = FixedPoint.from_real(_per_channel(b) / s_out, _bound(b))
            return self.emit(Node("add", [a.node, b.node], {"lo": lo, "hi": hi, "guard": GUARD_BITS},
                                  {"m_a": ma.m, "shift_a": ma.shift, "m_b": mb.m, "shift_b": mb.shift}))
        fp = FixedPoint.from_real(_per_channel(v) / s_out, _bound(v))
        return self.emit(Node("requant", [v.node], {"lo": lo, "hi": hi}, {"m": fp.m, "shift": fp.shift}))

    def _apply_post(self, v: Val, fine_target, qid) -> Val:
        shape = v.shape
        node = v.node
        flat_from = None
        scale, rng = v.scale, v.range
        for op in v.post:
            if op[0] == "maxpool":
                _, k, s, p = op
                node = self.emit(Node("maxpool", [node], {"kernel": k, "stride": s, "padding": p}))
                c, h, w = shape
                shape = (c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
            elif op[0] == "avgpool":
                s_t, lo_t, hi_t = fine_target
                c, h, w = shape
                fp = FixedPoint.from_real(scale / (s_t * h * w), int(rng.max_abs) * h * w)
                node = self.emit(Node("avgpool", [node], {"lo": lo_t, "hi": hi_t}, {"m": fp.m, "shift": fp.shift}))
                shape, scale, rng = (c,), s_t, IntRange(lo_t, hi_t)
            elif op[0] == "flatten":
                node = self.emit(Node("flatten", [node]))
                flat_from = shape
                shape = (int(torch.tensor(shape).prod()),)
        out = Val("codes", shape, node, scale=scale, range=rng, quantizer=qid)
        out.post = [("flat_from", flat_from)] if flat_from is not None and len(flat_from) == 3 else []
        return out

    # ---- layers -----------------------------------------------------------------------------
    def conv(self, v: Val, layer: QConv2d, bn: nn.BatchNorm2d | None, name: str, act: ActQuantizer | None = None) -> Val:
        """`act`: the quantizer that produced the input codes when it is not the layer's own (a
        residual block's shortcut conv reads the codes of the block's first conv)."""
        act = act or layer.quant.act
        x = self.materialize(v, act, name)
        qw, s_w = _weight_codes(layer, name)
        cout, cin, kh, kw = qw.q.shape
        fold, bias_real = _bn_fold(bn, cout, layer.bias)
        scale = x.scale * s_w * fold
        codes = _int_codes(qw)
        zero = fold.abs() < 1e-12  # a dead channel: its output is the (folded) bias alone
        if zero.any():
            codes[zero] = 0
            scale = torch.where(zero, x.scale * s_w, scale)
        k = cin * kh * kw
        frac, bias_acc, bound = _bias_in_accumulator(bias_real, scale, k * x.range.max_abs * qw.range.max_abs)
        scale = scale / 2**frac
        (sh, sw), (ph, pw), (dh, dw) = _pair(layer.stride), _pair(layer.padding), _pair(layer.dilation)
        _, h, w = x.shape
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        attrs = {
            "stride": [sh, sw], "padding": [ph, pw], "dilation": [dh, dw], "kernel": [kh, kw], "cin": cin,
            "x_range": [x.range.lo, x.range.hi], "w_range": [qw.range.lo, qw.range.hi],
            "a_bits": _stored_bits(act), "w_bits": int(qw.bits), "name": name, "frac": frac, "acc_bound": bound,
        }
        idx = self.emit(Node("conv", [x.node], attrs, {"weight": codes, "bias": bias_acc}))
        self.layers.append({"name": name, "kind": "conv", "node": idx, "w_bits": int(qw.bits), "a_bits": _stored_bits(act),
                            "params": int(codes.numel()), "macs": int(ho * wo * cout * k), "shape": [cout, cin, kh, kw]})
        return Val("acc", (cout, ho, wo), idx, scale=scale, bound=attrs["acc_bound"])

    def linear(self, v: Val, layer: QLinear, name: str) -> Val:
        x = self.materialize(v, layer.quant.act, name)
        qw, s_w = _weight_codes(layer, name)
        cout, cin = qw.q.shape
        codes = _int_codes(qw)
        flat_from = dict(x.post).get("flat_from") if x.post else None
        if flat_from is not None and flat_from[1] * flat_from[2] > 1:  # float flattens (C,H,W); integers are (H,W,C)
            c, h, w = flat_from
            codes = codes.reshape(cout, c, h, w).permute(0, 2, 3, 1).reshape(cout, cin).contiguous()
        _, bias_real = _bn_fold(None, cout, layer.bias)
        frac, bias_acc, bound = _bias_in_accumulator(bias_real, x.scale * s_w, cin * x.range.max_abs * qw.range.max_abs)
        scale = x.scale * s_w / 2**frac
        attrs = {"cin": cin, "x_range": [x.range.lo, x.range.hi], "w_range": [qw.range.lo, qw.range.hi],
                 "a_bits": _stored_bits(layer.quant.act), "w_bits": int(qw.bits), "name": name, "frac": frac,
                 "acc_bound": bound}
        idx = self.emit(Node("linear", [x.node], attrs, {"weight": codes, "bias": bias_acc}))
        self.layers.append({"name": name, "kind": "linear", "node": idx, "w_bits": int(qw.bits), "a_bits": _stored_bits(layer.quant.act),
                            "params": int(codes.numel()), "macs": int(cout * cin), "shape": [cout, cin]})
        return Val("acc", (cout,), idx, scale=scale, bound=attrs["acc_bound"])

    def logits(self, v: Val) -> float:
        """Integer logits on one common scale (requantized only if the per-class scales differ);
        returns that scale (real value of one logit unit)."""
        s = _per_channel(v)
        if torch.allclose(s, s.reshape(-1)[0].expand_as(s), rtol=0, atol=0) and bool((s > 0).all()):
            return float(s.reshape(-1)[0])
        fp = FixedPoint.from_real(s / s.abs().min(), v.bound)
        self.emit(Node("requant", [v.node], {"lo": None, "hi": None}, {"m": fp.m, "shift": fp.shift}))
        return float(s.abs().min())

    def shortcut_a(self, x: Val, stride: int, pad: int) -> Val:
        idx = self.emit(Node("shortcut_a", [x.node], {"stride": stride, "pad": pad}))
        c, h, w = x.shape
        return replace(x, node=idx, shape=(c + pad, (h + stride - 1) // stride, (w + stride - 1) // stride), quantizer=None)


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _per_channel(v: Val) -> Tensor:
    return v.scale.double().reshape(-1) if v.scale.numel() > 1 else v.scale.double().reshape(())


def _bound(v: Val) -> int:
    return int(v.bound) if v.kind == "acc" else int(v.range.max_abs)


def _stored_bits(act: ActQuantizer) -> int:
    """Bits of the input codes as stored: a signed 1-bit quantizer is ternary ({-1, 0, 1}, 2 bits)."""
    return IntRange(-act.qmax, act.qmax).bits if act.signed else int(act.bits)


def _check_bits(bits: int, what: str, lowest: int = 1) -> None:
    if not lowest <= bits <= MAX_ENGINE_BITS:
        raise ExportError(f"{what} uses {bits} bits; the integer engine supports {lowest}..{MAX_ENGINE_BITS}")


def _int_codes(qt) -> Tensor:
    """Weight codes in the narrowest integer dtype their declared range fits (int8 unless wider)."""
    from .backends import narrow_dtype

    dtype = narrow_dtype(qt.range)
    return qt.q.round().to(torch.int16 if dtype == torch.uint8 else dtype)


def _weight_codes(layer, name: str):
    if layer.quant.weight is None:
        raise ExportError(f"cannot export layer '{name}' to integers: it has no weight quantizer")
    with torch.no_grad():
        qw = layer.quant.weight(layer.effective_weight().detach())
    _check_bits(qw.bits, f"{name} weight", lowest=0)  # the stored codes' width; 0 bits: a pruned, all-zero layer
    if qw.inverse is not None or qw.scale_dims not in ((), (0,)):
        raise ExportError(f"layer '{name}': weight scales must be per tensor or per output channel")
    cout = qw.q.shape[0]
    s_w = qw.scale.detach().double().reshape(-1)
    s_w = s_w.expand(cout).clone() if s_w.numel() == 1 else s_w
    return qw, s_w


def _bias_in_accumulator(bias_real: Tensor, unit: Tensor, gemm_bound: int) -> tuple[int, Tensor, int]:
    """(frac, integer bias, bound of the biased accumulator): the GEMM's accumulator is shifted left
    by `frac` bits and the bias added at that finer resolution. Rounding the bias to whole
    accumulator units would be a rounding the simulated model does not have, and at low bits one
    unit is a large part of an output code (w2a2: about half a code). `frac` is as large as
    BIAS_FRAC_BITS allows while the biased accumulator still fits int32; 0 without a bias."""
    if not bool((bias_real != 0).any()):
        return 0, torch.zeros_like(bias_real, dtype=torch.int64), gemm_bound
    largest = float((bias_real / unit).abs().max())  # in whole accumulator units
    frac = 0
    while frac < BIAS_FRAC_BITS and (gemm_bound << (frac + 1)) + round(largest * 2 ** (frac + 1)) <= INT32_MAX:
        frac += 1
    bias_acc = torch.round(bias_real / unit * 2**frac).to(torch.int64)
    return frac, bias_acc, (gemm_bound << frac) + int(bias_acc.abs().max())


def _bn_fold(bn: nn.BatchNorm2d | None, cout: int, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(per-channel factor gamma/sigma, per-channel real bias) of y = factor * conv + bias."""
    b = bias.detach().double() if bias is not None else torch.zeros(cout, dtype=torch.float64)
    if bn is None:
        return torch.ones(cout, dtype=torch.float64), b
    inv = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(cout, dtype=torch.float64)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(cout, dtype=torch.float64)
    fold = gamma * inv
    return fold, beta + fold * (b - bn.running_mean.double())


# ---- walking the float network -------------------------------------------------------------------


def _walk(b: Builder, m: nn.Module, v: Val, name: str) -> Val:
    if hasattr(m, "export_int"):  # third-party blocks can export themselves
        return m.export_int(b, v, name)
    if isinstance(m, nn.Sequential):
        for child_name, child in m.named_children():
            v = _walk(b, child, v, f"{name}.{child_name}" if name else child_name)
        return v
    if isinstance(m, ConvBNReLU):
        v = b.conv(v, m.conv, m.bn, f"{name}.conv")
        v = replace(v, relu=True)
        return replace(v, post=v.post + [("maxpool", 2, 2, 0)]) if m.pool else v
    if isinstance(m, BasicBlock):
        x = b.materialize(v, m.conv1.quant.act, f"{name}.conv1")
        h = replace(b.conv(x, m.conv1, m.bn1, f"{name}.conv1"), relu=True)
        acc2 = b.conv(h, m.conv2, m.bn2, f"{name}.conv2")
        if m.shortcut_kind == "identity":
            sc = x
        elif m.shortcut_kind == "A":
            sc = b.shortcut_a(x, m.stride, m.cout - m.cin)
        else:
            sc = b.conv(x, m.down_conv, m.down_bn, f"{name}.down_conv", act=m.conv1.quant.act)
        return Val("sum", acc2.shape, parts=[acc2, sc], relu=True)
    if isinstance(m, GlobalAvgPool):
        return replace(v, post=v.post + [("avgpool",)])
    if isinstance(m, nn.Flatten):
        return replace(v, post=v.post + [("flatten",)])
    if isinstance(m, nn.ReLU):
        return replace(v, relu=True)
    if isinstance(m, QLinear):
        return b.linear(v, m, name)
    stem_cbr = getattr(m, "cbr", None)
    if isinstance(stem_cbr, ConvBNReLU):  # ImageNet stem: conv-BN-ReLU then 3x3/2 max-pool
        v = _walk(b, stem_cbr, v, f"{name}.cbr")
        return replace(v, post=v.post + [("maxpool", 3, 2, 1)])
    raise ExportError(f"cannot export module '{name}' ({type(m).__name__}) to integers; give it an export_int method")


def export_model(model: QNet, in_shape: tuple[int, int, int]) -> IntModel:
    """The integer twin of a quantized QNet, using each quantizer's evaluation scale."""
    if not isinstance(model, QNet):
        raise ExportError(f"integer export needs a fqtbench QNet, got {type(model).__name__}")
    layers = [m for _, m in quant_layers(model)]
    b = Builder()
    was = model.training
    model.eval()
    try:
        v = b.input(model.normalize, layers[0].quant.act, in_shape)
        v = _walk(b, model.body, v, "body")
        v = b.linear(v, model.head, "head")
        logit_scale = b.logits(v)
    finally:
        model.train(was)
    meta = {"arch": model.arch, "input_shape": list(in_shape), "layers": b.layers, "logit_scale": logit_scale}
    return IntModel(b.nodes, meta)


def export_module(module, cfg, data) -> IntModel:
    """Export the module's network at the activation ranges `engine.act_ranges` names: the ranges
    it trained with (default; a range never trained is calibrated), or all re-calibrated."""
    e = cfg.engine
    module.calibrate(data.calib_dataloader(e.calib_batches), e.calib_method, e.percentile,
                     keep_trained=e.act_ranges == "trained")
    info = data.info
    return export_model(module.model, (info.in_channels, *info.image_size))


def ptq_export(model: QNet, bits: int, cfg, data) -> IntModel:
    """Post-training quantization of a float network: a copy with per-tensor w/a quantizers, calibrated."""
    from ..harness.module import calibrate_activations
    from ..quant.attach import attach_standard

    q = copy.deepcopy(model)
    attach_standard(q, w_bits=bits, a_bits=bits)
    e = cfg.engine
    calibrate_activations(q, data.calib_dataloader(e.calib_batches), e.calib_method, e.percentile)
    info = data.info
    return export_model(q, (info.in_channels, *info.image_size))
