"""TL2: bitnet.cpp's lookup-table format for x86 (ggml type 39), one float32 scale per tensor.

Split. Each row's K columns are cut into a "three" part, the first K3 = K - K % BK columns, and a
"two" part, the last K2 = K % BK columns (a multiple of 32).

Three part. Consecutive weights (w0, w1, w2) form t = 9*w0 + 3*w1 + w2 (-13..13), stored as a 4-bit
magnitude |t| and, separately, a sign bit (1 when t < 0). Two magnitudes share a byte, the first in
the high nibble. Tiling (utils/codegen_tl2.py --BM --BK --bm, bm always 32): BM rows per tile, BK
columns per k-block, bm = 32 rows per SIMD block covering 192/bm = 6 columns (two triples). Magnitude
bytes run, outermost first: row tile (M/BM), k-block (K3/BK), row block (BM/32), 6-column block
(BK/6), then 32 rows, one byte each, whose 8-row quarters are stored in the order 0, 2, 1, 3 (how the
AVX2 kernel unpacks its lanes). Sign bits then follow for the whole three part: per row tile, k-block,
row block and 24-column block (8 triples), sixteen little-endian uint16 words; word u holds, from bit
15 down to bit 0, the signs of triples 0,0,1,1,...,7,7 of rows u, u+16, u, u+16, ... (bit 15 - j is
triple j // 2 of row u + 16 * (j % 2)).

Two part. Pairs coded as in TL1 (3*w0 + w1 + 4), two per byte (high nibble first), in the
magnitude-byte order above with 32-column k-blocks and 4-column blocks (two pairs).

Bytes. Magnitudes (M*K3/6), signs (M*K3/24), pairs (M*K2/4), zero bytes up to bitnet.cpp's size rule
(K-256)*M/3*5/8 + 256*M/2*4/8 (integer arithmetic, left to right) rounded up to 32, then the float32
scale and 28 zero bytes: ggml_nbytes covers exactly that, and the generated kernel reads the scale at
the rounded offset. (The converter writes the scale as a separate `<name>_scale` tensor that
bitnet.cpp's GGUF writer leaves out of the tensor index and stores right after the padded weights.)
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatError
from ..gguf.types import TL2, tl2_nbytes
from .tl1 import LutFormat, Tiling, pair_codes, pair_values

# (rows M, K) -> tiling, as setup_env.py runs utils/codegen_tl2.py for each model (it runs the code
# generator after copying preset_kernels/, so these, not the preset files, are what a build gets;
# the preset .ini of bitnet_b1_58-large says bm=64 for 4096x1536, which the converter cannot pack).
# BitNet-b1.58-2B-4T is given the 3B shape set, so its own shapes have no TL2 kernels.
TL2_TILINGS: dict[tuple[int, int], Tiling] = {
    # bitnet_b1_58-large
    (1536, 4096): Tiling(256, 96, 32),
    (1536, 1536): Tiling(128, 192, 32),
    (4096, 1536): Tiling(256, 96, 32),
    # bitnet_b1_58-3B
    (3200, 8640): Tiling(160, 96, 32),
    (3200, 3200): Tiling(320, 96, 32),
    (8640, 3200): Tiling(320, 96, 32),
    # Llama3-8B-1.58-100B-tokens (also used for the Falcon3 models)
    (14336, 4096): Tiling(256, 96, 32),
    (4096, 14336): Tiling(128, 96, 32),
    (1024, 4096): Tiling(256, 96, 32),
    (4096, 4096): Tiling(128, 96, 32),
    # the project's trained model (models/, bitnet_ref/train.py): codegen_tl2.py's rules M % BM == 0,
    # (K % BK) % 32 == 0, bm == 32; K = 256 leaves a 64-column two part, K = 768 none
    (256, 256): Tiling(128, 96, 32),
    (128, 256): Tiling(128, 96, 32),
    (768, 256): Tiling(256, 96, 32),
    (256, 768): Tiling(128, 96, 32),
}

BM_SIMD = 32  # bm: rows per SIMD block, the only value codegen_tl2.py accepts
TWO_BK = 32  # k-block of the two part
QUARTERS = [0, 2, 1, 3]  # storage order of the 8-row quarters of a 32-row block (self-inverse)

# Axis order of magnitude / pair bytes. A (rows, groups) code matrix is viewed as
#   rows   -> (tile a, row block d, quarter r = 4, row s = 8)
#   groups -> (k-block b, column block f, nibble g = 2)
# i.e. axes (a, d, r, s, b, f, g) = (0..6), stored in the order a, b, d, f, r, s, g.
_NIBBLE_ORDER = (0, 4, 1, 5, 2, 3, 6)
# Axis order of sign bits. The (rows, triples) sign matrix is viewed as
#   rows    -> (tile a, row block d, half e = 2, row u = 16)
#   triples -> (k-block b, 8-triple block F, triple G = 8)
# i.e. axes (a, d, e, u, b, F, G) = (0..6), stored as a, b, d, F, u (word) then bit j = 2G + e.
_SIGN_ORDER = (0, 4, 1, 5, 3, 6, 2)
_BIT_WEIGHTS = (1 << (15 - np.arange(16))).astype(np.uint32)


def _inverse(perm) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


def _nibble_bytes(codes: np.ndarray, BM: int, BK_groups: int) -> np.ndarray:
    """(rows, n_groups) 4-bit codes, two groups per byte -> bytes in tile order. BK_groups is the
    number of groups (triples or pairs) in one k-block."""
    m, n = codes.shape
    c = codes.reshape(m // BM, BM // BM_SIMD, 4, 8, n // BK_groups, BK_groups // 2, 2)
    c = c.transpose(_NIBBLE_ORDER)[:, :, :, :, QUARTERS]  # tile order, then swap quarters 1 and 2
    return ((c[..., 0] << 4) | c[..., 1]).reshape(-1)


def _nibble_codes(data: np.ndarray, m: int, n: int, BM: int, BK_groups: int) -> np.ndarray:
    """Inverse of _nibble_bytes: bytes -> (rows, n_groups) codes."""
    stored = (m // BM, n // BK_groups, BM // BM_SIMD, BK_groups // 2, 4, 8)
    c = np.stack([data >> 4, data & 15], axis=-1).reshape(stored + (2,))[:, :, :, :, QUARTERS]
    return c.transpose(_inverse(_NIBBLE_ORDER)).reshape(m, n)


class TL2Format(LutFormat):
    name = "tl2"
    type_id = TL2
    presets = TL2_TILINGS
    codegen = "utils/codegen_tl2.py"

    def nbytes(self, shape) -> int:
        """bitnet.cpp's ggml_nbytes for TL2 (independent of the tiling); needs K >= 256."""
        shape = tuple(int(d) for d in shape)
        if len(shape) != 2 or shape[1] < 256 or shape[0] <= 0:
            raise FormatError(f"{self.name}: needs a 2-D (rows, K) matrix with K >= 256, got shape {shape}")
        return tl2_nbytes(shape[1], shape[0])

    def _scale_offset(self, shape) -> int:
        return self.nbytes(shape) - 32

    @staticmethod
    def split(k: int, t: Tiling) -> tuple[int, int]:
        """(K3, K2): the columns of the three part and of the two part."""
        return k - k % t.BK, k % t.BK

    def _tiling_problem(self, shape, t: Tiling) -> str | None:
        m, k = shape
        if t.bm != BM_SIMD:
            return "bm must be 32 (codegen_tl2.py accepts only 32; the converter's layout needs it)"
        if m % t.BM or t.BM % BM_SIMD:
            return f"rows {m} must be a multiple of BM={t.BM}, and BM a multiple of 32"
        if t.BK <= 0 or t.BK % 24:
            return "BK must be a multiple of 24 (triples in 6-column blocks, signs in 24-column blocks)"
        if k < 256:
            return "K must be at least 256 (bitnet.cpp's size rule reserves 256 columns for the two part)"
        k3, k2 = self.split(k, t)
        if k2 % TWO_BK:
            return f"K mod BK = {k2} (the two part) must be a multiple of 32"
        packed = m * k3 // 6 + m * k3 // 24 + m * k2 // 4
        room = self.nbytes(shape) - 32
        if packed > room:
            return (f"the packed weights take {packed} bytes, more than the {room} that bitnet.cpp's size "
                    f"rule gives (K mod BK = {k2} must not exceed 256)")
        return None

    def _pack_values(self, values: np.ndarray, t: Tiling) -> np.ndarray:
        m, k = values.shape
        k3, k2 = self.split(k, t)
        v3 = values[:, :k3].astype(np.int8)
        # consecutive triples along each row -> 9*w0 + 3*w1 + w2
        trip = 9 * v3[:, 0::3] + 3 * v3[:, 1::3] + v3[:, 2::3]
        mags = np.abs(trip).astype(np.uint8)
        parts = [_nibble_bytes(mags, t.BM, t.BK // 3)]
        # sign bits: split rows and triples into their tiling levels, bring them into storage order,
        # then fold the innermost 16 (8 triples x 2 row halves) into one uint16 word, MSB first
        s = (trip < 0).astype(np.uint32)
        s = s.reshape(m // t.BM, t.BM // BM_SIMD, 2, 16, k3 // t.BK, t.BK // 24, 8)
        s = s.transpose(_SIGN_ORDER).reshape(-1, 16)
        words = (s * _BIT_WEIGHTS).sum(axis=1).astype("<u2")
        parts.append(words.view(np.uint8))
        if k2:
            parts.append(_nibble_bytes(pair_codes(values[:, k3:]), t.BM, TWO_BK // 2))
        return np.concatenate(parts)

    def _unpack_values(self, data: np.ndarray, shape, t: Tiling) -> np.ndarray:
        m, k = shape
        k3, k2 = self.split(k, t)
        n_mag, n_sign = m * k3 // 6, m * k3 // 24
        mags = _nibble_codes(data[:n_mag], m, k3 // 3, t.BM, t.BK // 3).astype(np.int8)
        if (mags > 13).any():
            bad = int(mags[mags > 13].flat[0])
            raise FormatError(f"{self.name}: triple magnitude {bad} found; valid magnitudes are 0..13")
        words = data[n_mag : n_mag + n_sign].copy().view("<u2").astype(np.uint32)
        bits = (words[:, None] >> (15 - np.arange(16, dtype=np.uint32))) & 1
        stored = (m // t.BM, k3 // t.BK, t.BM // BM_SIMD, t.BK // 24, 16, 8, 2)
        neg = bits.reshape(stored).transpose(_inverse(_SIGN_ORDER)).reshape(m, k3 // 3).astype(bool)
        trip = np.where(neg, -mags, mags) + 13  # base-3 digits of w0+1, w1+1, w2+1
        out = np.empty((m, k), dtype=np.int8)
        out[:, 0:k3:3] = trip // 9 - 1
        out[:, 1:k3:3] = trip // 3 % 3 - 1
        out[:, 2:k3:3] = trip % 3 - 1
        if k2:
            start = n_mag + n_sign
            two = _nibble_codes(data[start : start + m * k2 // 4], m, k2 // 2, t.BM, TWO_BK // 2)
            out[:, k3:] = pair_values(two, self.name)
        return out
