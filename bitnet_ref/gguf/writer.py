"""Write GGUF version 3 files, streaming and atomically.

The `gguf` package's writer refuses the bitnet.cpp types (I2_S, TL1, TL2), so the container is written
here. Tensor data is produced one tensor (or one chunk) at a time, so a multi-gigabyte model is written
with a bounded peak memory; the file appears under its name only when it is complete.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from ..atomic import atomic_write
from ..errors import FormatError
from .reader import DEFAULT_ALIGNMENT, GGUF_MAGIC
from .types import tensor_nbytes, type_name

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NP_TO_VTYPE = {
    np.dtype(np.uint8): GGUFValueType.UINT8, np.dtype(np.int8): GGUFValueType.INT8,
    np.dtype(np.uint16): GGUFValueType.UINT16, np.dtype(np.int16): GGUFValueType.INT16,
    np.dtype(np.uint32): GGUFValueType.UINT32, np.dtype(np.int32): GGUFValueType.INT32,
    np.dtype(np.float32): GGUFValueType.FLOAT32, np.dtype(np.bool_): GGUFValueType.BOOL,
    np.dtype(np.uint64): GGUFValueType.UINT64, np.dtype(np.int64): GGUFValueType.INT64,
    np.dtype(np.float64): GGUFValueType.FLOAT64,
}

Chunks = Callable[[], Iterable[np.ndarray]]


@dataclass
class TensorSpec:
    """A tensor to write. `data` is the stored bytes (any dtype, written raw) or a callable that yields
    them in chunks, called only when the tensor's turn comes."""

    name: str
    shape: tuple[int, ...]  # numpy order: (..., rows, K)
    type_id: int
    data: np.ndarray | Chunks

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def nbytes(self) -> int:
        n = tensor_nbytes(self.type_id, self.ne)
        if n is None:
            raise FormatError(
                f"tensor {self.name!r}: type {type_name(self.type_id)} cannot hold shape {self.shape}"
            )
        return n


def infer_vtype(value) -> GGUFValueType:
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.UINT32 if 0 <= value < 2**32 else GGUFValueType.INT64
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, (list, tuple, np.ndarray)):
        return GGUFValueType.ARRAY
    raise TypeError(f"cannot store a {type(value).__name__} in GGUF metadata")


def _item_vtype(value) -> GGUFValueType:
    if isinstance(value, np.ndarray):
        return _NP_TO_VTYPE[value.dtype]
    if len(value) == 0:
        return GGUFValueType.UINT32
    first = value[0]
    if isinstance(first, str):
        return GGUFValueType.STRING
    if isinstance(first, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(first, (int, np.integer)):
        return GGUFValueType.INT32
    if isinstance(first, (float, np.floating)):
        return GGUFValueType.FLOAT32
    raise TypeError(f"cannot store a list of {type(first).__name__} in GGUF metadata")


def _encode_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def encode_value(value, vtype: GGUFValueType, item_vtype: GGUFValueType | None = None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _encode_string(value)
    if vtype != GGUFValueType.ARRAY:
        return struct.pack(_SCALAR[vtype], value)
    item = item_vtype or _item_vtype(value)
    head = struct.pack("<IQ", item, len(value))
    if item == GGUFValueType.STRING:
        return head + b"".join(_encode_string(s) for s in value)
    dtype = np.dtype(_SCALAR[item])
    return head + np.asarray(value, dtype=dtype).tobytes()


def _metadata_items(metadata) -> list[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    """Accepts a dict {key: value} or a list of (key, value[, vtype[, item_vtype]])."""
    items = metadata.items() if isinstance(metadata, dict) else metadata
    out = []
    for entry in items:
        key, value, *rest = entry
        vtype = rest[0] if rest and rest[0] is not None else infer_vtype(value)
        item = rest[1] if len(rest) > 1 else None
        out.append((key, value, GGUFValueType(vtype), item))
    return out


def write_gguf(
    path: str | os.PathLike,
    metadata,
    tensors: list[TensorSpec],
    alignment: int = DEFAULT_ALIGNMENT,
) -> Path:
    """Write a GGUF v3 file at `path`: to a temporary file beside it, renamed into place at the end.
    On any error the temporary file is removed and nothing is left at `path`."""
    path = Path(path)
    items = _metadata_items(metadata)
    if alignment != DEFAULT_ALIGNMENT and not any(k == "general.alignment" for k, *_ in items):
        items.append(("general.alignment", alignment, GGUFValueType.UINT32, None))
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise FormatError(f"tensor name {dup!r} appears twice")

    header = bytearray(GGUF_MAGIC)
    header += struct.pack("<IQQ", 3, len(tensors), len(items))
    for key, value, vtype, item in items:
        header += _encode_string(key) + struct.pack("<I", vtype) + encode_value(value, vtype, item)
    offset = 0
    sizes = []
    for t in tensors:
        ne = t.ne
        header += _encode_string(t.name) + struct.pack("<I", len(ne))
        header += struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", t.type_id, offset)
        n = t.nbytes
        sizes.append(n)
        offset += (n + alignment - 1) // alignment * alignment
    header += b"\0" * (-len(header) % alignment)

    with atomic_write(path, "wb") as f:
        f.write(header)
        for t, n in zip(tensors, sizes):
            written = 0
            chunks = [t.data] if isinstance(t.data, np.ndarray) else t.data()
            for chunk in chunks:
                buf = np.ascontiguousarray(chunk).view(np.uint8).reshape(-1)
                f.write(buf.data)
                written += buf.nbytes
            if written != n:
                raise FormatError(
                    f"tensor {t.name!r}: {written} bytes of data for type {type_name(t.type_id)} and "
                    f"shape {t.shape}, which needs {n}"
                )
            f.write(b"\0" * (-n % alignment))
    return path
