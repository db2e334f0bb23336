"""ggml's CPU arithmetic, written down in numpy: the reference definitions the numerics profiles compute and
the native kernels (bitnet_ref.kernels) reproduce bit for bit.

- `_add_f32`, `_fma`: float32 sums and fused multiply-adds rounded once, as the hardware does;
- `ggml_expf`: ggml's vectorized expf;
- `tq_dot_q8_k_ggml` (with its integer lanes and float epilogue): TQ1_0/TQ2_0 x Q8_K;
- `i2s_dot_i8_s_ggml` (with `_i2s_raw_int16` and its epilogue): bitnet.cpp's I2_S x I8_S;
- `f16_gemm_ggml`, `vec_dot_f16_ggml`: the F16 products (tinyBLAS, ggml_vec_dot_f16);
- `_reduce16`, `_ggml_hsum8`: the horizontal sums those use.

Block sizes come from the formats (formats.activations.QK_K, formats.i2s.QK_I2_S). This module imports
neither the model nor the kernels: both import it.
"""

from __future__ import annotations

import numpy as np

from .formats.activations import QK_K
from .formats.i2s import QK_I2_S


def _add_f32(p, c) -> np.ndarray:
    """float32(p + c) rounded once (to nearest even), p and c float64 values (p exact, e.g. a product of
    float32 values; c a float32). The float64 sum s is made "round to odd" (where TwoSum's exact error e
    is not 0 and s's last bit is even, s moves one float64 ulp toward e), so the float32 rounding of s is
    the rounding of the exact sum: 53 >= 24 + 2 bits, so s never lands on a float32 tie it did not hold."""
    with np.errstate(invalid="ignore", over="ignore"):
        p, c = np.asarray(p, dtype=np.float64), np.asarray(c, dtype=np.float64)
        s = p + c
        pv = s - c  # TwoSum: s + e == p + c exactly (finite s)
        e = (p - pv) + (c - (s - pv))
        shape = np.shape(s)
        s, e = np.atleast_1d(s), np.atleast_1d(e)
        bits = s.view(np.int64)
        fix = (e != 0) & ((bits & 1) == 0) & np.isfinite(s)
        # toward e: one up in magnitude where e has s's sign (s != 0 where e != 0), else one down
        bits = bits + np.where((e > 0) == (s > 0), fix, -fix.astype(np.int64))
        return bits.view(np.float64).reshape(shape).astype(np.float32)


def _fma(a, b, c) -> np.ndarray:
    """float32 fma of float32 operands, as a hardware FMA (fmaf, vfmadd*ps): a*b is exact in float64, the
    sum with c rounded once to float32 (`_add_f32`)."""
    f64 = np.float64
    return _add_f32(np.asarray(a, dtype=f64) * np.asarray(b, dtype=f64), c)


# ggml's vectorized expf (x86 AVX-512 build): the argument is reduced with n = round(x*log2(e)) (the
# 1.5*2^23 shift trick) and b = x - n*ln2 (two-part ln2); exp(b) ~ a degree-5 polynomial evaluated with
# FMAs; the result is scaled by 2^n, and |n| > 192 gives 0 (n <= 0) or inf.
_EXPF_C = tuple(np.float32(float.fromhex(h)) for h in
                ("0x1.715476p+0", "0x1.62e4p-1", "0x1.7f7d1cp-20",
                 "0x1.0e4020p-7", "0x1.573e2ep-5", "0x1.555e66p-3", "0x1.fffdb6p-2", "0x1.ffffecp-1"))


def ggml_expf(x: np.ndarray) -> np.ndarray:
    """float32 exp as ggml's CPU vector code computes it (within one ulp of expf; differs from it often)."""
    log2e, ln2_hi, ln2_lo, c5, c4, c3, c2, c1 = _EXPF_C
    x = np.asarray(x, dtype=np.float32)
    shift = np.float32(1.5 * 2 ** 23)
    with np.errstate(invalid="ignore", over="ignore"):
        n = _fma(x, log2e, shift) - shift
        b = _fma(-n, ln2_lo, _fma(-n, ln2_hi, x))
        u = b * b
        j = _fma(_fma(_fma(c5, b, c4), u, _fma(c3, b, c2)), u, _fma(c1, b, np.float32(1)))
        big = ~(np.abs(n) <= 192)  # NaN (from -inf inputs) counts as big, as the ordered compare does
        res = np.ldexp(j, np.where(big, 0, n).astype(np.int32)).astype(np.float32)
    return np.where(big, np.where(n <= 0, np.float32(0), np.float32(np.inf)), res).astype(np.float32)


