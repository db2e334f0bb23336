"""What every weight format offers.

Shapes are numpy order: (rows, K) for a matrix, K being the row length (ggml's ne[0]). A format turns
float32 weights or (ternary int8 values, scale) into the bytes a GGUF file stores, and back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FormatError


@dataclass
class Ternary:
    """Ternary weights: values in {-1, 0, 1} and the scale that multiplies them.

    `scale` is a float32 array: shape () for one scale per tensor (I2_S, TL1, TL2), or (rows, K // block)
    for per-block scales (TQ1_0, TQ2_0). dequantized = values * scale (broadcast per block).
    """

    values: np.ndarray
    scale: np.ndarray

    def dequantize(self) -> np.ndarray:
        v = self.values.astype(np.float32)
        if self.scale.ndim == 0:
            return v * np.float32(self.scale)
        rows, k = v.shape
        blocks = self.scale.shape[-1]
        return (v.reshape(rows, blocks, k // blocks) * self.scale[:, :, None]).reshape(rows, k)


class WeightFormat:
    name: str = ""
    type_id: int = -1
    ternary: bool = False  # holds ternary values with scales (else: plain floats)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        raise NotImplementedError

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise FormatError when this format cannot hold a tensor of this shape."""

    def encode(self, weights: np.ndarray) -> np.ndarray:
        """float32 weights -> stored bytes (uint8). Ternary formats expect ternary x scale input."""
        raise NotImplementedError

    def decode(self, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """stored bytes (uint8) -> float32 array of `shape`."""
        raise NotImplementedError

    def pack(self, values: np.ndarray, scale: float) -> np.ndarray:
        """Ternary int8 values (rows, K) and one per-tensor scale -> stored bytes."""
        check_ternary(values, self.name)
        return self.encode(values.astype(np.float32) * np.float32(scale))

    def unpack(self, data: np.ndarray, shape: tuple[int, ...]) -> Ternary:
        raise FormatError(f"{self.name} holds floats, not ternary values")

    def _check_size(self, data: np.ndarray, shape: tuple[int, ...]) -> None:
        want = self.nbytes(shape)
        if data.nbytes != want:
            raise FormatError(
                f"{self.name}: {data.nbytes} bytes given for shape {tuple(shape)}, which needs {want}"
            )


def check_ternary(values: np.ndarray, fmt: str) -> None:
    if values.ndim != 2:
        raise FormatError(f"{fmt}: ternary weights must be a 2-D (rows, K) matrix, got shape {values.shape}")
    bad = (values != -1) & (values != 0) & (values != 1)
    if bad.any():
        i = np.argwhere(bad)[0]
        raise FormatError(f"{fmt}: value {values[tuple(i)]} at {tuple(int(x) for x in i)} is not ternary")


def absmean_quantize(weights: np.ndarray) -> tuple[np.ndarray, float]:
    """BitNet b1.58 weight quantization: per tensor, s = 1/max(mean|W|, 1e-5),
    values = clamp(round(W*s), -1, 1); returns (int8 values, dequantization scale 1/s)."""
    w = np.asarray(weights, dtype=np.float32)
    mean = np.float32(max(float(np.mean(np.abs(w), dtype=np.float64)), 1e-5))
    s = np.float32(1.0) / mean
    values = np.clip(np.rint(w * s), -1, 1).astype(np.int8)
    return values, float(mean)
