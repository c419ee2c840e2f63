"""Fixed-point requantization: a real multiplier M as an int32 mantissa m and a right shift.

    M ~= m * 2^-shift,  2^(p-1) <= |m| < 2^p  (p = mantissa bits, 31 unless the input is wide)
    requant(v) = (v * m + 2^(shift-1)) >> shift          (arithmetic shift)

**Rounding rule: round half up** (towards +infinity): the result is floor(v * m / 2^shift + 1/2),
for negative values too. Products are formed in int64; the mantissa width is reduced when the
input's bound would make v * m overflow int64. A negative shift means a left shift (M >= 2^p).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

INT64_SAFE_BITS = 62  # |v * m| < 2^62 leaves headroom for the rounding term


@dataclass(frozen=True)
class FixedPoint:
    """Per-tensor (scalar) or per-channel (1-D) multipliers: mantissas `m` and shifts `shift` (int64)."""

    m: Tensor
    shift: Tensor

    @classmethod
    def from_real(cls, multiplier: Tensor | float, input_bound: int = 2**31 - 1, max_bits: int = 31) -> "FixedPoint":
        """Encode real multipliers (any sign; 0 allowed) for inputs with |v| <= input_bound."""
        mult = torch.as_tensor(multiplier, dtype=torch.float64)
        in_bits = max(1, int(input_bound).bit_length())
        p = max(2, min(max_bits, INT64_SAFE_BITS - in_bits))
        ms, shifts = [], []
        for x in mult.reshape(-1).tolist():
            if x == 0.0 or not math.isfinite(x):
                if not math.isfinite(x):
                    raise ValueError(f"requantization multiplier is not finite: {x}")
                ms.append(0)
                shifts.append(0)
                continue
            e = math.floor(math.log2(abs(x)))  # 2^e <= |x| < 2^(e+1)
            shift = (p - 1) - e  # |x| * 2^shift in [2^(p-1), 2^p)
            m = int(round(abs(x) * 2.0**shift))
            if m >= 2**p:  # rounding reached the next power of two
                m //= 2
                shift -= 1
            if shift > 120:  # vanishingly small multiplier: the result is 0 for every representable input
                m, shift = 0, 0
            ms.append(m if x > 0 else -m)
            shifts.append(shift)
        shape = mult.shape
        return cls(torch.tensor(ms, dtype=torch.int64).reshape(shape), torch.tensor(shifts, dtype=torch.int64).reshape(shape))

    def real(self) -> Tensor:
        return self.m.double() * torch.pow(2.0, -self.shift.double())


def rshift_round(v: Tensor, shift: Tensor | int) -> Tensor:
    """floor(v / 2^shift + 1/2) for int64 v; shift <= 0 multiplies by 2^-shift (exact)."""
    shift = torch.as_tensor(shift, dtype=torch.int64, device=v.device)
    pos = shift.clamp_min(0)
    neg = (-shift).clamp_min(0)
    half = torch.where(pos > 0, torch.ones_like(pos) << (pos - 1).clamp_min(0), torch.zeros_like(pos))
    return ((v + half) >> pos) << neg


def requantize(v: Tensor, fp: FixedPoint, lo: int | None = None, hi: int | None = None, extra_shift: int = 0) -> Tensor:
    """clamp(round_half_up(v * M * 2^extra_shift), lo, hi) in int64; per-channel M broadcasts on the last dim."""
    prod = v.to(torch.int64) * fp.m
    out = rshift_round(prod, fp.shift - extra_shift)
    if lo is not None or hi is not None:
        out = out.clamp(lo, hi)
    return out
