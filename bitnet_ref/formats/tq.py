"""TQ1_0 and TQ2_0: mainline llama.cpp's ternary block formats (256 values a block, fp16 block scale).

Bytes come from the `gguf` package's numpy quantizer, which is byte-identical to ggml's C code.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gq

from ..errors import FormatError
from .base import Ternary, WeightFormat

QK = 256


class TQFormat(WeightFormat):
    ternary = True

    def __init__(self, name: str, qtype: GGMLQuantizationType, block_bytes: int):
        self.name = name
        self.type_id = int(qtype)
        self._qtype = qtype
        self._block_bytes = block_bytes  # the fp16 scale is the block's last two bytes

    def check_shape(self, shape) -> None:
        if len(shape) < 1 or shape[-1] % QK:
            raise FormatError(
                f"{self.name}: row length K={shape[-1] if shape else None} is not a multiple of {QK} "
                f"(shape {tuple(shape)}); store this tensor as f16/f32 or pad the model's dimensions"
            )

    def nbytes(self, shape) -> int:
        self.check_shape(shape)
        return int(np.prod(shape, dtype=np.int64)) // QK * self._block_bytes

    def encode(self, weights: np.ndarray) -> np.ndarray:
        w = np.asarray(weights, dtype=np.float32)
        self.check_shape(w.shape)
        return gq.quantize(w, self._qtype).reshape(-1)

    def decode(self, data: np.ndarray, shape) -> np.ndarray:
        self._check_size(data, shape)
        if data.size == 0:  # a zero-length dimension: nothing to dequantize
            return np.zeros(shape, np.float32)
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        return gq.dequantize(data.reshape(rows, -1), self._qtype).reshape(shape)

    def block_scales(self, data: np.ndarray, shape) -> np.ndarray:
        blocks = data.reshape(-1, self._block_bytes)
        d = blocks[:, -2:].copy().view(np.float16).astype(np.float32)
        return d.reshape(*shape[:-1], shape[-1] // QK)

    def unpack(self, data: np.ndarray, shape) -> Ternary:
        if len(shape) != 2:
            raise FormatError(f"{self.name}: unpack needs a 2-D shape, got {tuple(shape)}")
        f = self.decode(data, shape)
        d = self.block_scales(data, shape)
        rows, k = shape
        safe = np.where(d == 0, 1, d)
        values = np.rint(f.reshape(rows, k // QK, QK) / safe[:, :, None]).astype(np.int8).reshape(rows, k)
        return Ternary(values, d)


TQ1_0 = TQFormat("tq1_0", GGMLQuantizationType.TQ1_0, 54)
TQ2_0 = TQFormat("tq2_0", GGMLQuantizationType.TQ2_0, 66)
