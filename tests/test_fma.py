"""ggml_ref._fma (and _add_f32, which it and the float32 FMA accumulators use) against an exact reference: a float32
fused multiply-add rounded once, as ggml's FMAs (fmaf, vfmadd*ps) compute it.

The reference is `fractions.Fraction` arithmetic rounded to float32 by hand (nearest, ties to even, subnormals,
overflow to inf); specials (inf, NaN) are compared with the C library's fmaf (correctly rounded in glibc). The
double-rounding cases are built so that rounding the exact sum to float64 first lands on a float32 tie that the
exact sum is not on: where the old definition, float32(float64(a*b) + c), was wrong.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from fractions import Fraction

import numpy as np
import pytest

from bitnet_ref.ggml_ref import _add_f32, _fma

pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

F32_MAX_EXP = 128  # values >= 2^128 after rounding are inf


def _libm_fmaf():
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6").fmaf
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float] * 3
    return fn


LIBM_FMAF = _libm_fmaf()


def round_f32(q: Fraction) -> float:
    """q rounded to the nearest float32 (ties to even), as a Python float; +-inf past the largest float32."""
    if q == 0:
        return 0.0
    sign, q = (-1.0 if q < 0 else 1.0), abs(q)
    e = q.numerator.bit_length() - q.denominator.bit_length()  # 2^e <= q < 2^(e+2)
    if q >= Fraction(2) ** (e + 1):
        e += 1
    quantum = Fraction(2) ** (max(e, -126) - 23)  # 24 significant bits; subnormals share 2^-149
    v = round(q / quantum) * quantum  # Fraction.__round__: half to even
    return sign * (math.inf if v >= Fraction(2) ** F32_MAX_EXP else float(v))


def fma_exact(a, b, c) -> np.float32:
    """float32 fma of finite float32 a, b, c, from exact rational arithmetic; the sign of a zero as IEEE 754."""
    a, b, c = float(a), float(b), float(c)
    s = Fraction(a) * Fraction(b) + Fraction(c)
    if s == 0:  # -0 only when the (zero) product and c are both -0
        neg = (math.copysign(1, a) * math.copysign(1, b) < 0) and a * b == 0 and math.copysign(1, c) < 0
        return np.float32(-0.0 if neg else 0.0)
    return np.float32(round_f32(s))


def f32_bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def old_double_rounding(a, b, c) -> np.ndarray:
    """The former definition: the exact product plus c rounded to float64, then to float32."""
    f64 = np.float64
    return (np.asarray(a, f64) * np.asarray(b, f64) + np.asarray(c, f64)).astype(np.float32)


def double_rounding_cases(rng, b_bits: int, count: int, f16_b: bool = False) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
    """float32 triples whose exact a*b + c is a float32 midpoint M plus or minus 2^-53 relative (the product's
    last bit, 29 bits below M's): the float64 sum is a tie that rounds to M, the float32 rounding of M then goes
    to the even neighbour, which is the wrong one half of the time. b has b_bits significant bits; f16_b: b is
    an f16 value in [1, 2) (b_bits <= 11)."""
    out = []
    while len(out) < count:
        mb = int(rng.integers(1, 2 ** b_bits)) | 1
        tail = int(rng.choice([-1, 1]))
        ma = tail * pow(mb, -1, 2 ** 29) % 2 ** 29  # ma * mb == tail (mod 2^29)
        if not 0 < ma < 2 ** 24:
            continue
        h = (ma * mb - tail) >> 29  # the product's bits above its 29 low ones
        if h % 2 == 0:  # then M - product is no float32 in M's binade
            continue
        e = int(rng.integers(-60, 60))  # M in [2^e, 2^(e+1)); the product's last bit is 2^(e-53)
        odd = int(rng.integers(2 ** 23, 2 ** 24)) * 2 + 1
        if odd - h < 2 ** 24:
            continue
        ea = int(rng.integers(-20, 20)) - ma.bit_length()
        a = math.ldexp(ma, ea)
        b = math.ldexp(mb, e - 53 - ea)
        c = math.ldexp(odd - h, e - 24)  # c + a*b = odd * 2^(e-24) + tail * 2^(e-53)
        if rng.random() < 0.5:
            a, c = -a, -c
        if f16_b:  # scale b into [1, 2), a the other way
            sh = math.frexp(b)[1] - 1
            a, b = math.ldexp(a, sh), math.ldexp(b, -sh)
            if not 2.0 ** -126 <= abs(a) < 2.0 ** 127:
                continue
        elif rng.random() < 0.5:
            a, b = b, a
        if all(np.float32(v) == v for v in (a, b, c)):
            out.append((a, b, c))
    a, b, c = (np.array(v, np.float32) for v in zip(*out))
    return a, b, c


def random_triples(rng, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Finite float32 triples over every exponent, subnormals and zeros included, half of them with c near
    -a*b (cancellation) or a*b far below c (the sticky bits)."""
    def bits(k):
        x = rng.integers(0, 2 ** 32, k, dtype=np.uint64).astype(np.uint32).view(np.float32)
        return np.where(np.isfinite(x), x, np.float32(1.5))
    a, b, c = bits(n), bits(n), bits(n)
    a[: n // 8] = np.float32(0) * np.sign(a[: n // 8])  # signed zeros
    c[n // 8: n // 4] = (bits(n // 8).view(np.uint32) & np.uint32(0x807FFFFF)).view(np.float32)  # subnormal c
    with np.errstate(over="ignore", invalid="ignore"):
        p = a.astype(np.float64) * b.astype(np.float64)
        near = (-p * (1 + rng.uniform(-2 ** -20, 2 ** -20, n))).astype(np.float32)
        far = (p * 2.0 ** rng.integers(10, 40, n)).astype(np.float32)
    pick = rng.random(n)
    c = np.where(pick < 0.25, near, np.where(pick < 0.5, far, c))
    c = np.where(np.isfinite(c), c, np.float32(-3.0))
    return a, b, c


def assert_exact(a, b, c, got) -> None:
    want = np.array([fma_exact(x, y, z) for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())], np.float32)
    bad = np.flatnonzero(f32_bits(got) != f32_bits(want))
    assert bad.size == 0, [(float(a[i]).hex(), float(b[i]).hex(), float(c[i]).hex(), float(got[i]).hex(),
                            float(want[i]).hex()) for i in bad[:5]]


def test_round_f32_reference():
    """The reference rounding itself: ties to even, the subnormal quantum, overflow, against numpy's float64
    to float32 cast where a float64 holds the value exactly."""
    cases = [1 + 2.0 ** -24, 1 + 3 * 2.0 ** -24, 2.0 ** -149 * 1.5, 2.0 ** -149 * 0.5, 2.0 ** -150 * 1.0000001,
             3.4028235677973366e38, 3.4028235677973366e38 * (1 + 2.0 ** -25), -1e-45, 2.0 ** -127 * 1.25]
    for v in cases:
        assert f32_bits(round_f32(Fraction(v))) == f32_bits(np.float32(v)), v


def test_fma_double_rounding_cases():
    """Where float64-then-float32 rounding was wrong (float32 x float32 and float32 x f16 products) _fma
    rounds once."""
    rng = np.random.default_rng(20)
    for b_bits in (24, 11):
        a, b, c = double_rounding_cases(rng, b_bits, 300)
        got = _fma(a, b, c)
        assert got.dtype == np.float32 and got.shape == a.shape
        assert_exact(a, b, c, got)
        wrong = f32_bits(old_double_rounding(a, b, c)) != f32_bits(got)
        assert wrong.sum() > 60  # the cases do hit the old rounding's corner (about half of them)
        # the same sum from a precomputed exact product, as f16_gemm_ggml and the KQ accumulators pass it
        assert (f32_bits(_add_f32(a.astype(np.float64) * b.astype(np.float64), c)) == f32_bits(got)).all()


def test_fma_random_exact():
    rng = np.random.default_rng(21)
    a, b, c = random_triples(rng, 6000)
    assert_exact(a, b, c, _fma(a, b, c))


def test_fma_ties_subnormals_overflow():
    """Exact float32 ties (to even either way), results in the subnormal range (products of tiny numbers, and
    sums rounding to 2^-149 steps), and sums at the overflow threshold."""
    f = np.float32
    a = np.array([2 ** -12, 2 ** -12, 2 ** -12, -2 ** -12, 2 ** -75, 3 * 2 ** -80, 2 ** -75, 2 ** 64, 2 ** 64,
                  2 ** 64, 1.5, 2 ** -100, -1.0], f)
    b = np.array([2 ** -12, 2 ** -12, -2 ** -12, 2 ** -12, 2 ** -75, 2 ** -70, -2 ** -75, 2 ** 64 - 2 ** 40,
                  2 ** 64, -(2 ** 64), 0.0, 2 ** -100, 2 ** -149], f)
    c = np.array([1.0, 1 + 2 ** -23, 1.0, -(1 + 2 ** -23), 2 ** -149, -(2 ** -148), 2 ** -149, 2 ** 127,
                  -(2 ** 127), -(2 ** 127), -0.0, -0.0, 0.0], f)
    got = _fma(a, b, c)
    assert_exact(a, b, c, got)
    rng = np.random.default_rng(22)
    n = 3000
    a = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(-90, -60, n)).astype(f)
    b = (rng.uniform(-2, 2, n) * 2.0 ** rng.integers(-90, -60, n)).astype(f)
    c = (rng.integers(-2 ** 23, 2 ** 23, n) * 2.0 ** -149).astype(f)  # subnormal (or tiny normal) c
    assert_exact(a, b, c, _fma(a, b, c))


def test_fma_scalars_and_broadcasting():
    assert _fma(np.float32(1.5), np.float32(2), np.float32(0.25)).dtype == np.float32
    assert float(_fma(np.float32(1.5), np.float32(2), np.float32(0.25))) == 3.25
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = _fma(a, np.float32(1 / 3), np.zeros((2, 1), np.float32))
    assert got.shape == (2, 3) and (got == (a.astype(np.float64) * np.float32(1 / 3)).astype(np.float32)).all()


@pytest.mark.skipif(LIBM_FMAF is None, reason="no fmaf in the C library")
def test_fma_matches_libm_fmaf_with_specials():
    """inf, NaN, signed zeros and the random triples against the C library's fmaf (math.fma, Python 3.13+, is
    a float64 fma: float32 of its result rounds twice, so it is no reference for one float32 rounding)."""
    rng = np.random.default_rng(23)
    a, b, c = random_triples(rng, 3000)
    sp = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1.0, -1.0, 3e38, 1e-45], np.float32)
    grid = np.array(np.meshgrid(sp, sp, sp)).reshape(3, -1)
    a, b, c = np.concatenate([a, grid[0]]), np.concatenate([b, grid[1]]), np.concatenate([c, grid[2]])
    da, db, dc = double_rounding_cases(rng, 11, 100)
    a, b, c = np.concatenate([a, da]), np.concatenate([b, db]), np.concatenate([c, dc])
    got = _fma(a, b, c)
    want = np.array([LIBM_FMAF(x, y, z) for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())], np.float32)
    nan = np.isnan(want)
    assert (np.isnan(got) == nan).all()
    assert (f32_bits(got[~nan]) == f32_bits(want[~nan])).all()
