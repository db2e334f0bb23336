"""I2_S: bitnet.cpp's 2-bit ternary format with one float32 scale per tensor.

The row-major tensor is cut into consecutive blocks of `block` values stored in `block // 4` bytes.
Within a block, the values form four groups of `block // 4`; value j sits in byte j % (block // 4),
group j // (block // 4) taking bits 7-6, 5-4, 3-2, 1-0 in turn. Codes: 0 -> -1, 1 -> 0, 2 -> +1
(3 reads as 0). After the packed values comes a 32-byte tail whose first four bytes are the scale.

Two flavours share type id 36 and the same byte count: x86 (ACT_PARALLEL, 128-value blocks) and ARM
(64-value blocks). The bytes do not say which one wrote them, so callers name the flavour.
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatError
from ..gguf.types import I2_S, i2s_nbytes
from .base import Ternary, WeightFormat, check_ternary

TAIL = 32
QK_I2_S = 128  # values per block of the x86 flavour (ACT_PARALLEL): the layout bitnet.cpp's x86 kernels read
QK_I2_S_ARM = 64
# quantize_i2_s maps any |w| >= this to +-1 (everything else to 0) and stores max|w| as the scale
NONZERO_THRESHOLD = 1e-6


class I2SFormat(WeightFormat):
    type_id = I2_S
    ternary = True

    def __init__(self, name: str, block: int):
        self.name = name
        self.block = block
        self.group = block // 4  # bytes per block; also the values per 2-bit group

    def check_shape(self, shape) -> None:
        if len(shape) != 2 or shape[-1] % self.block:
            raise FormatError(
                f"{self.name}: needs a 2-D (rows, K) tensor with K a multiple of {self.block}, got "
                f"{tuple(shape)} (bitnet.cpp silently drops a remainder, so this tool refuses it)"
            )

    def nbytes(self, shape) -> int:
        self.check_shape(shape)
        return i2s_nbytes(int(np.prod(shape, dtype=np.int64)))

    def pack(self, values: np.ndarray, scale: float) -> np.ndarray:
        check_ternary(values, self.name)
        self.check_shape(values.shape)
        codes = (values.astype(np.int8) + 1).astype(np.uint8).reshape(-1, 4, self.group)
        packed = (codes[:, 0] << 6) | (codes[:, 1] << 4) | (codes[:, 2] << 2) | codes[:, 3]
        tail = np.zeros(TAIL, dtype=np.uint8)
        tail[:4] = np.frombuffer(np.float32(scale).tobytes(), dtype=np.uint8)
        return np.concatenate([packed.reshape(-1), tail])

    def unpack(self, data: np.ndarray, shape) -> Ternary:
        self._check_size(data, shape)
        n = int(np.prod(shape, dtype=np.int64))
        packed = data[: n // 4].reshape(-1, 1, self.group)
        shifts = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)
        codes = (packed >> shifts) & 3
        values = np.choose(codes, np.array([-1, 0, 1, 0], dtype=np.int8)).reshape(shape)
        scale = data[n // 4 : n // 4 + 4].copy().view(np.float32)[0]
        return Ternary(values, np.asarray(scale, dtype=np.float32))

    def encode(self, weights: np.ndarray) -> np.ndarray:
        """quantize_i2_s semantics: sign of each |w| >= 1e-6, scale = max|w|. Input should already be
        ternary x scale (run absmean quantization first)."""
        w = np.asarray(weights, dtype=np.float32)
        self.check_shape(w.shape)
        values = np.where(np.abs(w) >= NONZERO_THRESHOLD, np.sign(w), 0).astype(np.int8)
        return self.pack(values, float(np.max(np.abs(w))) if w.size else 0.0)

    def decode(self, data: np.ndarray, shape) -> np.ndarray:
        return self.unpack(data, shape).dequantize()


I2S_X86 = I2SFormat("i2_s", QK_I2_S)
I2S_ARM = I2SFormat("i2_s_arm", QK_I2_S_ARM)
