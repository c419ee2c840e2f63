"""Block Householder quantization (BHQ) of a gradient (its per-row quantizer is core.exact_zero_affine).

Chen et al., "A Statistical Framework for Low-bitwidth Training of Deep Neural Networks" (NeurIPS
2020). A per-sample (per-row) quantizer of an N x D gradient wastes its levels when a few rows have
a far larger range than the rest. BHQ sorts the rows by range, gives every large row a group of
small rows, and applies per group the Householder reflection Q that maps e_1 to ones/sqrt(sz):
the large row is spread evenly over its group, so after a per-group rescaling every row of
Y = T G has a similar range. Y is quantized per row with stochastic rounding and mapped back by
T^-1, so the result stays an unbiased estimate of G with a smaller variance.

T is block diagonal after a permutation. It is applied here with a sort, a segment sum
(``index_add_``) and a gather -- O(N D) work and no dense N x N matrix -- and built entirely on the
tensor's device, with no host synchronisation (no ``.item()``, no data-dependent shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .core import QTensor, exact_zero_affine

RANGE_EPS = 1e-8  # added to row ranges, relative to the largest one (zero rows must not divide by zero)


@dataclass
class BlockHouseholder:
    """The BHQ transform T of an N-row matrix, in "sorted" coordinates.

    Rows are sorted by range, descending; sorted position p < L is the large row of group p, the
    small rows p >= L belong to the group in ``group``. T G = H(diag(s) P G) and
    T^-1 Y = P^T diag(1/s) H(Y), where P sorts the rows and H applies each group's Householder
    reflection (symmetric and orthogonal, so it is its own inverse).
    """

    perm: Tensor  # sorted position -> original row
    unperm: Tensor  # original row -> sorted position
    group: Tensor  # sorted position -> group id (the sorted position of the group's large row)
    a: Tensor  # per group id: 1 / sqrt(group size)
    coef: Tensor  # per sorted row: 1 for a large row, -a / (1 - a) for a small one
    s: Tensor  # per sorted row: the rescaling before the reflection

    @classmethod
    def fit(cls, ranges: Tensor) -> "BlockHouseholder":
        """Build T from the row ranges (max - min of each row) of the matrix to quantize; N >= 2."""
        n = ranges.shape[0]
        if n < 2:
            raise ValueError("a block Householder transform needs at least 2 rows")
        tiny = torch.finfo(ranges.dtype).tiny
        v, perm = torch.sort(ranges + (RANGE_EPS * ranges.amax() + tiny), descending=True, stable=True)
        csum = torch.cumsum(v, 0)
        pos = torch.arange(n, device=ranges.device)
        rev = pos.flip(0)  # n - 1 - pos
        # Rows 0..last are large, the k = n - 1 - last others small: the smallest k at which every
        # large row's share k v_i / sum_(j<=last) v_j exceeds 1 (the last one's is the smallest), so
        # each large row gets at least one small row. last = 0 passes for n > 2; for n = 2 nothing
        # does and the two rows are paired.
        last = (pos[:-1] * (rev[:-1] * v[:-1] > csum[:-1])).amax().reshape(1)
        k = rev.gather(0, last)
        is_large = pos <= last
        # Large row i takes the small rows [e_(i-1), e_i) counted from the smallest, e_i = round of
        # its cumulative share: the largest rows, which get the most small rows, are spread over the
        # quietest ones (a lower lambda2 below; 5-10 % less variance than counting from the largest).
        share = v * is_large * (k / csum.gather(0, last))
        ends = torch.where(pos == last, k, (torch.cumsum(share, 0) + 0.5).floor_().long())  # e_last = k exactly
        ends.masked_fill_(~is_large, n)  # kept sorted for searchsorted
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        group = torch.where(is_large, pos, torch.searchsorted(ends, rev, right=True))
        size = (ends - starts + 1).clamp_(2, n).to(v.dtype)  # per group id; garbage-free for ids > last
        lam2 = v.gather(0, (n - ends).clamp_(0, n - 1))  # the group's largest small row
        a = size.rsqrt()
        off = a * a / (1 - a)  # Q = [[a, a 1^T], [a 1, I - off 1 1^T]]
        qmax = torch.where(size > 2, torch.maximum(off, 1 - off), a)  # max |Q_ij|
        # The group's row scales that minimise its variance after quantization (Chen et al.):
        # s1 = w1^(-1/3) for the large row, s2 = (w2 / (sz - 1))^(-1/3) for the small ones,
        # w1 = lambda1 / sqrt(sz), w2 = lambda2 max|Q|, both normalised so s1^-2 + s2^-2 = 1.
        rho = (lam2 * qmax / ((size - 1) * a * v)).pow_(2.0 / 3)  # (s1 / s2)^2
        s1 = (1 + rho).sqrt_()
        s = torch.where(is_large, s1, (s1 * rho.rsqrt_()).index_select(0, group))
        coef = torch.where(is_large, 1.0, (a / (a - 1)).index_select(0, group))  # -a / (1 - a)
        return cls(perm, torch.argsort(perm), group, a, coef, s)

    def _reflect(self, x: Tensor) -> Tensor:
        """H x for x (N, D) in sorted coordinates: x_j - u_j (u . x_group) / (1 - a), u = e_large - a 1."""
        u_dot = torch.zeros_like(x).index_add_(0, self.group, x)  # group sums ...
        u_dot.mul_(-self.a.unsqueeze(1)).add_(x)  # ... then row p < L holds u . x of group p
        return u_dot.index_select(0, self.group).mul_(-self.coef.unsqueeze(1)).add_(x)

    def transform(self, g: Tensor) -> Tensor:
        """T g for g (N, ...): rows in sorted order, rescaled, reflected."""
        x = g.reshape(g.shape[0], -1).index_select(0, self.perm).mul_(self.s.unsqueeze(1))
        return self._reflect(x).reshape(g.shape)

    def inverse(self, y: Tensor) -> Tensor:
        """T^-1 y for y (N, ...) in transformed coordinates, back in the original row order."""
        x = self._reflect(y.reshape(y.shape[0], -1)).div_(self.s.unsqueeze(1))
        return x.index_select(0, self.unperm).reshape(y.shape)


def bhq_quantize(g: Tensor, bits: int, generator: torch.Generator | None = None) -> QTensor:
    """Block Householder quantization of g (N, ...), rows = samples; unbiased: E[dequant] = g.

    The codes and the per-row scales live in transformed coordinates; the returned QTensor's
    ``inverse`` maps any (N, ...) tensor linear in them (its dequantized value, or the output of the
    grad-input GEMM, which is per sample) back through T^-1 along dim 0.
    """
    if g.shape[0] < 2:
        return exact_zero_affine(g, bits, "row", stochastic=True, generator=generator)
    gd = g.detach()
    flat = gd.reshape(gd.shape[0], -1)
    t = BlockHouseholder.fit(flat.amax(1) - flat.amin(1))
    qt = exact_zero_affine(t.transform(gd), bits, "row", stochastic=True, generator=generator)
    qt.inverse = t.inverse
    return qt
