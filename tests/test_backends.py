"""Exactness of the integer backends: `int8` and `bitserial` must equal the int64 `reference` bit for bit."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fqtbench.engine.backends as B
from fqtbench.engine.backends import BITSERIAL, INT8, REFERENCE
from fqtbench.engine.intrange import INT32_MAX, IntRange, accumulator_bound
from fqtbench.errors import AccumulatorOverflowError, ConfigError

FAST = (INT8, BITSERIAL)
ALL = (REFERENCE, INT8, BITSERIAL)
DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)

ranges = st.one_of(
    st.integers(1, 8).map(IntRange.signed),
    st.integers(1, 8).map(IntRange.unsigned),
    st.sampled_from(
        [
            IntRange.symmetric(255),
            IntRange.symmetric(127),
            IntRange(-128, 127),
            IntRange(0, 1),
            IntRange(-3, 100),
            IntRange.signed(12),
            IntRange.unsigned(16),
            IntRange.signed(16),
        ]
    ),
)


@st.composite
def int_tensors(draw, shape, r: IntRange):
    """Values in r, sometimes all at one end of it or only at its ends, in any dtype that holds r."""
    dtype = draw(st.sampled_from([d for d in DTYPES if torch.iinfo(d).min <= r.lo and r.hi <= torch.iinfo(d).max]))
    fill = draw(st.sampled_from(["random", "lo", "hi", "ends"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if fill == "lo":
        t = torch.full(shape, r.lo, dtype=torch.int64)
    elif fill == "hi":
        t = torch.full(shape, r.hi, dtype=torch.int64)
    elif fill == "ends":
        t = torch.where(torch.rand(shape, generator=gen) < 0.5, r.lo, r.hi)
    else:
        t = torch.randint(r.lo, r.hi + 1, shape, generator=gen)
    return t.to(dtype)


@contextmanager
def column_chunk_bytes(n: int):
    """Small blocks make tiny test convs go through the multi-block im2col path too."""
    old = B.CPU_COLUMN_CHUNK_BYTES
    B.CPU_COLUMN_CHUNK_BYTES = n
    try:
        yield
    finally:
        B.CPU_COLUMN_CHUNK_BYTES = old


def expected_dtype(k, a_range, b_range):
    return torch.int32 if accumulator_bound(k, a_range, b_range) <= INT32_MAX else torch.int64


@st.composite
def conv_cases(draw):
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    cin, cout = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    assume(h + 2 * padding[0] >= dilation[0] * (kh - 1) + 1 and w + 2 * padding[1] >= dilation[1] * (kw - 1) + 1)
    x_range, w_range = draw(ranges), draw(ranges)
    x = draw(int_tensors((n, h, w, cin), x_range))
    wt = draw(int_tensors((cout, cin, kh, kw), w_range))
    return x, wt, x_range, w_range, dict(stride=stride, padding=padding, dilation=dilation)


@pytest.mark.parametrize("backend", FAST, ids=lambda b: b.name)
@settings(max_examples=400, deadline=None)
@given(case=conv_cases(), chunk=st.sampled_from([1, 600, 5000, 2 << 20]))
def test_conv2d_equals_reference(backend, case, chunk):
    x, w, x_range, w_range, geom = case
    want = REFERENCE.conv2d(x, REFERENCE.prepare_weight(w, w_range), x_range, **geom)
    with column_chunk_bytes(chunk):
        got = backend.conv2d(x, backend.prepare_weight(w, w_range), x_range, **geom)
    assert got.dtype == want.dtype == expected_dtype(w[0].numel(), x_range, w_range)
    assert torch.equal(got, want)


@settings(max_examples=150, deadline=None)
@given(case=conv_cases())
def test_reference_conv2d_equals_float64_conv(case):
    """An oracle independent of the backends' im2col: float64 NCHW conv is exact at these magnitudes."""
    x, w, x_range, w_range, geom = case
    got = REFERENCE.conv2d(x, REFERENCE.prepare_weight(w, w_range), x_range, **geom)
    want = F.conv2d(x.permute(0, 3, 1, 2).double(), w.double(), **geom).permute(0, 2, 3, 1)
    assert torch.equal(got.double(), want)


@st.composite
def gemm_cases(draw):
    m, k, n = draw(st.integers(1, 12)), draw(st.integers(1, 40)), draw(st.integers(1, 12))
    a_range, b_range = draw(ranges), draw(ranges)
    return draw(int_tensors((m, k), a_range)), draw(int_tensors((k, n), b_range)), a_range, b_range


