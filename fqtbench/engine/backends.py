"""Exact integer GEMM and conv backends: `reference` (int64 oracle), `int8` (im2col + torch._int_mm), `bitserial`.

Every backend returns the exact integer result: int32 when the accumulator bound of the declared ranges
fits int32, otherwise int64 (policy "split") or AccumulatorOverflowError (policy "error"). Nothing here
calls matmul/conv on int8..int32 tensors: those return the input dtype and wrap silently. The exact
paths are torch._int_mm (int8/uint8 x int8 -> int32, kept below 2^31 by construction), int64, and
float64 where every partial sum stays below 2^53.

Convolutions take and return channels-last (N, H, W, C) tensors: an im2col row is then kh runs of kw*C
contiguous input bytes, and a 1x1 stride-1 conv (and so every linear layer) needs no copy at all.
"""

from __future__ import annotations

import functools
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from fqtbench.engine.intrange import INT32_MAX, IntRange, accumulator_bound
from fqtbench.errors import AccumulatorOverflowError, ConfigError

INT64_MAX = 2**63 - 1
OVERFLOW_POLICIES = ("split", "error")

# On CPU the column matrix is built and consumed in blocks whose columns plus GEMM outputs take about this
# many bytes: the copy and the GEMM then meet in cache, and the buffers stay under glibc's mmap threshold
# so they are not page-faulted in anew on every call.
CPU_COLUMN_CHUNK_BYTES = 2 << 20

_NARROW_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------- helpers


def _pair(v) -> tuple[int, int]:
    """Normalise an int or (h, w) pair."""
    if isinstance(v, int):
        return (v, v)
    h, w = v
    return (int(h), int(w))


def conv_output_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def narrow_dtype(r: IntRange) -> torch.dtype:
    """Smallest integer dtype holding r: the im2col copy moves as few bytes as possible."""
    for dt in _NARROW_DTYPES:
        info = torch.iinfo(dt)
        if info.min <= r.lo and r.hi <= info.max:
            return dt
    raise ValueError(f"range [{r.lo}, {r.hi}] does not fit int64")


def _fmt(r: IntRange) -> str:
    return f"[{r.lo}, {r.hi}]"


def _check_values(t: torch.Tensor, r: IntRange, what: str) -> None:
    """Values outside the declared range would wrap in the narrowing casts, so refuse them."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor, got {t.dtype}")
    info = torch.iinfo(t.dtype)
    if t.numel() == 0 or (r.lo <= info.min and info.max <= r.hi):
        return
    lo, hi = (int(v) for v in torch.aminmax(t))
    if lo < r.lo or hi > r.hi:
        raise ValueError(f"{what} values span [{lo}, {hi}], outside its declared range {_fmt(r)}")


def _weight_matrix(w4: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, kh, kw) -> contiguous (kh*kw*Cin, Cout), matching the channels-last im2col order."""
    cout = w4.shape[0]
    return w4.permute(2, 3, 1, 0).reshape(-1, cout).contiguous()


