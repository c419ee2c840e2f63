"""Quantizer math shared by every method: codes, scales, rounding, granularity.

A quantizer maps a float tensor to a :class:`QTensor`: *centred* integer codes ``q`` (zero point
already subtracted, so the real value is ``q * scale``), the scale, the declared :class:`IntRange`
of ``q`` and the nominal bit-width. Because zero points are folded into ``q``, an integer GEMM of
two QTensors is just the integer GEMM of their codes times the outer product of their scales --
provided the scales do not vary along the reduced (K) dimension. ``scale_dims`` records along which
dims a scale varies so that the ``exec: int`` path can check that.

Codes are held in floating point (exact integers below 2^24) so that the simulated path costs no
dtype conversions; :meth:`QTensor.int_codes` converts for the integer backends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from ..engine.intrange import IntRange

Granularity = Literal["tensor", "channel", "row", "column"]


@dataclass
class QTensor:
    q: Tensor  # centred integer codes, float dtype
    scale: Tensor  # broadcastable to q
    range: IntRange  # declared range of q
    bits: int  # nominal bit-width (what the cost meter counts)
    scale_dims: tuple[int, ...] = ()  # dims of q along which `scale` varies
    inverse: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)  # e.g. BHQ's T^-1 on dim 0

    def dequant(self) -> Tensor:
        x = self.q * self.scale
        return self.inverse(x) if self.inverse is not None else x

    def int_codes(self) -> Tensor:
        dtype = torch.int8 if IntRange(-128, 127).contains(self.range) else (
            torch.uint8 if IntRange(0, 255).contains(self.range) else torch.int16
        )
        return self.q.round().to(dtype)


def round_half_even(x: Tensor) -> Tensor:
    """torch.round: round half to even, the rule used everywhere in fqtbench's float quantizers."""
    return torch.round(x)