@pytest.mark.parametrize("backend", FAST, ids=lambda b: b.name)
@settings(max_examples=250, deadline=None)
@given(case=gemm_cases())
def test_matmul_equals_reference(backend, case):
    a, b, a_range, b_range = case
    want = REFERENCE.matmul(a, b, a_range, b_range)
    got = backend.matmul(a, b, a_range, b_range)
    assert got.dtype == want.dtype == expected_dtype(a.shape[1], a_range, b_range)
    assert torch.equal(got, want)
    assert torch.equal(want, a.long() @ b.long())


@pytest.mark.parametrize("backend", FAST, ids=lambda b: b.name)
@settings(max_examples=150, deadline=None)
@given(case=gemm_cases())
def test_linear_equals_reference(backend, case):
    x, w_t, x_range, w_range = case
    w = w_t.t().contiguous()  # (Cout, Cin)
    want = REFERENCE.linear(x, REFERENCE.prepare_weight(w, w_range), x_range)
    got = backend.linear(x, backend.prepare_weight(w, w_range), x_range)
    assert got.shape == (x.shape[0], w.shape[0])
    assert got.dtype == want.dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ALL, ids=lambda b: b.name)
@pytest.mark.parametrize(
    "r", [IntRange.signed(8), IntRange.unsigned(8), IntRange.symmetric(255), IntRange.signed(1), IntRange(0, 1)]
)
def test_extreme_values(backend, r):
    """All-min and all-max operands: the worst cases for sign handling, limbs and the top bit-plane."""
    for xv in (r.lo, r.hi):
        for wv in (r.lo, r.hi):
            x = torch.full((2, 5, 5, 3), xv, dtype=torch.int64)
            w = torch.full((4, 3, 3, 3), wv, dtype=torch.int64)
            got = backend.conv2d(x, backend.prepare_weight(w, r), r, padding=1)
            want = F.conv2d(x.permute(0, 3, 1, 2).double(), w.double(), padding=1).permute(0, 2, 3, 1)
            assert torch.equal(got.double(), want)


@pytest.mark.parametrize("backend", ALL, ids=lambda b: b.name)
def test_int32_boundary_sets_result_dtype(backend):
    """K * 128 * 128 is 2^31 - 16384 at K = 131071 (int32) and exactly 2^31 at K = 131072 (int64)."""
    r = IntRange.signed(8)
    for k, dtype in ((131071, torch.int32), (131072, torch.int64)):
        a = torch.full((1, k), -128, dtype=torch.int8)
        b = torch.full((k, 1), -128, dtype=torch.int8)
        got = backend.matmul(a, b, r, r)
        assert got.dtype == dtype
        assert got.item() == k * 128 * 128


@pytest.mark.parametrize("backend", ALL, ids=lambda b: b.name)
def test_overflow_policy(backend):
    """K = 140000 of (-128)(-128) wraps in a plain _int_mm; "split" is exact in int64, "error" refuses."""
    r = IntRange.signed(8)
    k = 140000
    a = torch.full((2, k), -128, dtype=torch.int8)
    b = torch.full((k, 3), -128, dtype=torch.int8)
    assert torch._int_mm(a, b)[0, 0].item() != k * 128 * 128  # the hazard this guards against

    got = backend.matmul(a, b, r, r)
    assert got.dtype == torch.int64
    assert torch.equal(got, torch.full((2, 3), k * 128 * 128, dtype=torch.int64))

    strict = backend.with_overflow("error")
    with pytest.raises(AccumulatorOverflowError) as e:
        strict.matmul(a, b, r, r)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("K=140000", "[-128, 127]", str(k * 128 * 128), "2^31-1", str(INT32_MAX)):
        assert part in msg

    x = torch.zeros(1, 3, 3, 16384, dtype=torch.int8)  # conv K = 16384*9 exceeds the int32 bound too
    w = torch.zeros(1, 16384, 3, 3, dtype=torch.int8)
    with pytest.raises(AccumulatorOverflowError):
        strict.conv2d(x, strict.prepare_weight(w, r), r)


def test_bitserial_stats_and_bitops():
    bs = BITSERIAL.with_overflow("split")
    a_range, w_range = IntRange.signed(4), IntRange.unsigned(3)
    x = torch.randint(-8, 8, (2, 6, 6, 5))
    w = torch.randint(0, 8, (7, 5, 3, 3))
    y = bs.conv2d(x, bs.prepare_weight(w, w_range), a_range, stride=1, padding=1)
    macs = 2 * 6 * 6 * (5 * 3 * 3) * 7
    assert y.shape == (2, 6, 6, 7)
    assert bs.stats == {"plane_gemms": 4 * 3, "macs": macs, "bitops": 4 * 3 * macs}
    assert bs.bitops(macs, a_range, w_range) == 4 * 3 * macs

    bs.matmul(torch.ones(3, 10, dtype=torch.int8), torch.ones(10, 2, dtype=torch.int8), IntRange(0, 1), w_range)
    assert bs.stats["macs"] == macs + 60
    assert bs.stats["bitops"] == 12 * macs + 1 * 3 * 60
    bs.reset_stats()
    assert bs.stats == {"plane_gemms": 0, "macs": 0, "bitops": 0}


