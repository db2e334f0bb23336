"""TL1: bitnet.cpp's lookup-table format for ARM (ggml type 38), one float32 scale per tensor.

Values. Along each row, weights are taken in pairs (w0, w1) = (w[2c], w[2c+1]) and a pair becomes the
code 3*w0 + w1 + 4 (0..8, the index of the pair in the kernel's nine-entry table). Two codes share a
byte, the first in the high nibble.

Order. bitnet.cpp generates one kernel per matrix shape, tiled by three numbers given to its code
generator (utils/codegen_tl1.py --BM --BK --bm, recorded in include/kernel_config.ini as bm, bk, bmm):
BM rows per tile (one tile per thread task), BK columns per k-block, bm rows per SIMD block; a SIMD
block covers by = 256 // bm columns. The converter (utils/convert-hf-to-gguf-bitnet.py,
preprocess_weights_tl1) lays the codes out, outermost first, as
    row tile (M/BM), k-block (K/BK), row block (BM/bm), column block (BK/by), 16-row group (bm/16),
    pair of pairs (by/4), row within the 16 (16), then the two codes of a byte,
so each byte holds the codes of pairs 2p and 2p+1 of one row, and 16 consecutive bytes hold the same
two pairs for 16 consecutive rows (one NEON vector).

Bytes. The packed codes take M*K/4 bytes. The converter writes the scale as a separate float32 tensor
`<name>_scale` that bitnet.cpp's GGUF writer leaves out of the tensor index but stores right after the
weights, padded to 32 bytes; ggml_nbytes counts M*K/4 + 32 bytes for a TL1 tensor, and the kernel
(ggml_bitnet_transform_tensor) reads the scale at byte M*K/4. So the bytes of a TL1 tensor are: the
codes, the float32 scale, 28 zero bytes.

Shapes. A TL1 build runs only the shapes its kernels were generated for; this module knows the tilings
that bitnet.cpp's setup_env.py generates (TL1_TILINGS) and takes others through `tiling=` or a
kernel_config.ini (TL1Format.from_kernel_config).
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import FormatError
from ..gguf.types import TL1, i2s_nbytes
from .base import Ternary, WeightFormat, check_ternary

TAIL = 32


@dataclass(frozen=True)
class Tiling:
    """The code generator's parameters for one (M, K) kernel: --BM, --BK, --bm
    (kernel_config.ini keys bm, bk, bmm)."""

    BM: int  # rows per tile
    BK: int  # columns per k-block
    bm: int  # rows per SIMD block

    def __str__(self) -> str:
        return f"BM={self.BM}, BK={self.BK}, bm={self.bm}"


TilingSpec = Tiling | tuple | Mapping

# (rows M, K) -> tiling, as setup_env.py runs utils/codegen_tl1.py for each model. setup_env.py runs
# the code generator after copying preset_kernels/, so these (not the preset .ini files, which differ
# for Llama3-8B) are the tilings a build gets. BitNet-b1.58-2B-4T is given the 3B shape set, so its
# own shapes (2560x2560, 6912x2560, ...) have no TL1 kernels.
TL1_TILINGS: dict[tuple[int, int], Tiling] = {
    # bitnet_b1_58-large
    (1536, 4096): Tiling(256, 128, 32),
    (1536, 1536): Tiling(128, 64, 64),
    (4096, 1536): Tiling(256, 128, 32),
    # bitnet_b1_58-3B
    (3200, 8640): Tiling(160, 64, 32),
    (3200, 3200): Tiling(320, 128, 64),
    (8640, 3200): Tiling(320, 64, 32),
    # Llama3-8B-1.58-100B-tokens (also used for the Falcon3 models)
    (14336, 4096): Tiling(256, 128, 32),
    (4096, 14336): Tiling(128, 64, 64),
    (1024, 4096): Tiling(256, 128, 32),
    (4096, 4096): Tiling(128, 64, 64),
    # the project's trained model (models/, bitnet_ref/train.py): hidden 256, 2 KV heads of 64, ffn 768;
    # codegen_tl1.py's rules: M % BM == 0, K % BK == 0, bm in (32, 64) (and BK a multiple of 256/bm)
    (256, 256): Tiling(128, 64, 32),
    (128, 256): Tiling(128, 64, 32),
    (768, 256): Tiling(256, 128, 32),
    (256, 768): Tiling(128, 64, 32),
}


def as_tiling(spec: TilingSpec) -> Tiling:
    """A Tiling from a Tiling, a (BM, BK, bm) tuple or a mapping with keys BM, BK, bm."""
    if isinstance(spec, Tiling):
        return spec
    if isinstance(spec, Mapping):
        try:
            return Tiling(int(spec["BM"]), int(spec["BK"]), int(spec["bm"]))
        except KeyError as e:
            raise FormatError(f"tiling {dict(spec)!r} lacks key {e.args[0]!r} (needs BM, BK, bm)") from None
    try:
        bm_, bk, bmm = spec
    except (TypeError, ValueError):
        raise FormatError(f"tiling {spec!r} is not (BM, BK, bm)") from None
    return Tiling(int(bm_), int(bk), int(bmm))


def load_kernel_config(source: str | os.PathLike) -> dict[tuple[int, int], Tiling]:
    """Tilings from a kernel_config.ini that bitnet.cpp's code generator wrote (sections with keys
    m, k, bm (= BM), bk (= BK), bmm (= bm)). `source` is a path or the file's text."""
    config = configparser.ConfigParser()
    text = str(source)
    if "\n" in text or "[" in text:
        config.read_string(text)
    else:
        with open(source, encoding="utf-8") as f:
            config.read_file(f)
    table = {}
    for section in config.sections():
        s = config[section]
        try:
            table[(int(s["m"]), int(s["k"]))] = Tiling(int(s["bm"]), int(s["bk"]), int(s["bmm"]))
        except KeyError as e:
            raise FormatError(f"kernel config section [{section}] lacks key {e.args[0]!r}") from None
    return table


