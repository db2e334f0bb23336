"""Plain float storage: F32, F16, BF16 (norms, embeddings, and unquantized reference models)."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gq

from .base import WeightFormat


class FloatFormat(WeightFormat):
    def __init__(self, name: str, qtype: GGMLQuantizationType, itemsize: int):
        self.name = name
        self.type_id = int(qtype)
        self._qtype = qtype
        self._itemsize = itemsize

    def nbytes(self, shape) -> int:
        return int(np.prod(shape, dtype=np.int64)) * self._itemsize

    def encode(self, weights: np.ndarray) -> np.ndarray:
        w = np.asarray(weights, dtype=np.float32)
        if self._qtype == GGMLQuantizationType.F32:
            out = w
        elif self._qtype == GGMLQuantizationType.F16:
            out = w.astype(np.float16)
        else:
            out = gq.quantize(w, self._qtype)
        return np.ascontiguousarray(out).view(np.uint8).reshape(-1)

    def decode(self, data: np.ndarray, shape) -> np.ndarray:
        self._check_size(data, shape)
        if self._qtype == GGMLQuantizationType.F32:
            return data.view(np.float32).reshape(shape).copy()
        if self._qtype == GGMLQuantizationType.F16:
            return data.view(np.float16).reshape(shape).astype(np.float32)
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)


F32 = FloatFormat("f32", GGMLQuantizationType.F32, 4)
F16 = FloatFormat("f16", GGMLQuantizationType.F16, 2)
BF16 = FloatFormat("bf16", GGMLQuantizationType.BF16, 2)
