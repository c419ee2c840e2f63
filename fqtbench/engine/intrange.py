"""Declared value ranges of integer operands: the engine bounds accumulators from these, not from data."""

from __future__ import annotations

from dataclasses import dataclass

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class IntRange:
    """Closed interval [lo, hi] that every value of an integer operand lies in."""

    lo: int
    hi: int

    def __post_init__(self):
        if self.lo > self.hi:
            raise ValueError(f"empty IntRange [{self.lo}, {self.hi}]")

    @classmethod
    def signed(cls, bits: int) -> "IntRange":
        """Two's complement codes of `bits` bits: [-2^(b-1), 2^(b-1)-1]; 1 bit is {-1, 0}."""
        return cls(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)

    @classmethod
    def unsigned(cls, bits: int) -> "IntRange":
        return cls(0, (1 << bits) - 1)

    @classmethod
    def symmetric(cls, m: int) -> "IntRange":
        """[-m, m], e.g. centred affine codes q - z of a b-bit code: m = 2^b - 1."""
        return cls(-m, m)

    @property
    def max_abs(self) -> int:
        return max(abs(self.lo), abs(self.hi))

    @property
    def is_signed(self) -> bool:
        return self.lo < 0

    @property
    def bits(self) -> int:
        """Bits of the smallest two's complement (if signed) or unsigned format holding the range."""
        if self.lo >= 0:
            return max(1, self.hi.bit_length())
        b = 1
        while not (-(1 << (b - 1)) <= self.lo and self.hi <= (1 << (b - 1)) - 1):
            b += 1
        return b

    def contains(self, other: "IntRange") -> bool:
        return self.lo <= other.lo and other.hi <= self.hi


def accumulator_bound(k: int, a: IntRange, b: IntRange) -> int:
    """Largest |sum_k a_k b_k| possible for K = k terms."""
    return int(k) * a.max_abs * b.max_abs
