"""CPT's cyclic precision schedule (official `cyclic_adjust_precision`, re-derived).

Each cycle of T = int(total_steps / num_cycles) iterations is a half-cosine ramp from `lo` up to
`hi` bits, then the precision drops back to `lo`. The ramp is evaluated with the same floating-point
expression as the official code, `lo + (hi - lo)/2 * (1 + cos(pi * ((t mod T)/T) + pi))` (the
division first: `pi * t / T` differs in the last digit, which flips a tie at t/T = 1/3 or 2/3 for
4-6 and 2-8 bits), and rounded
half to even (`np.rint`), so the bit chosen at every iteration matches it exactly -- which is what
makes the paper's printed BitOPs savings reproducible to the last digit.
"""

from __future__ import annotations

import math

from fqtbench.errors import ConfigError


def cycle_length(total_steps: int, num_cycles: int) -> int:
    """Iterations per cycle, truncated like the official code (steps past num_cycles*T start a partial cycle)."""
    t = int(total_steps // num_cycles)
    if t < 1:
        raise ConfigError(f"cpt.num_cycles={num_cycles}: more cycles than the {total_steps} training steps; "
                          f"use at most {total_steps}")
    return t


def cyclic_bits(step: int, cycle: int, lo: int, hi: int) -> int:
    """Forward bits at iteration `step` (0-based): the ramp lo -> hi of the current cycle, half to even."""
    ramp = lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * ((step % cycle) / cycle) + math.pi))
    return round(ramp)  # Python's round() is round-half-to-even, like np.rint
