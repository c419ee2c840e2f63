"""BSQ's bit representation of one layer's weight, which is also that layer's weight quantizer.

A layer of precision n holds two stacks of n trainable bit-planes, ``pweight`` and ``nweight``
(MSB first, shape ``(n, *weight.shape)``), and a trainable scalar ``scale``. Their continuous value
``Wc = sum_b (pweight_b - nweight_b) * 2^(n-1-b) / (2^n - 1)`` goes through a straight-through
n-bit rounding of its magnitude, so the effective weight is ``scale / (2^n-1) * k`` with the integer
code ``k = sign(Wc) * round(min(|Wc|, 1) * (2^n - 1))`` and the gradient reaches every bit
variable as ``dL/dW * scale * 2^(n-1-b) / (2^n - 1)``. ``n`` counts magnitude bits: the sign comes
from the p/n split and is not counted, as in the paper. The exported codes are stored in n + 1 bits
(two's complement of [-(2^n-1), 2^n-1]), which is what the shared size and BitOPs columns count, as
they do every other method's sign bit.

:meth:`requantize` re-decomposes into exact {0, 1} bits and adjusts n (grow on overflow, drop
all-zero MSB planes and sparse LSB planes); :meth:`to_float` switches to the fine-tuning form (one
float tensor ``Wc`` in [-1, 1], n fixed). The same module is the layer's weight quantizer: its
``forward`` turns the effective weight back into the exact codes ``k`` for the integer export.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from fqtbench.engine.export import MAX_ENGINE_BITS
from fqtbench.engine.intrange import IntRange
from fqtbench.quant.core import QTensor, Quantizer

MAX_MAGNITUDE_BITS = MAX_ENGINE_BITS - 1  # plus the sign: the integer engine's widest weight
Form = Literal["bits", "float"]


def _levels(bits: int) -> int:
    return (1 << bits) - 1


def _round_codes(u: Tensor, levels: int) -> Tensor:
    """Integer codes of continuous codes u: magnitude rounded and clipped to `levels`, sign kept."""
    u = u.detach()
    return torch.sign(u) * torch.round(u.abs().clamp(max=float(levels)))


class BitWeight(Quantizer):
    """A weight as n trainable magnitude bit-planes plus a scale; see the module docstring."""

    def __init__(self, weight: Tensor, bits: int):
        super().__init__()
        w = weight.detach().float()
        amax = float(w.abs().max())
        self.shape = tuple(w.shape)
        self.form: Form = "bits"
        self.scale = nn.Parameter(torch.tensor(amax if amax > 0 else 1.0, device=w.device))
        self.bits = int(bits)
        codes = torch.round(w / amax * _levels(bits)) if amax > 0 else torch.zeros_like(w)
        self._set_codes(codes, self.bits)

    # ---- the representation ------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return _levels(self.bits)

    def unit(self) -> Tensor:
        """Real value of one integer code step (the per-tensor scale of the exported codes)."""
        return self.scale / self.levels if self.bits else self.scale.abs()

    def continuous(self) -> Tensor:
        """Wc: the value of the bit variables in units of `scale` (may exceed 1 between re-quantizations)."""
        if self.form == "float":
            return self.value
        exps = torch.pow(2.0, torch.arange(self.bits - 1, -1, -1, dtype=self.pweight.dtype, device=self.pweight.device))
        exps = (exps / self.levels).view(-1, *([1] * len(self.shape)))
        return ((self.pweight - self.nweight) * exps).sum(0)

    @torch.no_grad()
    def codes(self) -> Tensor:
        """The integer codes k in [-(2^n-1), 2^n-1] of the current forward pass."""
        if self.bits == 0:
            return torch.zeros(self.shape, device=self.scale.device)
        return _round_codes(self.continuous() * self.levels, self.levels)

    def effective(self, _weight: Tensor | None = None) -> Tensor:
        """The layer's weight (its `weight_fn`): unit * k, straight-through to the bit variables and the scale."""
        if self.bits == 0:
            return torch.zeros(self.shape, device=self.scale.device)
        u = self.continuous() * self.levels
        return self.unit() * (u + (_round_codes(u, self.levels) - u).detach())

    def forward(self, w: Tensor) -> QTensor:
        """Quantizer interface: the effective weight -> its exact codes and this layer's unit."""
        unit = self.unit().detach()
        q = torch.round(w.detach() / unit).clamp(-self.levels, self.levels) if self.bits else torch.zeros_like(w)
        return QTensor(q, unit, IntRange.symmetric(self.levels), self.stored_bits, ())

    @property
    def stored_bits(self) -> int:
        """Bits of the exported codes: the n magnitude bits plus the sign (0 for a pruned layer)."""
        return self.bits + 1 if self.bits else 0

    def plane_norms(self) -> Tensor:
        """L2 norm of each bit-plane (positive and negative together): the groups of the group Lasso."""
        dims = tuple(range(1, len(self.shape) + 1))
        return torch.sqrt((self.pweight.pow(2) + self.nweight.pow(2)).sum(dims) + 1e-8)

    def bit_variables(self) -> list[nn.Parameter]:
        return [self.pweight, self.nweight] if self.form == "bits" else [self.value]

    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    # ---- re-quantization -----------------------------------------------------------------------
    @torch.no_grad()
    def requantize(self, threshold: float = 0.0) -> None:
        """Re-decompose into exact bits and adjust the precision (BSQ's quant + pruning).

        Overflowing magnitudes (|Wc| > 1, i.e. codes above 2^n - 1) grow the layer by one bit, up to
        MAX_MAGNITUDE_BITS (above it they clip). All-zero MSB planes are dropped, then LSB planes whose share of
        nonzero bits is at most `threshold` (the magnitude shifts right, the unit doubles). With
        threshold 0 and no clipping the layer's function is unchanged. A layer may reach 0 bits.
        """
        if self.form != "bits" or self.bits == 0:
            return
        n, unit = self.bits, self.unit().detach()
        r = torch.round(self.continuous() * self.levels)
        if unit < 0:  # keep the scale positive; the sign lives in the planes
            r, unit = -r, -unit
        mag, sign = r.abs().to(torch.int64), torch.sign(r)
        while int(mag.max()) > _levels(n) and n < MAX_MAGNITUDE_BITS:  # overflow: grow (one bit while the variables stay in [0, 2])
            n += 1
        mag = mag.clamp(max=_levels(n))  # beyond MAX_MAGNITUDE_BITS the codes clip, as the forward pass did
        while n > 0 and int(mag.max()) < (1 << (n - 1)):  # all-zero MSB plane
            n -= 1
        while n > 0 and float((mag & 1).count_nonzero()) / mag.numel() <= threshold:  # sparse LSB plane
            mag, unit, n = mag >> 1, unit * 2, n - 1  # the MSB plane stays nonzero: floor keeps its bit
        self.scale.data = (unit * _levels(n) if n else unit).reshape(())
        self.bits = n
        self._set_codes(sign * mag.to(r.dtype), n)

    @torch.no_grad()
    def to_float(self) -> None:
        """Fine-tuning form (the official `to_finetune`): one float tensor Wc in [-1, 1], n fixed."""
        if self.form == "float":
            return
        wc = self.continuous().detach().clone() if self.bits else torch.zeros(self.shape, device=self.scale.device)
        del self.pweight, self.nweight
        self.form = "float"
        self.value = nn.Parameter(wc)

    def _set_codes(self, codes: Tensor, bits: int) -> None:
        """Exact planes of the integer codes (|codes| < 2^bits); new Parameters, since n may change."""
        mag = codes.abs().to(torch.int64)
        shifts = torch.arange(bits - 1, -1, -1, device=codes.device).view(-1, *([1] * codes.dim()))
        planes = ((mag.unsqueeze(0) >> shifts) & 1).to(codes.dtype)
        self.pweight = nn.Parameter(planes * (codes > 0))
        self.nweight = nn.Parameter(planes * (codes < 0))

    # ---- checkpoints: n and the form decide the parameter shapes -------------------------------
    def get_extra_state(self) -> dict:
        return {"bits": self.bits, "form": self.form}

    def set_extra_state(self, state: dict) -> None:
        self.bits, self.form = int(state["bits"]), state["form"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Re-shape the parameters to the saved precision and form before they are copied in."""
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            for name in ("pweight", "nweight", "value"):
                if hasattr(self, name):
                    delattr(self, name)
            self.bits, self.form = int(extra["bits"]), extra["form"]
            names = ("value",) if self.form == "float" else ("pweight", "nweight")
            for name in names:
                setattr(self, name, nn.Parameter(torch.empty_like(state_dict[prefix + name])))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, form={self.form}, shape={self.shape}"
