"""Fixed-point requantization: a real multiplier M as an int32 mantissa m and a right shift.

    M ~= m * 2^-shift,  |m| < 2^p  (p = mantissa bits, 31 unless the input is wide; per channel,
                         the largest multiplier has p bits and every other keeps at least 20)
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
MIN_SHARED_BITS = 20  # per-channel mantissas keep at least this many bits under one shared shift


@dataclass(frozen=True)
class FixedPoint:
    """Per-tensor (scalar) or per-channel (1-D) multipliers: mantissas `m` and shifts `shift` (int64).

    Per-channel multipliers share one shift whenever every channel still keeps at least
    `MIN_SHARED_BITS` mantissa bits that way: a single shift is several times faster to apply.
    """

    m: Tensor
    shift: Tensor

    @classmethod
    def from_real(cls, multiplier: Tensor | float, input_bound: int = 2**31 - 1, max_bits: int = 31) -> "FixedPoint":
        """Encode real multipliers (any sign; 0 allowed) for inputs with |v| <= input_bound."""
        mult = torch.as_tensor(multiplier, dtype=torch.float64)
        in_bits = max(1, int(input_bound).bit_length())
        p = max(2, min(max_bits, INT64_SAFE_BITS - in_bits))
        values = mult.reshape(-1).tolist()
        for x in values:
            if not math.isfinite(x):
                raise ValueError(f"requantization multiplier is not finite: {x}")
        nonzero = [abs(x) for x in values if x != 0.0]
        if nonzero and max(nonzero) * int(input_bound) >= 2.0**INT64_SAFE_BITS:  # the result itself would wrap
            raise ValueError(f"requantization multiplier {max(nonzero):g} on inputs up to {int(input_bound)} "
                             f"leaves the int64 range")
        if nonzero:
            shared = (p - 1) - math.floor(math.log2(max(nonzero)))  # the largest gets p bits
            smallest_bits = math.floor(math.log2(min(nonzero))) + shared + 1
            if len(values) > 1 and smallest_bits >= MIN_SHARED_BITS and -62 < shared <= 62:
                ms = [int(round(x * 2.0**shared)) for x in values]
                if max(abs(m) for m in ms) < 2**p:
                    return cls(torch.tensor(ms, dtype=torch.int64).reshape(mult.shape),
                               torch.full(mult.shape, shared, dtype=torch.int64))
        ms, shifts = [], []
        for x in values:
            if x == 0.0:
                ms.append(0)
                shifts.append(0)
                continue
            e = math.floor(math.log2(abs(x)))  # 2^e <= |x| < 2^(e+1)
            shift = (p - 1) - e  # |x| * 2^shift in [2^(p-1), 2^p)
            m = int(round(abs(x) * 2.0**shift))
            if m >= 2**p:  # rounding reached the next power of two
                m //= 2
                shift -= 1
            if shift > 62:  # |v * m| < 2^62, so a shift of 63 or more rounds every input to 0 (and 1 << 63 overflows)
                m, shift = 0, 0
            ms.append(m if x > 0 else -m)
            shifts.append(shift)
        shape = mult.shape
        return cls(torch.tensor(ms, dtype=torch.int64).reshape(shape), torch.tensor(shifts, dtype=torch.int64).reshape(shape))

    def real(self) -> Tensor:
        return self.m.double() * torch.pow(2.0, -self.shift.double())


def _uniform_shift(shift: Tensor) -> int | None:
    flat = shift.reshape(-1)
    first = int(flat[0])
    return first if flat.numel() == 1 or bool((flat == first).all()) else None


def rshift_round(v: Tensor, shift: Tensor | int) -> Tensor:
    """floor(v / 2^shift + 1/2) for int64 v; shift <= 0 multiplies by 2^-shift (exact)."""
    shift = torch.as_tensor(shift, dtype=torch.int64, device=v.device)
    s = _uniform_shift(shift)
    if s is not None:
        if s > 0:
            return (v + (1 << (s - 1))) >> s
        return v << (-s) if s < 0 else v
    pos = shift.clamp_min(0)
    neg = (-shift).clamp_min(0)
    half = torch.where(pos > 0, torch.ones_like(pos) << (pos - 1).clamp_min(0), torch.zeros_like(pos))
    return ((v + half) >> pos) << neg


def _rshift_round_(v: Tensor, shift: Tensor, s: int | None) -> Tensor:
    """In-place `rshift_round` when the shift is uniform (`s`), else out of place."""
    if s is None:
        return rshift_round(v, shift)
    if s > 0:
        return v.add_(1 << (s - 1)).bitwise_right_shift_(s)
    return v.bitwise_left_shift_(-s) if s < 0 else v


# Work in blocks of this many int64 elements: temporaries stay in cache and below glibc's mmap
# threshold (a fresh allocation above ~32 MB page-faults on every call, which costs more than the math).
BLOCK_ELEMENTS = 1 << 17


def _blocks(n_rows: int, row: int):
    step = max(1, BLOCK_ELEMENTS // max(1, row))
    for i in range(0, n_rows, step):
        yield slice(i, min(n_rows, i + step))


def _as_rows(t: Tensor) -> Tensor:
    return t.reshape(1, 1) if t.dim() == 0 else t.reshape(-1, t.shape[-1])


def requantize(v: Tensor, fp: FixedPoint, lo: int | None = None, hi: int | None = None, extra_shift: int = 0,
               out_dtype: torch.dtype = torch.int64) -> Tensor:
    """clamp(round_half_up(v * M * 2^extra_shift), lo, hi); per-channel M broadcasts on the last dim."""
    out = torch.empty(v.shape, dtype=out_dtype, device=v.device)
    src, dst = _as_rows(v), _as_rows(out)
    shift = fp.shift - extra_shift
    s = _uniform_shift(shift)
    for rows in _blocks(src.shape[0], src.shape[1]):
        blk = src[rows].to(torch.int64, copy=True).mul_(fp.m)
        blk = _rshift_round_(blk, shift, s)
        if lo is not None or hi is not None:
            blk.clamp_(lo, hi)
        dst[rows] = blk
    return out


def add_requantize(a: Tensor, fa: FixedPoint, b: Tensor, fb: FixedPoint, guard: int, lo: int | None, hi: int | None,
                   out_dtype: torch.dtype = torch.int64) -> Tensor:
    """clamp(round(a*Ma + b*Mb), lo, hi): each term is rounded to `guard` extra fractional bits, then
    the sum rounds to the output code (the first roundings can move only ties within 2^-guard)."""
    out = torch.empty(a.shape, dtype=out_dtype, device=a.device)
    sa, sb, so = _as_rows(a), _as_rows(b), _as_rows(out)
    sha, shb = fa.shift - guard, fb.shift - guard
    ua, ub = _uniform_shift(sha), _uniform_shift(shb)
    g = torch.tensor(guard, dtype=torch.int64)
    for rows in _blocks(sa.shape[0], sa.shape[1]):
        t = _rshift_round_(sa[rows].to(torch.int64, copy=True).mul_(fa.m), sha, ua)
        t += _rshift_round_(sb[rows].to(torch.int64, copy=True).mul_(fb.m), shb, ub)
        t = _rshift_round_(t, g, guard)
        if lo is not None or hi is not None:
            t.clamp_(lo, hi)
        so[rows] = t
    return out
