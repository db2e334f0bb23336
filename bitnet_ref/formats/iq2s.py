"""IQ2_S: read-only dequantization through the `gguf` package (for files people already have)."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gq

from ..errors import FormatError
from .base import WeightFormat

QK = 256
BLOCK_BYTES = 82


class IQ2SFormat(WeightFormat):
    name = "iq2_s"
    type_id = int(GGMLQuantizationType.IQ2_S)

    def check_shape(self, shape) -> None:
        if shape[-1] % QK:
            raise FormatError(f"iq2_s: row length K={shape[-1]} is not a multiple of {QK}")

    def nbytes(self, shape) -> int:
        self.check_shape(shape)
        return int(np.prod(shape, dtype=np.int64)) // QK * BLOCK_BYTES

    def encode(self, weights):
        raise FormatError("iq2_s is read-only here: quantize with llama.cpp's llama-quantize")

    def decode(self, data: np.ndarray, shape) -> np.ndarray:
        self._check_size(data, shape)
        if data.size == 0:
            return np.zeros(shape, np.float32)
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        return gq.dequantize(data.reshape(rows, -1), GGMLQuantizationType.IQ2_S).reshape(shape)


IQ2_S = IQ2SFormat()