class LutFormat(WeightFormat):
    """What TL1 and TL2 share: a per-shape tiling table, one float32 scale per tensor, and the
    ternary encode/decode around a subclass's code layout."""

    ternary = True
    presets: ClassVar[dict[tuple[int, int], Tiling]] = {}
    codegen = ""  # the code generator, for messages

    def __init__(self, tiling: Mapping[tuple[int, int], TilingSpec] | None = None, *, presets: bool = True):
        """`tiling` maps (rows M, K) to the (BM, BK, bm) you gave the code generator; it extends or
        overrides the shapes bitnet.cpp ships (drop those with presets=False)."""
        self.tilings: dict[tuple[int, int], Tiling] = dict(self.presets) if presets else {}
        for (m, k), spec in (tiling or {}).items():
            self.tilings[(int(m), int(k))] = as_tiling(spec)

    @classmethod
    def from_kernel_config(cls, source: str | os.PathLike):
        """The format as bitnet.cpp's converter sees it: only the shapes in this kernel_config.ini."""
        return cls(tiling=load_kernel_config(source), presets=False)

    # -- shape rules ------------------------------------------------------------------------------

    def tiling_for(self, shape) -> Tiling:
        shape = tuple(int(d) for d in shape)
        if len(shape) != 2 or min(shape) <= 0:
            raise FormatError(f"{self.name}: needs a 2-D (rows, K) matrix, got shape {shape}")
        t = self.tilings.get(shape)
        if t is None:
            known = ", ".join(f"{m}x{k}" for m, k in sorted(self.tilings)) or "none"
            raise FormatError(
                f"{self.name}: no tiling for shape {shape} (rows={shape[0]}, K={shape[1]}). bitnet.cpp "
                f"packs and runs {self.name.upper()} only for shapes its code generator ({self.codegen}) "
                f"was run with; known here (rows x K): {known}. For another shape pass "
                f"tiling={{({shape[0]}, {shape[1]}): (BM, BK, bm)}} with the values given to the generator"
            )
        problem = self._tiling_problem(shape, t)
        if problem:
            raise FormatError(f"{self.name}: tiling {t} does not fit shape {shape}: {problem}")
        return t

    def check_shape(self, shape) -> None:
        self.tiling_for(shape)

    def _tiling_problem(self, shape, t: Tiling) -> str | None:
        raise NotImplementedError

    def _scale_offset(self, shape) -> int:
        raise NotImplementedError

    # -- bytes ------------------------------------------------------------------------------------

    def _pack_values(self, values: np.ndarray, t: Tiling) -> np.ndarray:
        raise NotImplementedError

    def _unpack_values(self, data: np.ndarray, shape, t: Tiling) -> np.ndarray:
        raise NotImplementedError

    def pack(self, values: np.ndarray, scale: float) -> np.ndarray:
        check_ternary(values, self.name)
        t = self.tiling_for(values.shape)
        s = np.float32(scale)
        if not np.isfinite(s):
            raise FormatError(f"{self.name}: scale {scale!r} is not a finite float32")
        body = self._pack_values(values.astype(np.int8, copy=False), t)
        out = np.zeros(self.nbytes(values.shape), dtype=np.uint8)
        out[: body.size] = body  # the converter pads with zero bytes up to the scale
        off = self._scale_offset(values.shape)
        out[off : off + 4] = np.frombuffer(s.tobytes(), dtype=np.uint8)
        return out

    def unpack(self, data: np.ndarray, shape) -> Ternary:
        shape = tuple(int(d) for d in shape)
        t = self.tiling_for(shape)
        data = np.asarray(data)
        if data.dtype != np.uint8:
            data = data.view(np.uint8)
        data = data.reshape(-1)
        self._check_size(data, shape)
        values = self._unpack_values(data, shape, t)
        off = self._scale_offset(shape)
        scale = data[off : off + 4].copy().view(np.float32)[0]
        return Ternary(values, np.asarray(scale, dtype=np.float32))

    def encode(self, weights: np.ndarray) -> np.ndarray:
        """float32 weights that are already ternary x one scale (each entry 0 or +-max|w|, as absmean
        quantization gives) -> bytes. The scale stored is max|w|, as bitnet.cpp's converter does."""
        w = np.asarray(weights, dtype=np.float32)
        self.check_shape(w.shape)
        if not np.isfinite(w).all():
            i = tuple(int(x) for x in np.argwhere(~np.isfinite(w))[0])
            raise FormatError(f"{self.name}: weight {w[i]} at {i} is not finite")
        a = np.abs(w)
        scale = np.float32(a.max()) if w.size else np.float32(0)
        bad = (a != 0) & (a != scale)
        if bad.any():
            i = tuple(int(x) for x in np.argwhere(bad)[0])
            raise FormatError(
                f"{self.name}: weights are not ternary x one scale: {w[i]!r} at {i} is neither 0 nor "
                f"+-{scale!r} (max |w|); quantize first (absmean_quantize) and pass values*scale, or use pack()"
            )
        return self.pack(np.sign(w).astype(np.int8), scale)

    def decode(self, data: np.ndarray, shape) -> np.ndarray:
        return self.unpack(data, shape).dequantize()


