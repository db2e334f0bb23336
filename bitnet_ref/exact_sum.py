"""The exact profile's matrix products in one defined float64 order (numpy; native/bk_exact.c computes the same bits).

A float64 matrix product through BLAS sums in an order that depends on the library, its build and the CPU, so
neither another implementation nor another machine can reproduce its last bits. The exact profile therefore
defines its order. Every product w * x is rounded to float64 before it is added.

Ternary weights (`ternary_dot`), w in {-1, 0, 1}, one float32 scale per block of g = K / nb values:

    for each scale block b (positions 0 .. g-1 of the block; the block padded with w = 0, x = +0.0 to a
    multiple of 128):
        s = +0.0
        for each 128-value chunk c, in order, and m = 0, 1, ..., 31:     (group (c, m): 4 values, 32 apart)
            v_n = w[p_n] * x[p_n]  at p_n = 128 c + m + 32 n,  n = 0..3
            s = s + ((v_0 + v_1) + (v_2 + v_3))
        out = out + s * scale[row, b]        (out starts at +0.0)

The groups are 4 values 32 apart because TQ2_0 and I2_S store exactly those 4 codes in one byte: the native
kernel computes, once per token, the 16 possible values of each pair sum (v0 + v1, v2 + v3) and then adds two
table entries per 4 weights and row, with the same bits. (A malformed TQ2_0 code 3 is the value 2; its product
is still exact.)

Float weights (`lane_dot`: F32/F16 rows, the lm_head):

    lane[0..8) = 0;  lane[p % 8] += w[p] * x[p]  for p = 0, 1, ..., K - 1, in order
    out = ((lane0 + lane1) + (lane2 + lane3)) + ((lane4 + lane5) + (lane6 + lane7))

Attention (`attention_scores`, `attention_values`; query head h reads KV head h // (heads / kv_heads)):

    score[h, i, s] = q[i, h] . k[s, h // g]  as lane_dot: 8 lanes over the head dimension, folded
    out[i, h, :] = +0.0;  out[i, h, :] = out[i, h, :] + w[h, i, s] * v[s, h // g, :]  for s = 0, 1, ..., in order

RMS norm (`rms_norm`, each row x of K values, gain float32):

    ms = (x . x as lane_dot: 8 lanes, folded) / K
    y = (x * (1 / sqrt(ms + eps))) * gain

All are still the mathematical definition: float64 products and sums of the float64 activations, no
quantization; only the association of the sums is fixed (it differs from another order by a few float64 ulp of
the sum of |terms|, far below any float32 result).
"""

from __future__ import annotations

import numpy as np

LANES = 8
CHUNK = 128  # a ternary group's 4 values are m + 32 n within a 128-value chunk
ORDER_VERSION = 3  # bump when an order here changes: cached results of the exact profile (noise floors) then renew


def _fold(lanes: np.ndarray) -> np.ndarray:
    """((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) over the last axis (8 lanes)."""
    a = lanes
    return ((a[..., 0] + a[..., 1]) + (a[..., 2] + a[..., 3])) + ((a[..., 4] + a[..., 5]) + (a[..., 6] + a[..., 7]))


