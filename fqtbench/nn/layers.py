"""Quantization-aware conv and linear layers whose three GEMMs each take a quantizer.

Every model in fqtbench is built from :class:`QConv2d` and :class:`QLinear`. A method attaches a
:class:`LayerQuant` to each layer -- quantizers for the weight and input of the forward GEMM and
for the output gradient of the grad-input and grad-weight GEMMs -- and the layer runs:

    forward      y  = Q_a(x) * Q_w(w)
    grad-input   dx = Q_gi(dy) * Q_w(w)      (straight-through to x)
    grad-weight  dw = Q_gw(dy) * Q_a(x)      (straight-through to w)

each either simulated in float (``exec: sim``) or on an integer backend (``exec: int``: integer
codes, exact int32/int64 accumulation, then the scales), and reports its MACs and operand bits to
the cost ledger. A missing quantizer means full precision for that operand. Methods that transform
weights or inputs differentiably before quantization (BSQ bit-planes, EBS mixtures) set
``weight_fn`` / ``input_fn``.
"""

from __future__ import annotations

from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import cost
from ..errors import ConfigError
from ..quant.core import QTensor, Quantizer

Exec = Literal["sim", "int"]


class LayerQuant(nn.Module):
    """The quantizers of one layer's three GEMM roles (None: full precision)."""

    def __init__(
        self,
        weight: Quantizer | None = None,
        act: Quantizer | None = None,
        grad_input: Quantizer | None = None,
        grad_weight: Quantizer | None = None,
    ):
        super().__init__()
        self.weight = weight
        self.act = act
        self.grad_input = grad_input
        self.grad_weight = grad_weight

    def bits(self) -> dict[str, int | None]:
        return {k: (getattr(self, k).bits if getattr(self, k) is not None else None)
                for k in ("weight", "act", "grad_input", "grad_weight")}


class QLayer:
    """Mixin with what the conv and linear layers share. `position` is 'first', 'last' or 'middle'."""

    quant: LayerQuant
    exec_mode: Exec
    backend: object | None
    position: str
    input_signed: bool
    weight_fn: Callable[[Tensor], Tensor] | None
    input_fn: Callable[[Tensor], Tensor] | None

    def _init_q(self) -> None:
        self.quant = LayerQuant()
        self.exec_mode = "sim"
        self.backend = None
        self.position = "middle"
        self.input_signed = False
        self.weight_fn = None
        self.input_fn = None

    def set_quant(self, quant: LayerQuant | None, exec_mode: Exec = "sim", backend=None) -> None:
        self.quant = quant if quant is not None else LayerQuant()
        if exec_mode == "int" and backend is None:
            raise ConfigError("exec=int needs an integer backend (engine.backend)")
        self.exec_mode = exec_mode
        self.backend = backend

    def effective_weight(self) -> Tensor:
        return self.weight_fn(self.weight) if self.weight_fn is not None else self.weight

    def quantize_input(self, x: Tensor) -> tuple[Tensor, QTensor | None]:
        """Quantize an input once so several consumers share it: (straight-through value, codes)."""
        if self.quant.act is None:
            return x, None
        qa = self.quant.act(x)
        return x + (qa.dequant() - x).detach(), qa


class QConv2d(nn.Conv2d, QLayer):
    """Conv2d (groups=1) with quantized GEMM roles; see module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.groups != 1:
            raise ValueError("fqtbench QConv2d supports groups=1 only")
        self._init_q()

    def forward(self, x: Tensor, qa: QTensor | None = None) -> Tensor:
        """`qa`: the input already quantized by the caller (a residual block shares it with its shortcut)."""
        if self.input_fn is not None:
            x = self.input_fn(x)
        return _QuantGemm.apply(x, self.effective_weight(), self.bias, self, qa)


class QLinear(nn.Linear, QLayer):
    """Linear with quantized GEMM roles; see module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_q()

    def forward(self, x: Tensor, qa: QTensor | None = None) -> Tensor:
        if self.input_fn is not None:
            x = self.input_fn(x)
        return _QuantGemm.apply(x, self.effective_weight(), self.bias, self, qa)


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QLayer]]:
    """The QConv2d/QLinear layers of a model in definition order, with their names."""
    for name, m in model.named_modules():
        if isinstance(m, (QConv2d, QLinear)):
            yield name, m


# -------------------------------------------------------------------------------------------------
# the three GEMMs


def _conv_macs(layer: QConv2d, out_shape: torch.Size) -> int:
    n, cout, ho, wo = out_shape
    kh, kw = layer.kernel_size
    return int(n * ho * wo * cout * layer.in_channels * kh * kw)