def stochastic_round(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """floor(x + u), u ~ U[0, 1): an unbiased rounding, E[result] = x."""
    u = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    return torch.floor(x + u)


def _reduce_dims(x: Tensor, granularity: Granularity) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(dims reduced to compute one scale, dims the scale varies along)."""
    nd = x.dim()
    if granularity == "tensor":
        return tuple(range(nd)), ()
    if granularity in ("channel", "row"):  # dim 0: output channel of a weight, sample of an activation/gradient
        return tuple(range(1, nd)), (0,)
    if granularity == "column":  # dim 1: the feature / channel dim of an (N, C, ...) tensor
        return (0,) + tuple(range(2, nd)), (1,)
    raise ValueError(f"unknown granularity {granularity!r}")


def _amax(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    return x.abs().amax(dim=dims, keepdim=True) if dims else x.abs()


def symmetric_quantize(x: Tensor, bits: int, granularity: Granularity = "tensor", scale: Tensor | None = None) -> QTensor:
    """Signed narrow-range codes in [-(2^(b-1)-1), 2^(b-1)-1]; zero is exact. Needs b >= 2."""
    if bits < 2:
        raise ValueError(f"symmetric quantization needs at least 2 bits, got {bits}")
    qmax = (1 << (bits - 1)) - 1
    red, var = _reduce_dims(x, granularity)
    if scale is None:
        scale = (_amax(x.detach(), red) / qmax).clamp_min(1e-12)
    q = torch.clamp(round_half_even(x / scale), -qmax, qmax)
    return QTensor(q, scale, IntRange(-qmax, qmax), bits, var)


def act_qmax(bits: int, signed: bool) -> int:
    """Largest activation code: signed narrow range (at least 1), or unsigned [0, 2^b - 1]."""
    return max(1, (1 << (bits - 1)) - 1) if signed else (1 << bits) - 1


def act_magnitude(x: Tensor, signed: bool) -> Tensor:
    """What an activation range must cover: |x| for signed codes, x clipped at 0 for unsigned ones."""
    return x.abs() if signed else x.clamp_min(0)


def unsigned_quantize(x: Tensor, bits: int, scale: Tensor) -> QTensor:
    """Codes in [0, 2^b - 1] for non-negative inputs (after ReLU); negatives clip to 0."""
    qmax = act_qmax(bits, signed=False)
    q = torch.clamp(round_half_even(x / scale), 0, qmax)
    return QTensor(q, scale, IntRange(0, qmax), bits, ())


def signed_quantize(x: Tensor, bits: int, scale: Tensor) -> QTensor:
    """Symmetric narrow-range codes with a given scale (inputs that can be negative)."""
    qmax = act_qmax(bits, signed=True)
    q = torch.clamp(round_half_even(x / scale), -qmax, qmax)
    return QTensor(q, scale, IntRange(-qmax, qmax), bits, ())


def affine_quantize(
    x: Tensor,
    bits: int,
    granularity: Granularity = "tensor",
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> QTensor:
    """Unsigned affine codes over [min, max] (per tensor / row / column), returned centred.

    The range is widened to include 0 and the zero point is rounded to a code, so 0.0 is exactly
    representable (zero padding and ReLU zeros stay exact) and the centred codes are integers in
    [-(2^b - 1), 2^b - 1]. Stochastic rounding makes it unbiased: E[dequant(Q(x))] = x inside the
    range (rounding the zero point can clip the extremes by half a code; `exact_zero_affine` never clips).
    """
    levels = (1 << bits) - 1
    red, var = _reduce_dims(x, granularity)
    xd = x.detach()
    lo = (xd.amin(dim=red, keepdim=True) if red else xd).clamp_max(0.0)
    hi = (xd.amax(dim=red, keepdim=True) if red else xd).clamp_min(0.0)
    scale = ((hi - lo) / levels).clamp_min(1e-30)
    zero = round_half_even(-lo / scale)
    y = x / scale + zero
    y = stochastic_round(y, generator) if stochastic else round_half_even(y)
    q = torch.clamp(y, 0, levels) - zero
    return QTensor(q, scale, IntRange.symmetric(levels), bits, var)


def exact_zero_affine(
    x: Tensor,
    bits: int,
    granularity: Granularity = "tensor",
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> QTensor:
    """Affine codes over [min(x, 0), max(x, 0)] with 0.0 on an integer code and nothing clipped.

    The zero point z is an integer in [1, 2^b - 2] and the scale is the smallest one that fits both
    ends around it, s = max(-lo / z, hi / (L - z)), L = 2^b - 1. Since no value leaves [0, L],
    stochastic rounding is exactly unbiased -- fixing the scale first and rounding the zero point
    afterwards would clip the extremes by up to half a code. A tensor of one sign (where StatQuant's
    per-tensor quantizer divides 0 by 0) simply leaves one code unused. Codes are returned centred
    (q - z), in [-(2^b - 2), 2^b - 2].
    """
    if bits < 2:
        raise ValueError(f"an exact-zero affine quantizer needs at least 2 bits, got {bits}")
    levels = float((1 << bits) - 1)
    red, var = _reduce_dims(x, granularity)
    xd = x.detach()
    tiny = torch.finfo(xd.dtype).tiny
    neg_lo = (xd.amin(dim=red, keepdim=True) if red else xd).clamp_max(0.0).neg_()
    hi = (xd.amax(dim=red, keepdim=True) if red else xd).clamp_min(0.0)
    z = (neg_lo / ((hi + neg_lo) / levels).clamp_min(tiny)).round_().clamp_(1.0, levels - 1)
    scale = torch.maximum(neg_lo / z, hi / (levels - z)).clamp_min(tiny)
    # one full-size buffer, updated in place: allocating several per call dominated large tensors
    if stochastic:
        q = torch.rand(xd.shape, dtype=xd.dtype, device=xd.device, generator=generator)
        q.addcmul_(xd, scale.reciprocal()).add_(z).floor_()  # floor(x / s + z + u), u ~ U[0, 1)
    else:
        q = torch.addcmul(z, xd, scale.reciprocal()).round_()
    q.clamp_(0.0, levels).sub_(z)  # the clamp only absorbs float rounding of x / s
    return QTensor(q, scale, IntRange.symmetric(int(levels)), bits, var)


# -----------------------------------------------------------------------------------------------
# quantizer modules (stateful where needed, so state lands in checkpoints)


class Quantizer(nn.Module):
    """Base: `forward(x) -> QTensor`. `bits` is what the cost meter counts."""

    bits: int

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class WeightQuantizer(Quantizer):
    """Symmetric signed weight codes, per tensor (default) or per output channel."""

    def __init__(self, bits: int, granularity: Literal["tensor", "channel"] = "tensor"):
        super().__init__()
        self.bits = int(bits)
        self.granularity = granularity

    def forward(self, w: Tensor) -> QTensor:
        return symmetric_quantize(w, self.bits, self.granularity)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, granularity={self.granularity}"


@torch.no_grad()
def track_running_max(running_max: Tensor, initialized: Tensor, m: Tensor, momentum: float) -> None:
    """The training-time range EMA: the first batch's maximum, then an exponential moving average."""
    if bool(initialized):
        running_max.mul_(1 - momentum).add_(momentum * m)
    else:
        running_max.copy_(m)
        initialized.fill_(True)


class ActQuantizer(Quantizer):
    """Per-tensor activation codes: unsigned after ReLU, signed for the (normalised) network input.

    Training uses the batch maximum and tracks it in an EMA; evaluation uses the EMA (the grid the
    network trained under, which the harness exports by default) or, after a calibration over N
    batches, the calibrated maximum (max, or a percentile of |x|). The integer engine exports
    exactly the evaluation scale, so simulated and integer inference agree.
    """

    def __init__(self, bits: int, signed: bool = False, momentum: float = 0.1):
        super().__init__()
        self.bits = int(bits)
        self.signed = bool(signed)
        self.momentum = momentum
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._calib: list[Tensor] | None = None
        self._calib_method = "max"
        self._calib_pct = 100.0

    @property
    def qmax(self) -> int:
        return act_qmax(self.bits, self.signed)

    def scale_from_max(self, m: Tensor) -> Tensor:
        return (m / self.qmax).clamp_min(1e-12)

    @property
    def eval_scale(self) -> Tensor:
        return self.scale_from_max(self.running_max)

    def forward(self, x: Tensor) -> QTensor:
        xd = x.detach()
        if self._calib is not None:
            self._calib.append(_robust_max(act_magnitude(xd, self.signed), self._calib_method, self._calib_pct))
            m = self._calib[-1]
        elif self.training:
            m = act_magnitude(xd, self.signed).amax()
            track_running_max(self.running_max, self.initialized, m, self.momentum)
        else:
            m = self.running_max
        scale = self.scale_from_max(m)
        return signed_quantize(x, self.bits, scale) if self.signed else unsigned_quantize(x, self.bits, scale)

    def start_calibration(self, method: str = "max", percentile: float = 100.0) -> None:
        self._calib, self._calib_method, self._calib_pct = [], method, percentile

    def finish_calibration(self) -> None:
        """Set the evaluation range from the batches seen since `start_calibration`."""
        stats = self._calib or []
        self._calib = None
        if stats:
            s = torch.stack(stats)
            m = s.max() if self._calib_method == "max" else s.mean()
            self.running_max.copy_(m)
            self.initialized.fill_(True)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


def _robust_max(x: Tensor, method: str, pct: float) -> Tensor:
    if method == "max" or pct >= 100.0:
        return x.amax()
    flat = x.flatten()
    k = max(1, min(flat.numel(), int(round(flat.numel() * pct / 100.0))))
    return flat.kthvalue(k).values


class GradQuantizer(Quantizer):
    """Affine gradient codes with stochastic (exactly unbiased: `exact_zero_affine` clips nothing) or
    nearest rounding; granularity per role. Needs at least 2 bits."""

    def __init__(self, bits: int, granularity: Granularity = "tensor", stochastic: bool = True):
        super().__init__()
        self.bits = int(bits)
        self.granularity = granularity
        self.stochastic = stochastic

    def forward(self, g: Tensor) -> QTensor:
        return exact_zero_affine(g, self.bits, self.granularity, stochastic=self.stochastic)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, granularity={self.granularity}, stochastic={self.stochastic}"