def lane_dot(x: np.ndarray, w: np.ndarray, row_chunk: int = 1024) -> np.ndarray:
    """x (T, K) float64 times float weights w (R, K)^T in the exact profile's lane order: float64 (T, R)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    t, k = x.shape
    r = w.shape[0]
    out = np.zeros((t, r), np.float64)
    full = k // LANES * LANES
    for r0 in range(0, r, row_chunk):
        wd = w[r0:r0 + row_chunk].astype(np.float64)
        acc = np.zeros((t, wd.shape[0], LANES), np.float64)
        for c in range(0, full, LANES):
            acc += x[:, None, c:c + LANES] * wd[None, :, c:c + LANES]
        if full < k:
            acc[:, :, :k - full] += x[:, None, full:] * wd[None, :, full:]
        out[:, r0:r0 + wd.shape[0]] = _fold(acc)
    return out


def _chunks(a: np.ndarray, g: int) -> np.ndarray:
    """(N, g) -> (N, C, 4, 32): padded with zeros to C 128-value chunks; [c, n, m] is position 128 c + 32 n + m"""
    pad = -g % CHUNK
    if pad:
        a = np.concatenate([a, np.zeros((a.shape[0], pad), a.dtype)], axis=1)
    return a.reshape(a.shape[0], -1, 4, CHUNK // 4)


def ternary_dot(x: np.ndarray, w: np.ndarray, scale: np.ndarray, row_chunk: int = 256) -> np.ndarray:
    """x (T, K) float64 times ternary values w (R, K) int8 with `scale` float32 (R or 1, nb), nb dividing K, in
    the exact profile's group order (module docstring): float64 (T, R)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    t, k = x.shape
    r = w.shape[0]
    sc = np.asarray(scale, dtype=np.float32)
    nb = sc.shape[1]
    g = k // nb
    out = np.zeros((t, r), np.float64)
    for b in range(nb):
        xc = _chunks(x[:, b * g:(b + 1) * g], g)
        for r0 in range(0, r, row_chunk):
            r1 = min(r0 + row_chunk, r)
            wc = _chunks(w[r0:r1, b * g:(b + 1) * g].astype(np.float64), g)
            s = np.zeros((t, r1 - r0, 1), np.float64)
            for c in range(xc.shape[1]):
                v = [x_n[:, None, :] * w_n[None, :, :] for x_n, w_n in zip(xc[:, c].transpose(1, 0, 2),
                                                                          wc[:, c].transpose(1, 0, 2))]
                groups = (v[0] + v[1]) + (v[2] + v[3])  # (T, R', 32), group m in order
                # s + g0, (s + g0) + g1, ...: accumulate adds strictly left to right
                s = np.add.accumulate(np.concatenate([s, groups], axis=2), axis=2)[:, :, -1:]
            srow = sc[:, b] if sc.shape[0] == 1 else sc[r0:r1, b]
            out[:, r0:r1] = out[:, r0:r1] + s[:, :, 0] * srow.astype(np.float64)
    return out


def rms_norm(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    """x (T, K) float64 normalized by its root mean square in the order above, times gain (K,): float64 (T, K)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    t, k = x.shape
    sq = np.square(x)
    if k % LANES:
        sq = np.concatenate([sq, np.zeros((t, -k % LANES))], axis=1)
    lanes = np.add.accumulate(sq.reshape(t, -1, LANES), axis=1)[:, -1]  # lane l: values l, l + 8, ... in order
    y = x * (1.0 / np.sqrt(_fold(lanes) / k + eps))[:, None]
    return np.multiply(y, np.asarray(gain).astype(np.float64), out=y)


def attention_scores(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """q (T, H, d) float64, k (S, KV, d) (float32 or float64) -> float64 (H, T, S): lane_dot of each query head
    with its KV head's keys."""
    t, h, d = q.shape
    kvh = k.shape[1]
    g = h // kvh
    out = np.empty((h, t, k.shape[0]), np.float64)
    for kv in range(kvh):
        rows = np.ascontiguousarray(q[:, kv * g:(kv + 1) * g].transpose(1, 0, 2), dtype=np.float64).reshape(g * t, d)
        out[kv * g:(kv + 1) * g] = lane_dot(rows, k[:, kv, :]).reshape(g, t, -1)
    return out


def attention_values(w: np.ndarray, v: np.ndarray, token_chunk: int = 64) -> np.ndarray:
    """w (H, T, S) float64, v (S, KV, d) (float32 or float64) -> float64 (T, H, d): each head's V rows weighted by
    w and added in key order, starting at +0.0."""
    h, t, s = w.shape
    kvh, d = v.shape[1], v.shape[2]
    g = h // kvh
    out = np.empty((t, h, d), np.float64)
    for hh in range(h):
        vk = v[:, hh // g, :].astype(np.float64)
        for t0 in range(0, t, token_chunk):
            wt = w[hh, t0:t0 + token_chunk]
            terms = np.concatenate([np.zeros((wt.shape[0], 1, d)), wt[:, :, None] * vk[None]], axis=1)
            out[t0:t0 + token_chunk, hh] = np.add.accumulate(terms, axis=1)[:, -1]  # left to right
    return out


__all__ = ["CHUNK", "LANES", "ORDER_VERSION", "attention_scores", "attention_values", "lane_dot", "rms_norm",
           "ternary_dot"]