def _macs(layer: QLayer, x: Tensor, y: Tensor) -> int:
    if isinstance(layer, QConv2d):
        return _conv_macs(layer, y.shape)
    return int(x.numel() // x.shape[-1] * layer.in_features * layer.out_features)


def _q(quantizer: Quantizer | None, t: Tensor) -> QTensor | None:
    return quantizer(t) if quantizer is not None else None


def _bits(qt: QTensor | None) -> int | None:
    return qt.bits if qt is not None else None


class _QuantGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None, layer: QLayer, qa: QTensor | None) -> Tensor:
        quant = layer.quant
        if qa is None:
            qa = _q(quant.act, x)
        qw = _q(quant.weight, w)
        xh = qa.dequant() if qa is not None else x
        wh = qw.dequant() if qw is not None else w
        if _on_integers(layer, "fwd", qa, qw):
            y = _int_forward(layer, qa, qw)
        else:
            y = _float_forward(layer, xh, wh)
        if bias is not None:
            y = y + (bias.view(1, -1, 1, 1) if isinstance(layer, QConv2d) else bias)
        macs = _macs(layer, x, y)
        cost.record("fwd", macs, _bits(qa), _bits(qw))
        ctx.layer = layer
        ctx.macs = macs
        ctx.has_bias = bias is not None
        ctx.qa, ctx.qw = qa, qw
        ctx.save_for_backward(xh, wh)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        layer: QLayer = ctx.layer
        xh, wh = ctx.saved_tensors
        quant = layer.quant
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = gw = None
        if need_x:
            qg = _q(quant.grad_input, gy)
            if _on_integers(layer, "grad_input", qg, ctx.qw):
                gx = _int_grad_input(layer, qg, ctx.qw, xh.shape)
            else:
                gx = _float_grad_input(layer, qg.dequant() if qg is not None else gy, xh, wh)
            cost.record("grad_input", ctx.macs, _bits(qg), _bits(ctx.qw))
        if need_w:
            qg = _q(quant.grad_weight, gy)
            if _on_integers(layer, "grad_weight", qg, ctx.qa):
                gw = _int_grad_weight(layer, qg, ctx.qa, wh.shape)
            else:
                gw = _float_grad_weight(layer, qg.dequant() if qg is not None else gy, xh, wh)
            cost.record("grad_weight", ctx.macs, _bits(qg), _bits(ctx.qa))
        gb = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(dim=(0, 2, 3)) if isinstance(layer, QConv2d) else gy.reshape(-1, gy.shape[-1]).sum(0)
        ctx.qa = ctx.qw = None
        return gx, gw, gb, None, None


# ---- simulated (float) GEMMs -----------------------------------------------------------------


def _conv_args(layer: QConv2d):
    return layer.stride, layer.padding, layer.dilation


def _float_forward(layer: QLayer, x: Tensor, w: Tensor) -> Tensor:
    if isinstance(layer, QConv2d):
        s, p, d = _conv_args(layer)
        return F.conv2d(x, w, None, s, p, d)
    return F.linear(x, w)


def _float_grad_input(layer: QLayer, g: Tensor, x: Tensor, w: Tensor) -> Tensor:
    if isinstance(layer, QConv2d):
        s, p, d = _conv_args(layer)
        return torch.ops.aten.convolution_backward(
            g, x, w, None, s, p, d, False, [0, 0], 1, [True, False, False]
        )[0]
    return g @ w


def _float_grad_weight(layer: QLayer, g: Tensor, x: Tensor, w: Tensor) -> Tensor:
    if isinstance(layer, QConv2d):
        s, p, d = _conv_args(layer)
        return torch.ops.aten.convolution_backward(
            g, x, w, None, s, p, d, False, [0, 0], 1, [False, True, False]
        )[1]
    return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


# ---- integer GEMMs ---------------------------------------------------------------------------
#
# Under exec=int a GEMM runs on the integer backend when both its operands are quantized; a GEMM
# with a full-precision operand (QAT's backward, say) stays in float, as it would on hardware.
# Scales factor out of an integer GEMM only when they do not vary along the reduced dimension;
# `_on_integers` refuses quantizer granularities for which they would.

_ALLOWED_SCALE_DIMS = {
    # role: (allowed scale dims of operand A, of operand B), dims of the tensors as the layer sees them
    "fwd": ({(), (0,)}, {(), (0,)}),  # act per tensor/sample; weight per tensor/out-channel
    "grad_input": ({(), (0,)}, {()}),  # gradient per tensor/sample; weight per tensor (K = out-channel)
    "grad_weight": ({(), (1,)}, {()}),  # gradient per tensor/out-channel(column); act per tensor (K = samples)
}