def _padded(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    ph, pw = padding
    return F.pad(x, (0, 0, pw, pw, ph, ph)) if ph or pw else x.contiguous()


def _output_hw(x: torch.Tensor, kernel, stride, padding, dilation) -> tuple[int, int]:
    h, w = x.shape[1:3]
    ho = conv_output_size(h, kernel[0], stride[0], padding[0], dilation[0])
    wo = conv_output_size(w, kernel[1], stride[1], padding[1], dilation[1])
    if ho <= 0 or wo <= 0:
        raise ValueError(f"conv output would be empty: input {h}x{w}, kernel {kernel}, padding {padding}")
    return ho, wo


def im2col_view(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """Channels-last (N, H, W, C) -> zero-padded strided view (N, Ho, Wo, kh, kw, C) without copying.

    Row (n, ho, wo) of the im2col matrix is view[n, ho, wo] flattened, in (kh, kw, C) order.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    ho, wo = _output_hw(x, kernel, stride, padding, dilation)
    xp = _padded(x, padding)
    s_n, s_h, s_w, s_c = xp.stride()
    return xp.as_strided(
        (x.shape[0], ho, wo, kh, kw, x.shape[3]),
        (s_n, sh * s_h, sw * s_w, dh * s_h, dw * s_w, s_c),
        xp.storage_offset(),
    )


def im2col(x: torch.Tensor, kernel, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """Contiguous (N*Ho*Wo, kh*kw*C) column matrix of a channels-last input, in x's dtype."""
    view = im2col_view(x, _pair(kernel), _pair(stride), _pair(padding), _pair(dilation))
    return view.reshape(-1, view.shape[3] * view.shape[4] * view.shape[5])


@functools.lru_cache(maxsize=64)
def _kernel_row_index(nb: int, hn: int, ho: int, wo: int, kh: int, sh: int, dh: int, device) -> torch.Tensor:
    """Gather index for the second im2col stage: output (b, ho, wo), kernel row i <- row (b, ho*sh + i*dh, wo)."""
    b = torch.arange(nb).view(nb, 1, 1, 1) * hn
    h = (torch.arange(ho) * sh).view(1, ho, 1, 1) + (torch.arange(kh) * dh).view(1, 1, 1, kh)
    return ((b + h) * wo + torch.arange(wo).view(1, 1, wo, 1)).reshape(-1).to(device)


def column_chunks(x, kernel, stride, padding, dilation, max_rows: int | None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first_row, cols): consecutive image blocks of the contiguous (rows, kh*kw*C) im2col matrix.

    A block holds whole images, as many as fit in max_rows output rows (at least one; None: all).
    cols lives in a buffer reused for the next block. A plain strided copy of the (..., kh, kw, C) view costs
    one TensorIterator inner loop per kw*C-byte run, kh per output row, which dominated the conv. So the
    columns are built in two stages: a strided copy of the kw-wide horizontal windows of every needed input
    row (~Hp/Ho runs per output row), then an index_select of kh of those rows per output row, which memcpys
    whole rows; together about 2x faster than the one strided copy on ResNet-20 shapes.
    """
    view = im2col_view(x, kernel, stride, padding, dilation)
    n, ho, wo, kh, kw, c = view.shape
    k = kh * kw * c
    if view.is_contiguous():  # 1x1, stride 1, no padding (or a kernel covering the input): x is the matrix
        yield 0, view.view(-1, k)
        return
    nb = n if max_rows is None else max(1, min(n, max_rows // (ho * wo)))
    cols_buf = torch.empty(nb * ho * wo * k, dtype=view.dtype, device=view.device)
    if kh == 1:  # one run per output row already
        for n0 in range(0, n, nb):
            block = view[n0 : n0 + nb]
            yield n0 * ho * wo, cols_buf[: block.numel()].view(block.shape).copy_(block).view(-1, k)
        return
    sh, dh = stride[0], dilation[0]
    hn = (ho - 1) * sh + (kh - 1) * dh + 1  # padded input rows any output reads
    s_n, s_hk, s_w, s_kw, s_c = view.stride(0), view.stride(3), view.stride(2), view.stride(4), view.stride(5)
    windows = view.as_strided((n, hn, wo, kw, c), (s_n, s_hk // dh, s_w, s_kw, s_c))
    rows_buf = torch.empty(nb * hn * wo * kw * c, dtype=view.dtype, device=view.device)
    index = _kernel_row_index(nb, hn, ho, wo, kh, sh, dh, view.device)
    for n0 in range(0, n, nb):
        block = windows[n0 : n0 + nb]
        rows = rows_buf[: block.numel()].view(block.shape).copy_(block).view(-1, kw * c)
        m = block.shape[0] * ho * wo
        cols = cols_buf[: m * k].view(-1, kw * c)
        torch.index_select(rows, 0, index[: m * kh], out=cols)
        yield n0 * ho * wo, cols.view(m, k)


# ------------------------------------------------------------------------------------ exact int8 GEMMs

_cuda_int_mm_ok: dict[int, bool] = {}
_cuda_lock = threading.Lock()


def _padded_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch._int_mm under CUDA's shape rules (M > 16, K and N multiples of 8), by zero padding."""
    m, k = a.shape
    n = b.shape[1]
    pm, pk, pn = max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8
    if (pm, pk, pn) != (m, k, n):
        a = F.pad(a, (0, pk - k, 0, pm - m))
        b = F.pad(b, (0, pn - n, 0, pk - k))
    return torch._int_mm(a.contiguous(), b.contiguous())[:m, :n]


def int_mm_self_test(device: torch.device) -> bool:
    """Check torch._int_mm on `device` against int64 on a few awkward shapes; warn and return False if wrong."""
    gen = torch.Generator().manual_seed(0)
    try:
        for m, k, n in ((17, 8, 8), (5, 3, 7), (40, 136, 24)):
            a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
            b = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int8)
            a[0], b[:, 0] = -128, -128  # the extreme product in every term of one output
            got = _padded_int_mm(a.to(device), b.to(device)).cpu()
            if got.dtype != torch.int32 or not torch.equal(got.long(), a.long() @ b.long()):
                raise RuntimeError(f"wrong result for shape ({m}, {k}) x ({k}, {n})")
    except RuntimeError as e:
        warnings.warn(
            f"torch._int_mm failed its self-test on {device} ({e}); int8 GEMMs there fall back to exact float64",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def _cuda_ok(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _cuda_lock:
        if index not in _cuda_int_mm_ok:
            _cuda_int_mm_ok[index] = int_mm_self_test(torch.device("cuda", index))
        return _cuda_int_mm_ok[index]


def _mm8(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int32 a @ b for an int8 (or, on CPU, uint8) a and int8 b. Callers keep K*|a|*|b| <= 2^31-1.

    Operands are made contiguous: the CPU kernel silently returns garbage for a row stride below K.
    """
    a, b = a.contiguous(), b.contiguous()
    if a.device.type == "cpu":
        return torch._int_mm(a, b, out=out)
    if a.device.type != "cuda":  # no int8 GEMM known there
        res = torch._int_mm(a.cpu(), b.cpu()).to(a.device)
    elif _cuda_ok(a.device):
        res = _padded_int_mm(a, b)
    else:  # exact: every partial sum is below 2^31 < 2^53
        res = (a.double() @ b.double()).to(torch.int32)
    return res if out is None else out.copy_(res)


def _int_mm_exact(a: torch.Tensor, b: torch.Tensor, per_term: int) -> torch.Tensor:
    """a @ b with |a_ik * b_kj| <= per_term: int32 if K*per_term fits, else int32 K-chunks summed in int64."""
    k = a.shape[1]
    if k * per_term <= INT32_MAX:
        return _mm8(a, b)
    step = INT32_MAX // per_term
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64, device=a.device)
    for k0 in range(0, k, step):
        acc += _mm8(a[:, k0 : k0 + step], b[k0 : k0 + step])
    return acc


def _mm_lhs(t: torch.Tensor) -> torch.Tensor:
    """t as a left _int_mm operand: int8, or uint8 where the CPU kernel accepts it."""
    if t.dtype == torch.int8 or (t.dtype == torch.uint8 and t.device.type == "cpu"):
        return t
    return t.to(torch.int8)


@dataclass(frozen=True)
class Limb:
    """One term of v = sum(limb.t << limb.shift): an _int_mm operand and the range of its values."""

    t: torch.Tensor
    r: IntRange
    shift: int


def limbs(v: torch.Tensor, r: IntRange, uint8_ok: bool) -> list[Limb]:
    """Split v into int8 (or uint8 if uint8_ok) limbs, 7 (or 8) bits each, the top limb signed."""
    width = 8 if uint8_ok else 7
    low_dtype = torch.uint8 if uint8_ok else torch.int8
    mask = (1 << width) - 1

    def fits(lo, hi):
        return -128 <= lo and hi <= 127 or (uint8_ok and lo >= 0 and hi <= 255)

    out, shift, lo, hi = [], 0, r.lo, r.hi
    while not fits(lo, hi):
        out.append(Limb((v & mask).to(low_dtype), IntRange(0, mask), shift))
        v, lo, hi, shift = v >> width, lo >> width, hi >> width, shift + width
    out.append(Limb(v.to(torch.int8 if lo >= -128 and hi <= 127 else torch.uint8), IntRange(lo, hi), shift))
    return out


def plane_weights(r: IntRange) -> list[int]:
    """Weights of the r.bits bit-planes: 2^i, the top one negative for two's complement (signed r)."""
    w = [1 << i for i in range(r.bits)]
    if r.is_signed:
        w[-1] = -w[-1]
    return w


def _plane(t: torch.Tensor, i: int) -> torch.Tensor:
    """Bit-plane i of t as a {0,1} tensor (arithmetic shift, so also right for two's complement)."""
    return (t >> i) & 1


# ---------------------------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class PreparedWeight:
    """A weight in one backend's own layout, reusable across calls; `shape` is the original weight's."""

    backend: str
    shape: tuple[int, ...]
    w_range: IntRange
    data: Any

    @property
    def cout(self) -> int:
        return self.shape[0]

    @property
    def cin(self) -> int:
        return self.shape[1]

    @property
    def kernel(self) -> tuple[int, int]:
        return tuple(self.shape[2:]) if len(self.shape) == 4 else (1, 1)

    @property
    def k(self) -> int:
        return self.cin * self.kernel[0] * self.kernel[1]


class Backend:
    """An exact integer GEMM/conv engine.

    The public methods check shapes and value ranges and pick the result dtype (or refuse, under "error");
    subclasses provide `_prepare` and `_gemm`, optionally `_split`, or override `_conv2d` wholesale.
    """

    name = "base"
    version = "1"
    description = ""
    exact = True

    def __init__(self, overflow: str = "split"):
        if overflow not in OVERFLOW_POLICIES:
            raise ConfigError(f"overflow policy must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
        self.overflow = overflow

    def with_overflow(self, policy: str) -> "Backend":
        """A fresh backend of the same kind with another overflow policy (its own stats, where kept)."""
        return type(self)(overflow=policy)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(overflow={self.overflow!r})"

    # -- public API

    def matmul(self, a: torch.Tensor, b: torch.Tensor, a_range: IntRange, b_range: IntRange) -> torch.Tensor:
        """Exact a @ b for a (M, K), b (K, N)."""
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"matmul needs (M, K) @ (K, N), got {tuple(a.shape)} @ {tuple(b.shape)}")
        return self.linear(a, self.prepare_weight(b.t(), b_range), a_range)

    def prepare_weight(self, w: torch.Tensor, w_range: IntRange) -> PreparedWeight:
        """w is (Cout, Cin, kh, kw) or (Cout, Cin); checked and converted once, reused across calls."""
        if w.dim() not in (2, 4):
            raise ValueError(f"weight must be (Cout, Cin) or (Cout, Cin, kh, kw), got {tuple(w.shape)}")
        _check_values(w, w_range, "weight")
        w4 = w if w.dim() == 4 else w[:, :, None, None]
        return PreparedWeight(self.name, tuple(w.shape), w_range, self._prepare(w4, w_range))

    def conv2d(self, x, pw: PreparedWeight, x_range: IntRange, stride=1, padding=0, dilation=1) -> torch.Tensor:
        """Exact conv of channels-last x (N, H, W, Cin) -> (N, Ho, Wo, Cout); zero padding, groups=1."""
        if pw.backend != self.name:
            raise ValueError(f"weight was prepared by backend {pw.backend!r}, not {self.name!r}")
        if x.dim() != 4 or x.shape[3] != pw.cin:
            raise ValueError(f"conv input must be (N, H, W, {pw.cin}) channels-last, got {tuple(x.shape)}")
        _check_values(x, x_range, "input")
        out_dtype = self._out_dtype(pw.k, x_range, pw.w_range)
        if pw.k == 0:  # an empty sum; _int_mm and the im2col reshapes reject K = 0
            ho, wo = _output_hw(x, pw.kernel, _pair(stride), _pair(padding), _pair(dilation))
            return torch.zeros(x.shape[0], ho, wo, pw.cout, dtype=out_dtype, device=x.device)
        return self._conv2d(x, pw, x_range, _pair(stride), _pair(padding), _pair(dilation), out_dtype)

    def linear(self, x: torch.Tensor, pw: PreparedWeight, x_range: IntRange) -> torch.Tensor:
        """Exact x @ w.T for x (M, Cin): a 1x1 conv over M pixels, which needs no im2col."""
        if x.dim() != 2 or pw.kernel != (1, 1):
            raise ValueError(f"linear needs x (M, Cin) and a (Cout, Cin) weight, got {tuple(x.shape)}, {pw.shape}")
        return self.conv2d(x.reshape(x.shape[0], 1, 1, x.shape[1]), pw, x_range).view(x.shape[0], pw.cout)

    # -- shared machinery

    def _out_dtype(self, k: int, a_range: IntRange, b_range: IntRange) -> torch.dtype:
        """int32 if the bound fits, else int64 under "split"; refuse rather than wrap."""
        bound = accumulator_bound(k, a_range, b_range)
        if bound <= INT32_MAX:
            return torch.int32
        if bound > INT64_MAX:
            raise AccumulatorOverflowError(
                f"accumulator bound {bound} (K={k}, ranges {_fmt(a_range)} x {_fmt(b_range)}) exceeds even int64"
            )
        if self.overflow == "error":
            raise AccumulatorOverflowError(
                f"accumulator bound K={k} x {a_range.max_abs} x {b_range.max_abs} = {bound} for ranges "
                f"{_fmt(a_range)} x {_fmt(b_range)} exceeds int32 max 2^31-1 = {INT32_MAX} (overflow policy 'error')"
            )
        return torch.int64

    def _conv2d(self, x, pw, x_range, stride, padding, dilation, out_dtype) -> torch.Tensor:
        """im2col of each part of x (`_split`) in lockstep blocks, each block one `_gemm` into its output rows."""
        ho, wo = _output_hw(x, pw.kernel, stride, padding, dilation)
        out = torch.empty(x.shape[0] * ho * wo, pw.cout, dtype=out_dtype, device=x.device)
        parts = self._split(x, x_range)
        max_rows = None  # GPUs want one big GEMM
        if x.device.type == "cpu":
            col_bytes = pw.k * sum(t.element_size() for t, _ in parts)
            max_rows = CPU_COLUMN_CHUNK_BYTES // (col_bytes + self._gemm_bytes_per_row(pw))
        streams = [column_chunks(t, pw.kernel, stride, padding, dilation, max_rows) for t, _ in parts]
        for blocks in zip(*streams):
            row, cols = blocks[0]
            a_parts = [(c, meta) for (_, c), (_, meta) in zip(blocks, parts)]
            self._gemm(a_parts, pw.data, out[row : row + cols.shape[0]])
        return out.view(x.shape[0], ho, wo, pw.cout)

    def _split(self, x: torch.Tensor, x_range: IntRange) -> list[tuple[torch.Tensor, Any]]:
        """The tensors whose im2col `_gemm` consumes, each with what `_gemm` needs to know about it."""
        return [(x.to(narrow_dtype(x_range)), x_range)]

    def _gemm_bytes_per_row(self, pw: PreparedWeight) -> int:
        """Bytes `_gemm` writes per output row: the int32 result row."""
        return 4 * pw.cout

    def _prepare(self, w4: torch.Tensor, w_range: IntRange) -> Any:
        raise NotImplementedError

    def _gemm(self, a_parts: list[tuple[torch.Tensor, Any]], w_data: Any, out: torch.Tensor) -> None:
        """Write the exact product of the column blocks a_parts (from `_split`) and W into out."""
        raise NotImplementedError


class ReferenceBackend(Backend):
    """The oracle: plain int64 F.conv2d on CPU, obviously exact, speed irrelevant."""

    name = "reference"
    description = "int64 oracle: F.conv2d on int64 CPU tensors (linear and matmul as 1x1 convs)"

    def _prepare(self, w4, w_range):
        return w4.cpu().long()

    def _conv2d(self, x, pw, x_range, stride, padding, dilation, out_dtype):
        x64 = x.cpu().long().permute(0, 3, 1, 2).contiguous()
        y = F.conv2d(x64, pw.data, stride=stride, padding=padding, dilation=dilation)
        return y.permute(0, 2, 3, 1).contiguous().to(out_dtype).to(x.device)


class Int8Backend(Backend):
    """im2col + torch._int_mm; operands wider than int8 (uint8 on the CPU's left side) split into 7/8-bit limbs."""

    name = "int8"
    description = "channels-last int8 im2col + torch._int_mm, wide operands split into int8 limbs"

    def _prepare(self, w4, w_range):
        return limbs(_weight_matrix(w4.to(narrow_dtype(w_range))), w_range, uint8_ok=False)

    def _split(self, x, x_range):
        """Limbs of the input itself, before the im2col multiplies its size by kh*kw."""
        return [(limb.t, limb) for limb in limbs(x.to(narrow_dtype(x_range)), x_range, x.device.type == "cpu")]

    def _gemm(self, a_parts, w_limbs, out):
        a_limbs = [Limb(cols, limb.r, limb.shift) for cols, limb in a_parts]
        if out.dtype == torch.int32 and len(a_limbs) == len(w_limbs) == 1:
            _mm8(a_limbs[0].t, w_limbs[0].t, out=out)
            return
        k = a_limbs[0].t.shape[1]
        pairs = [(p, q) for p in a_limbs for q in w_limbs]
        # partial sums of the limb products are bounded by the sum of their bounds, which can exceed the
        # operands' own bound (and the int32 `out`): accumulate those in int64, cast once at the end
        bound = sum(accumulator_bound(k, p.r, q.r) << (p.shift + q.shift) for p, q in pairs)
        acc = out if bound <= INT32_MAX or out.dtype == torch.int64 else torch.empty_like(out, dtype=torch.int64)
        for i, (p, q) in enumerate(pairs):
            part = _int_mm_exact(p.t, q.t, p.r.max_abs * q.r.max_abs)
            if i == 0:  # the two lowest limbs: shift 0
                acc.copy_(part)
            else:
                acc.add_(part, alpha=1 << (p.shift + q.shift))
        if acc is not out:
            out.copy_(acc)


class BitSerialBackend(Backend):
    """{0,1} bit-plane GEMMs (EBS/BSQ style): y = sum_ij s_i s_j 2^(i+j) A_i @ B_j, each plane GEMM on _int_mm.

    All weight planes sit side by side in one (K, b_bits*Cout) matrix, so each activation plane is one GEMM
    covering b_bits plane GEMMs. `stats` counts the logical plane GEMMs, MACs and BitOPs.
    """

    name = "bitserial"
    description = "bit-serial: {0,1} bit-plane GEMMs on torch._int_mm, combined with 2^(i+j) weights"

    def __init__(self, overflow: str = "split"):
        super().__init__(overflow)
        self.stats = {"plane_gemms": 0, "macs": 0, "bitops": 0}

    def bitops(self, macs: int, a_range: IntRange, b_range: IntRange) -> int:
        return int(macs) * a_range.bits * b_range.bits

    def reset_stats(self) -> None:
        self.stats = dict.fromkeys(self.stats, 0)

    def conv2d(self, x, pw, x_range, stride=1, padding=0, dilation=1):
        y = super().conv2d(x, pw, x_range, stride, padding, dilation)
        macs = y.numel() * pw.k
        self.stats["plane_gemms"] += x_range.bits * pw.w_range.bits
        self.stats["macs"] += macs
        self.stats["bitops"] += self.bitops(macs, x_range, pw.w_range)
        return y

    def _gemm_bytes_per_row(self, pw):
        """An int32 accumulator row per weight plane, which dwarfs the columns when K is small."""
        return 4 * pw.w_range.bits * pw.cout

    def _prepare(self, w4, w_range):
        wm = _weight_matrix(w4.to(narrow_dtype(w_range)))
        planes = torch.cat([_plane(wm, j) for j in range(w_range.bits)], dim=1).to(torch.int8)
        return planes, plane_weights(w_range)

    def _gemm(self, a_parts, w_data, out):
        ((a, a_range),) = a_parts
        planes, w_weights = w_data
        a_weights = plane_weights(a_range)
        n = out.shape[1]
        # sum of |plane weights| bounds every partial sum of the combination
        bound = a.shape[1] * sum(map(abs, a_weights)) * sum(map(abs, w_weights))
        acc_dtype = torch.int32 if bound <= INT32_MAX else torch.int64
        acc = None  # (M, w_bits * N): sum_i s_i 2^i A_i @ B_j for every weight plane j
        for i, wa in enumerate(a_weights):
            part = _int_mm_exact(_mm_lhs(_plane(a, i)), planes, 1)
            if acc is None:
                acc = part.to(acc_dtype) if wa == 1 else part.to(acc_dtype).mul_(wa)
            else:
                acc.add_(part, alpha=wa)
        res = out if out.dtype == acc_dtype else torch.empty_like(out, dtype=acc_dtype)
        torch.mul(acc[:, :n], w_weights[0], out=res)
        for j in range(1, len(w_weights)):
            res.add_(acc[:, j * n : (j + 1) * n], alpha=w_weights[j])
        if res is not out:
            out.copy_(res)


REFERENCE = ReferenceBackend()
INT8 = Int8Backend()
BITSERIAL = BitSerialBackend()
