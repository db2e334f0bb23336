"""The exact profile's matrix products in one defined float64 order (numpy; native/bk_exact.c computes the same bits).

A float64 matrix product through BLAS sums in an order that depends on the library, its build and the CPU, so
neither another implementation nor another machine can reproduce its last bits. The exact profile therefore
defines its order, the same for every weight format and row:

    for each scale block b of g = K / nb values (nb = 1 for a per-tensor scale and for float weights):
        lane[0..8) = 0;  lane[p % 8] += w[p] * x[p]  for the block's positions p = 0, 1, ..., g - 1, in order
        s = ((lane0 + lane1) + (lane2 + lane3)) + ((lane4 + lane5) + (lane6 + lane7))
        ternary weights: out = out + s * scale[row, b]  (out starts at 0.0);  float weights: out = s

every product rounded to float64 before it is added. It is still the mathematical definition: float64
products and sums of the float64 activations, no quantization; only the association of the sums is fixed
(it differs from another order by a few float64 ulp of the sum of |terms|, far below any float32 result).
"""

from __future__ import annotations

import numpy as np

LANES = 8


def _fold(lanes: np.ndarray) -> np.ndarray:
    """((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) over the last axis (8 lanes)."""
    a = lanes
    return ((a[..., 0] + a[..., 1]) + (a[..., 2] + a[..., 3])) + ((a[..., 4] + a[..., 5]) + (a[..., 6] + a[..., 7]))


def _block_lanes(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The 8 lanes of one block: x (T, g) float64, w (R, g) -> (T, R, 8), each lane summed in position order."""
    t, g = x.shape
    r = w.shape[0]
    acc = np.zeros((t, r, LANES), np.float64)
    full = g // LANES * LANES
    wd = w.astype(np.float64)
    for c in range(0, full, LANES):
        acc += x[:, None, c:c + LANES] * wd[None, :, c:c + LANES]
    if full < g:
        rem = g - full
        acc[:, :, :rem] += x[:, None, full:] * wd[None, :, full:]
    return acc


def lane_dot(x: np.ndarray, w: np.ndarray, scale: np.ndarray | None = None, row_chunk: int = 1024) -> np.ndarray:
    """x (T, K) float64 times w (R, K)^T in the exact profile's order: float64 (T, R).

    w: int8 ternary values (with `scale` float32 (R or 1, nb), nb dividing K) or float weights (scale None)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    t, k = x.shape
    r = w.shape[0]
    out = np.zeros((t, r), np.float64)
    for r0 in range(0, r, row_chunk):
        r1 = min(r0 + row_chunk, r)
        wr = w[r0:r1]
        if scale is None:
            out[:, r0:r1] = _fold(_block_lanes(x, wr))
            continue
        sc = np.asarray(scale, dtype=np.float32)
        nb = sc.shape[1]
        g = k // nb
        srows = sc if sc.shape[0] == 1 else sc[r0:r1]
        for b in range(nb):
            s = _fold(_block_lanes(x[:, b * g:(b + 1) * g], wr[:, b * g:(b + 1) * g]))
            out[:, r0:r1] += s * srows[:, b].astype(np.float64)
    return out


__all__ = ["LANES", "lane_dot"]
