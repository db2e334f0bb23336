"""Activation quantizers of the references, as pure numpy functions.

`quantize_i8_s` is bitnet.cpp's per-token quantizer (used with its I2_S/TL kernels);
`quantize_q8_k` is mainline ggml's Q8_K block quantizer (used for the TQ1_0/TQ2_0 dot products).
Both take a 2-D (tokens, K) array (a 1-D row is treated as one token).
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _rows(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    return a.reshape(1, -1) if a.ndim == 1 else a


def quantize_i8_s(x) -> tuple[np.ndarray, np.ndarray]:
    """bitnet.cpp's `quantize_row_i8_s`, one token row at a time.

    The row maximum starts at 1e-5 and takes max|x| in double precision; the scale is
    s = float32(127 / max); q = nearest_int(x * s) with the product in float32 and ties to even,
    clamped to [-128, 127]. Returns (q int8 of x's shape (tokens, K), s float32 of shape (tokens,)).
    Dequantized activations are q / s.
    """
    a = _rows(x)
    amax = np.maximum(np.abs(a).max(axis=1).astype(np.float64), 1e-5)
    s = (127.0 / amax).astype(np.float32)
    q = np.clip(np.rint(a * s[:, None]), -128, 127).astype(np.int8)
    return q, s


def quantize_q8_k_blocks(x) -> tuple[np.ndarray, np.ndarray]:
    """ggml's Q8_K quantizer (`quantize_row_q8_K_ref`; the x86 CPU backend calls the same reference code).

    For every 256-value block: find the value of largest magnitude (the first one on ties) and keep its
    sign, `max`; a block of zeros gets d = 0 and q = 0. Otherwise iscale = float32(-127 / max) (negative
    for a positive max, so the extreme value maps to -127), q = nearest_int(iscale * x) (float32
    product, round half to even, via the 1.5*2^23 trick), then q = min(127, q) (no lower clamp is
    needed: |q| <= 127 by construction), and d = float32(1 / iscale). The block sums ggml stores
    beside q are a speed-up of the same integer dot product and do not change results.
    Returns (q int8 (tokens, K), d float32 (tokens, K // 256)); dequantized = d * q.
    """
    a = _rows(x)
    t, k = a.shape
    if k % QK_K:
        raise ValueError(f"Q8_K needs a row length that is a multiple of {QK_K}, got {k}")
    b = a.reshape(t, k // QK_K, QK_K)
    idx = np.abs(b).argmax(axis=2)  # argmax returns the first maximum, as ggml's strict '>' does
    mx = np.take_along_axis(b, idx[:, :, None], axis=2)[:, :, 0]
    zero = mx == 0
    iscale = (np.float32(-127.0) / np.where(zero, np.float32(1), mx)).astype(np.float32)
    q = np.minimum(np.rint(b * iscale[:, :, None]), 127)
    q = np.where(zero[:, :, None], 0, q).astype(np.int8).reshape(t, k)
    d = np.where(zero, np.float32(0), np.float32(1) / iscale).astype(np.float32)
    return q, d


def quantize_q8_k(x) -> np.ndarray:
    """Q8_K quantize-dequantize: float32 (tokens, K) of d * q (see `quantize_q8_k_blocks`)."""
    q, d = quantize_q8_k_blocks(x)
    t, k = q.shape
    return (q.reshape(t, -1, QK_K).astype(np.float32) * d[:, :, None]).reshape(t, k)


__all__ = ["QK_K", "quantize_i8_s", "quantize_q8_k", "quantize_q8_k_blocks"]