def test_backend_attributes_and_policy():
    assert [b.name for b in ALL] == ["reference", "int8", "bitserial"]
    for b in ALL:
        assert b.version == "1" and b.exact is True and b.overflow == "split"
        assert b.description and "\n" not in b.description
        strict = b.with_overflow("error")
        assert type(strict) is type(b) and strict.overflow == "error" and b.overflow == "split"
    with pytest.raises(ConfigError):
        INT8.with_overflow("wrap")
    with pytest.raises(ConfigError):
        B.Int8Backend(overflow="saturate")


def test_bad_inputs_are_refused():
    r = IntRange.signed(4)
    w = torch.zeros(2, 3, 1, 1, dtype=torch.int8)
    with pytest.raises(ValueError, match="outside its declared range"):
        INT8.prepare_weight(w + 8, r)
    pw = INT8.prepare_weight(w, r)
    with pytest.raises(ValueError, match="outside its declared range"):
        INT8.conv2d(torch.full((1, 2, 2, 3), -9), pw, r)
    with pytest.raises(ValueError, match="prepared by backend"):
        BITSERIAL.conv2d(torch.zeros(1, 2, 2, 3, dtype=torch.int8), pw, r)
    with pytest.raises(ValueError, match="channels-last"):
        INT8.conv2d(torch.zeros(1, 3, 2, 2, dtype=torch.int8), pw, r)
    with pytest.raises(TypeError):
        INT8.matmul(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int8), r, r)
    pw3 = INT8.prepare_weight(torch.zeros(2, 3, 3, 3, dtype=torch.int8), r)
    with pytest.raises(ValueError, match="empty"):
        INT8.conv2d(torch.zeros(1, 1, 1, 3, dtype=torch.int8), pw3, r)


@pytest.mark.parametrize("backend", ALL, ids=lambda b: b.name)
def test_empty_reduction_is_zero(backend):
    r = IntRange.signed(8)
    got = backend.matmul(torch.zeros(3, 0, dtype=torch.int8), torch.zeros(0, 4, dtype=torch.int8), r, r)
    assert got.dtype == torch.int32 and torch.equal(got, torch.zeros(3, 4, dtype=torch.int32))


@settings(max_examples=200, deadline=None)
@given(r=ranges, uint8_ok=st.booleans(), data=st.data())
def test_limbs_reassemble_exactly(r, uint8_ok, data):
    v = data.draw(int_tensors((50,), r))
    total = torch.zeros(50, dtype=torch.int64)
    for limb in B.limbs(v, r, uint8_ok):
        assert limb.t.dtype in ((torch.int8, torch.uint8) if uint8_ok else (torch.int8,))
        assert limb.r.lo <= int(limb.t.min()) and int(limb.t.max()) <= limb.r.hi
        total += limb.t.long() << limb.shift
    assert torch.equal(total, v.long())


def test_im2col_matches_unfold():
    x = torch.randint(-128, 128, (2, 7, 6, 3), dtype=torch.int8)
    cols = B.im2col(x, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    ref = F.unfold(x.permute(0, 3, 1, 2).double(), (3, 2), dilation=(1, 2), padding=(1, 2), stride=(2, 1))
    # unfold orders K as (C, kh, kw) and puts positions last; ours is (positions, kh, kw, C)
    ref = ref.view(2, 3, 3, 2, -1).permute(0, 4, 2, 3, 1).reshape(cols.shape)
    assert cols.dtype == torch.int8 and torch.equal(cols.double(), ref)


def test_padded_int_mm_and_self_test(monkeypatch):
    """The CUDA shape padding and the self-test run on CPU too; a wrong kernel is caught and warned about."""
    for m, k, n in ((1, 1, 1), (5, 3, 7), (20, 9, 10)):
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-128, 128, (k, n), dtype=torch.int8)
        assert torch.equal(B._padded_int_mm(a, b).long(), a.long() @ b.long())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert B.int_mm_self_test(torch.device("cpu"))

    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: real(a, b).clamp(-(2**15), 2**15))
    with pytest.warns(RuntimeWarning, match="self-test"):
        assert not B.int_mm_self_test(torch.device("cpu"))


def test_entry_points_name_the_instances():
    from importlib.metadata import entry_points

    eps = {e.name: e for e in entry_points(group="fqtbench.backends")}
    for b in ALL:
        assert eps[b.name].load() is b