def _reduce16(s: np.ndarray) -> np.ndarray:
    """_mm512_reduce_add_ps over the last axis (16 lanes), float32: halves added, then quarters, then pairs."""
    a = s[..., 8:] + s[..., :8]
    b = a[..., 4:] + a[..., :4]
    return (b[..., 0] + b[..., 2]) + (b[..., 1] + b[..., 3])


def _ggml_hsum8(s: np.ndarray) -> np.ndarray:
    """ggml's x86 hsum_float_8 over the last axis (8 lanes): (s0+s4)+(s2+s6) + ((s1+s5)+(s3+s7)), float32."""
    r = s[..., 4:] + s[..., :4]
    return (r[..., 0] + r[..., 2]) + (r[..., 1] + r[..., 3])


def tq_dot_q8_k_ggml(q: np.ndarray, dy: np.ndarray, values: np.ndarray, dw: np.ndarray) -> np.ndarray:
    """ggml's x86 AVX2 `ggml_vec_dot_tq{1,2}_0_q8_K` for every (token, row): float32 (T, R).

    q int8 (T, K) and dy float32 (T, K/256): the Q8_K activations; values int8 (R, K) in {-1,0,1} and
    dw float32 (R, K/256): the TQ weights. Both kernels keep 8 int32 lanes per block: lane l holds
    sum((w+1)*q) over the values v with v % 32 in [4l, 4l+4), minus the block sums of q over
    [32l, 32l+32) (bsums subtracted lane-wise); each lane is converted to float and accumulated over the
    blocks with an FMA by d = y.d * x.d (float32); the 8 lanes are reduced by hsum_float_8.
    """
    return _tq_epilogue(_tq_lanes_numpy(q, values), dy, dw)


