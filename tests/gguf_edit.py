"""Test helpers: make small models and damage them in precise ways."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from bitnet_ref.gguf import TensorSpec, open_gguf, write_gguf
from bitnet_ref.synth import SynthSpec, synthesize


def tiny_model(dirpath: Path, fmt: str = "tq2_0", arch: str = "bitnet", layers: int = 1) -> Path:
    return synthesize(SynthSpec(preset="tiny", arch=arch, format=fmt, layers=layers), dirpath)


def rewrite(src: Path, dst: Path, *, drop_keys=(), set_keys=None, drop_tensors=(), tensor_data=None) -> Path:
    """Copy a GGUF file through our reader and writer, changing metadata or tensors on the way."""
    set_keys = set_keys or {}
    tensor_data = tensor_data or {}
    with open_gguf(src) as gf:
        meta = [(k, mv.value, mv.vtype, mv.item_type) for k, mv in gf.metadata.items()
                if k not in drop_keys and k not in set_keys]
        meta += [(k, v) for k, v in set_keys.items()]
        tensors = [
            TensorSpec(t.name, t.shape, t.type_id, tensor_data.get(t.name, gf.tensor_bytes(t).copy()))
            for t in gf.tensors if t.name not in drop_tensors
        ]
    return write_gguf(dst, meta, tensors)


def directory_field(path: Path, tensor: str, field: str) -> int:
    """Byte offset in the file of a tensor directory field: 'name', 'ne0', 'type' or 'offset'."""
    with open_gguf(path) as gf:
        t = gf.tensor(tensor)
        name_at = t.info_offset + 8
        dims_at = name_at + len(t.name.encode()) + 4
        type_at = dims_at + 8 * len(t.ne)
        return {"name": name_at, "ne0": dims_at, "type": type_at, "offset": type_at + 4}[field]


def patch(path: Path, at: int, fmt: str, value) -> None:
    raw = bytearray(path.read_bytes())
    if isinstance(value, bytes):
        raw[at : at + len(value)] = value
    else:
        struct.pack_into(fmt, raw, at, value)
    path.write_bytes(bytes(raw))


def nan_like(data: np.ndarray, dtype) -> np.ndarray:
    out = data.copy()
    out.view(dtype)[0] = np.nan
    return out
