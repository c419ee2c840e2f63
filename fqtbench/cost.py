"""The cost ledger: every GEMM that runs during training reports its MACs and operand bit-widths here.

BitOPs = MACs x b_a x b_b, with floating-point operands counted as 32 bits. The ledger is off
unless a `CostMeter` (or a benchmark) opens it, so inference and evaluation cost nothing to record.
Roles are the three GEMMs of a layer -- ``fwd``, ``grad_input``, ``grad_weight`` -- plus ``fitness``
for gradient-free population evaluation.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

FLOAT_BITS = 32
ROLES = ("fwd", "grad_input", "grad_weight", "fitness")

# One process-wide stack, not thread-local: autograd may run backward on a device thread.
_STACK: list["CostTally"] = []


@dataclass
class CostTally:
    """MACs and BitOPs per role; additive."""

    macs: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bitops: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, role: str, macs: int, a_bits: int | None, b_bits: int | None) -> None:
        a = FLOAT_BITS if a_bits is None else int(a_bits)
        b = FLOAT_BITS if b_bits is None else int(b_bits)
        self.macs[role] += int(macs)
        self.bitops[role] += int(macs) * a * b

    def merge(self, other: "CostTally") -> None:
        for role, v in other.macs.items():
            self.macs[role] += v
        for role, v in other.bitops.items():
            self.bitops[role] += v

    @property
    def total_macs(self) -> int:
        return sum(self.macs.values())

    @property
    def total_bitops(self) -> int:
        return sum(self.bitops.values())

    def as_dict(self) -> dict:
        return {
            "macs": {k: int(v) for k, v in sorted(self.macs.items())},
            "bitops": {k: int(v) for k, v in sorted(self.bitops.items())},
            "total_macs": int(self.total_macs),
            "total_bitops": int(self.total_bitops),
        }


def _stack() -> list[CostTally]:
    return _STACK


def record(role: str, macs: int, a_bits: int | None, b_bits: int | None) -> None:
    """Report one GEMM. A no-op unless a tally is open."""
    stack = _stack()
    if stack:
        stack[-1].add(role, macs, a_bits, b_bits)


def is_recording() -> bool:
    return bool(_stack())


@contextmanager
def tally():
    """Open a tally; GEMMs run inside the block are counted into it (nested tallies do not leak)."""
    t = CostTally()
    stack = _stack()
    stack.append(t)
    try:
        yield t
    finally:
        stack.pop()


@contextmanager
def paused():
    """Stop counting inside the block (e.g. a method's bookkeeping forward that is not training work)."""
    stack = _stack()
    saved = list(stack)
    stack.clear()
    try:
        yield
    finally:
        stack.extend(saved)