def _on_integers(layer: QLayer, role: str, a: QTensor | None, b: QTensor | None) -> bool:
    """True when this GEMM runs on the integer backend (exec=int and both operands quantized)."""
    if layer.exec_mode != "int" or a is None or b is None:
        return False
    allowed_a, allowed_b = _ALLOWED_SCALE_DIMS[role]
    if a.scale_dims not in allowed_a or b.scale_dims not in allowed_b or (role == "grad_weight" and a.inverse):
        raise ConfigError(
            f"exec=int: the {role} GEMM's quantizer scales vary along its reduced dimension "
            f"(scale dims {a.scale_dims} x {b.scale_dims}); use per-tensor scales there or exec=sim"
        )
    return True


def _codes64(t: Tensor) -> Tensor:
    return t.to(torch.float64)


def _int_forward(layer: QLayer, qa: QTensor, qw: QTensor) -> Tensor:
    backend = layer.backend
    pw = backend.prepare_weight(qw.int_codes(), qw.range)
    if isinstance(layer, QConv2d):
        s, p, d = _conv_args(layer)
        xc = qa.int_codes().permute(0, 2, 3, 1).contiguous()
        acc = backend.conv2d(xc, pw, qa.range, stride=s, padding=p, dilation=d).permute(0, 3, 1, 2)
        w_scale = qw.scale.reshape(1, -1, 1, 1) if qw.scale.numel() > 1 else qw.scale.reshape(())
        a_scale = qa.scale.reshape(-1, 1, 1, 1) if qa.scale.numel() > 1 else qa.scale.reshape(())
    else:
        xc = qa.int_codes().reshape(-1, layer.in_features)
        acc = backend.linear(xc, pw, qa.range).reshape(*qa.q.shape[:-1], layer.out_features)
        w_scale = qw.scale.reshape(1, -1) if qw.scale.numel() > 1 else qw.scale.reshape(())
        a_scale = qa.scale.reshape(-1, 1) if qa.scale.numel() > 1 else qa.scale.reshape(())
    return (_codes64(acc) * (a_scale.double() * w_scale.double())).to(qa.q.dtype)


def _int_grad_input(layer: QLayer, qg: QTensor, qw: QTensor, x_shape: torch.Size) -> Tensor:
    """dx = Q(dy) W on integers: (N*L, Cout) x (Cout, Cin*k*k), then col2im in float64 (exact)."""
    backend = layer.backend
    g = qg.int_codes()
    wc = qw.int_codes()
    if isinstance(layer, QConv2d):
        n, cout, ho, wo = g.shape
        gm = g.permute(0, 2, 3, 1).reshape(-1, cout)
        wm = wc.reshape(cout, -1)
        cols = backend.matmul(gm, wm, qg.range, qw.range)  # (N*L, Cin*k*k)
        cols = _codes64(cols).reshape(n, ho * wo, -1).transpose(1, 2)
        s, p, d = _conv_args(layer)
        acc = F.fold(cols, x_shape[-2:], layer.kernel_size, dilation=d, padding=p, stride=s)
        g_scale = qg.scale.reshape(-1, 1, 1, 1) if qg.scale.numel() > 1 else qg.scale.reshape(())
    else:
        gm = g.reshape(-1, layer.out_features)
        acc = _codes64(backend.matmul(gm, wc, qg.range, qw.range)).reshape(*g.shape[:-1], layer.in_features)
        g_scale = qg.scale.reshape(-1, 1) if qg.scale.numel() > 1 else qg.scale.reshape(())
    out = acc * (g_scale.double() * qw.scale.double().reshape(()))
    if qg.inverse is not None:
        out = qg.inverse(out)
    return out.to(qg.q.dtype)


def _int_grad_weight(layer: QLayer, qg: QTensor, qa: QTensor, w_shape: torch.Size) -> Tensor:
    """dW = Q(dy)^T Q(x) on integers; K = samples x positions, split by the backend if needed."""
    backend = layer.backend
    g = qg.int_codes()
    if isinstance(layer, QConv2d):
        n, cout, ho, wo = g.shape
        s, p, d = _conv_args(layer)
        cols = F.unfold(qa.q, layer.kernel_size, dilation=d, padding=p, stride=s)  # exact small integers
        cols = cols.transpose(1, 2).reshape(n * ho * wo, -1).round().to(qa.int_codes().dtype)
        gm = g.permute(1, 0, 2, 3).reshape(cout, -1)
        acc = _codes64(backend.matmul(gm, cols, qg.range, qa.range)).reshape(w_shape)
        g_scale = qg.scale.reshape(-1, 1, 1, 1) if qg.scale.numel() > 1 else qg.scale.reshape(())
    else:
        gm = g.reshape(-1, layer.out_features).t().contiguous()
        xm = qa.int_codes().reshape(-1, layer.in_features)
        acc = _codes64(backend.matmul(gm, xm, qg.range, qa.range))
        g_scale = qg.scale.reshape(-1, 1) if qg.scale.numel() > 1 else qg.scale.reshape(())
    return (acc * (g_scale.double() * qa.scale.double().reshape(()))).to(qg.q.dtype)