def _inverse(perm) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


def pair_codes(values: np.ndarray) -> np.ndarray:
    """(rows, K) ternary -> (rows, K/2) pair codes 3*w0 + w1 + 4."""
    v = values.astype(np.int8)
    return (3 * v[:, 0::2] + v[:, 1::2] + 4).astype(np.uint8)


def pair_values(codes: np.ndarray, fmt: str) -> np.ndarray:
    """(rows, K/2) pair codes -> (rows, K) ternary; codes above 8 are not pairs."""
    if (codes > 8).any():
        bad = int(codes[codes > 8].flat[0])
        raise FormatError(f"{fmt}: pair code {bad} found; valid codes are 0..8 (3*w0 + w1 + 4)")
    rows, half = codes.shape
    out = np.empty((rows, half, 2), dtype=np.int8)
    out[..., 0] = codes // 3
    out[..., 1] = codes % 3
    out -= 1
    return out.reshape(rows, 2 * half)


# Axis order of the packed TL1 bytes. The pair-code matrix is viewed as
#   rows  -> (tile a = M/BM, row block d = BM/bm, 16-row group h = bm/16, row i = 16)
#   pairs -> (k-block b = K/BK, column block f = BK/by, pair of pairs p = by/4, nibble q = 2)
# i.e. axes (a, d, h, i, b, f, p, q) = (0..7), and stored in the order a, b, d, f, h, p, i, q.
_TL1_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


class TL1Format(LutFormat):
    name = "tl1"
    type_id = TL1
    presets = TL1_TILINGS
    codegen = "utils/codegen_tl1.py"

    def nbytes(self, shape) -> int:
        """bitnet.cpp's ggml_nbytes for TL1 (same rule as I2_S): M*K/4 + 32. It does not depend on
        the tiling."""
        shape = tuple(int(d) for d in shape)
        if len(shape) != 2:
            raise FormatError(f"{self.name}: needs a 2-D (rows, K) matrix, got shape {shape}")
        return i2s_nbytes(shape[0] * shape[1])

    def _scale_offset(self, shape) -> int:
        return shape[0] * shape[1] // 4

    def _tiling_problem(self, shape, t: Tiling) -> str | None:
        m, k = shape
        if t.bm not in (32, 64):
            return "bm must be 32 or 64 (codegen_tl1.py accepts only these)"
        by = 256 // t.bm
        if m % t.BM or t.BM % t.bm:
            return f"rows {m} must be a multiple of BM={t.BM}, and BM a multiple of bm={t.bm}"
        if k % t.BK or t.BK % by:
            return f"K {k} must be a multiple of BK={t.BK}, and BK a multiple of 256/bm={by}"
        return None

    def _pack_values(self, values: np.ndarray, t: Tiling) -> np.ndarray:
        m, k = values.shape
        by = 256 // t.bm
        codes = pair_codes(values)
        # split rows and pair columns into their tiling levels (see _TL1_ORDER), then bring the
        # levels into storage order: tile, k-block, row block, column block, 16-row group, pair of
        # pairs, row, nibble.
        c = codes.reshape(m // t.BM, t.BM // t.bm, t.bm // 16, 16, k // t.BK, t.BK // by, by // 4, 2)
        c = c.transpose(_TL1_ORDER)
        # the first pair of each two takes the high nibble
        return ((c[..., 0] << 4) | c[..., 1]).reshape(-1)

    def _unpack_values(self, data: np.ndarray, shape, t: Tiling) -> np.ndarray:
        m, k = shape
        by = 256 // t.bm
        b = data[: m * k // 4]
        stored = (m // t.BM, k // t.BK, t.BM // t.bm, t.BK // by, t.bm // 16, by // 4, 16)
        c = np.stack([b >> 4, b & 15], axis=-1).reshape(stored + (2,))
        # back from storage order to (rows..., pairs...) and flatten each side
        codes = c.transpose(_inverse(_TL1_ORDER)).reshape(m, k // 2)
        return pair_values(codes, self.name)