def _tq_lanes_numpy(q: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The integer lanes of `tq_dot_q8_k_ggml`: (T, R, K/256, 8), float32 holding exact integers."""
    t, k = q.shape
    r = values.shape[0]
    nb = k // QK_K
    # (nb, lane, T, 32): value v = 256b + 32c + 4l + e
    qb = q.reshape(t, nb, 8, 8, 4).astype(np.float32)
    wb = values.reshape(r, nb, 8, 8, 4).astype(np.float32)
    qs = qb.transpose(1, 3, 0, 2, 4).reshape(nb, 8, t, 32)
    ws = wb.transpose(1, 3, 0, 2, 4).reshape(nb, 8, r, 32)
    dots = np.matmul(qs, ws.transpose(0, 1, 3, 2))  # (nb, 8, T, R): exact integers (|.| < 2^13)
    inter = qs.sum(axis=-1)  # (nb, 8, T): q over this lane's interleaved positions
    contig = q.reshape(t, nb, 8, 32).astype(np.float32).sum(axis=-1).transpose(1, 2, 0)  # (nb, 8, T)
    lanes = dots + (inter - contig)[..., None]  # (w+1)*q summed, minus bsums
    return lanes.transpose(2, 3, 0, 1)


def _tq_epilogue(lanes: np.ndarray, dy: np.ndarray, dw: np.ndarray) -> np.ndarray:
    """ggml's float32 epilogue over integer lanes (T, R, nb, 8): FMA by d = y.d * x.d per block, hsum_float_8."""
    t, r, nb, _ = lanes.shape
    acc = np.zeros((t, r, 8), dtype=np.float32)
    for b in range(nb):
        d = (dy[:, b][:, None] * dw[:, b][None, :]).astype(np.float32)  # (T, R)
        acc = _fma(lanes[:, :, b, :], d[:, :, None], acc)
    return _ggml_hsum8(acc)


def _i2s_raw_int16(q: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The I2_S kernel's raw sum with its int16 lanes wrapping: (T, R) int64.

    `maddubs` products of codes (w+1, 0..2) and q are added pairwise into 16 int16 lanes (lane l: bytes
    2l, 2l+1 of each 32-value group of a 128-value block) over up to 32 blocks (4096 values), wrapping
    modulo 2^16, then widened to int32 (exact from there). q (T, K') and codes (R, K'), K' = whole blocks.
    """
    t, k = q.shape
    nb = k // QK_I2_S
    raw = np.zeros((t, codes.shape[0]), np.int64)
    for b0 in range(0, nb, 32):
        b1 = min(b0 + 32, nb)
        n = b1 - b0
        # value index 128*blk + 32*g + 2*l + e  ->  (lane, rows, blk*g*e)
        qs = q[:, b0 * 128:b1 * 128].reshape(t, n, 4, 16, 2).transpose(3, 0, 1, 2, 4).reshape(16, t, -1)
        cs = codes[:, b0 * 128:b1 * 128].reshape(-1, n, 4, 16, 2).transpose(3, 0, 1, 2, 4).reshape(16, -1, n * 8)
        lanes = np.matmul(qs.astype(np.float64), cs.transpose(0, 2, 1).astype(np.float64)).astype(np.int64)
        raw += ((lanes + 32768) % 65536 - 32768).sum(axis=0)
    return raw


def i2s_dot_i8_s_ggml(q: np.ndarray, s: np.ndarray, values: np.ndarray, w_scale, int16_wrap: bool = False):
    """bitnet.cpp's x86 I2_S x I8_S mul_mat (ACT_PARALLEL build) for every (token, row): float32 (T, R).

    q int8 (T, K) and s float32 (T,): `quantize_row_i8_s` activations; values int8 (R, K) in {-1,0,1};
    w_scale: the float32 scale stored after the I2_S codes (per tensor; a per-row array broadcasts).
    The kernels (gemm for the first T - T%4 tokens, gemv for the rest: the same sum) return the raw integer
    Σ code·q (code = w+1) over whole 128-value blocks as float; ggml.c then computes
    ((float)raw - (float)act_sum) / act_scale * w_scale in float32, in that order, where act_sum is the sum
    of the whole row's q. Both integers are exact in float32 (|.| < 2^24). `int16_wrap` models the
    kernel's int16 lane accumulation (see `_i2s_raw_int16`); without it the lanes are taken as exact.
    """
    kk = q.shape[1] // QK_I2_S * QK_I2_S  # the kernel drops a partial block
    codes = values[:, :kk].astype(np.int16) + 1
    if int16_wrap:
        raw = _i2s_raw_int16(q[:, :kk], codes)
    else:
        raw = (q[:, :kk].astype(np.float64) @ codes.T.astype(np.float64)).astype(np.int64)  # exact integers
    return _i2s_epilogue(raw, q.astype(np.int64).sum(axis=1), s, w_scale)


def _i2s_epilogue(raw: np.ndarray, act_sum: np.ndarray, s: np.ndarray, w_scale) -> np.ndarray:
    """ggml.c's float32 epilogue of the I2_S product: ((float)raw - (float)act_sum) / act_scale * w_scale."""
    f32 = np.float32
    diff = raw.astype(f32) - np.asarray(act_sum).astype(f32)[:, None]
    return (diff / s.astype(f32)[:, None]) * np.asarray(w_scale, dtype=f32).reshape(1, -1)


def f16_gemm_ggml(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """llamafile's tinyBLAS on AVX-512 for F16 weights x F32 activations (the 2024 `llamafile_sgemm`,
    which takes an F32 B for an F16 A, so the activations are not rounded to f16): float32 (T, R).

    Each output keeps one 16-lane float32 accumulator, a float32 FMA per 16 values of K (f16 widened to
    f32; one rounding: `_add_f32` of the product, exact in float64), then `_mm512_reduce_add_ps`.
    a (T, K) float32; w (R, K) holding f16 values; K % 16 == 0.
    """
    f32, f64 = np.float32, np.float64
    t, k = a.shape
    a64 = a.astype(f64).reshape(t, 1, k // 16, 16)
    w64 = w.astype(f64).reshape(1, w.shape[0], k // 16, 16)
    acc = np.zeros((t, w.shape[0], 16), f32)
    for c in range(k // 16):
        acc = _add_f32(a64[:, :, c, :] * w64[:, :, c, :], acc)
    return _reduce16(acc)


def vec_dot_f16_ggml(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_f16 on AVX-512 (F32Cx16, GGML_F16_STEP 64) over the last axis of f16-valued x and y
    (broadcast against each other): float32. Four 16-lane float32 accumulators take FMAs of the first
    n & ~63 products (exact in float32), are combined (a0+a2)+(a1+a3) and reduced by _mm512_reduce_add_ps
    into a double, which adds the remaining products one at a time; the result is rounded to float."""
    f32, f64 = np.float32, np.float64
    n = x.shape[-1]
    body = n & ~63
    prod = x.astype(f64) * y.astype(f64)
    lead = prod.shape[:-1]
    acc = np.zeros(lead + (4, 16), f32)
    chunks = prod[..., :body].reshape(lead + (body // 64, 4, 16))
    for c in range(body // 64):
        acc = (chunks[..., c, :, :] + acc).astype(f32)
    s = _reduce16((acc[..., 0, :] + acc[..., 2, :]) + (acc[..., 1, :] + acc[..., 3, :])).astype(f64)
    for i in range(body, n):
        s = s + prod[..., i]
    return s.astype(f32)
