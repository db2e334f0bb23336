"""The stable finding codes no other test fired: each on a file damaged in exactly that way, with where.

Reader codes (the file cannot be parsed) come from hand-built headers; validation codes from a synthesized
model rewritten or patched in one place."""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
from gguf_edit import directory_field, patch, tiny_model

from bitnet_ref.errors import ERROR, INFO, WARNING, ModelError
from bitnet_ref.gguf import TensorSpec, open_gguf, write_gguf
from bitnet_ref.gguf.types import TL2
from bitnet_ref.gguf.validate import validate_file

STRING, U32, ARRAY, U8 = 8, 4, 9, 0


def s(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def header(n_tensors: int, kvs: list[bytes]) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs)


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key.encode()) + struct.pack("<I", vtype) + payload


NAME = kv("general.architecture", STRING, s(b"bitnet"))


@pytest.mark.parametrize("raw, code, where", [
    (header(0, [kv("general.name", STRING, s(b"\xff\xfebad"))]), "bad-string-encoding", 24),
    (header(0, [kv("tokens", ARRAY, struct.pack("<IQ", U8, 1 << 62))]), "bad-array-length", 24),
    (header(0, [kv("general.name", 99, b"\0" * 8)]), "unknown-value-type", 24),
    (header(1, [NAME]) + s(b"w") + struct.pack("<I", 0), "bad-dimensions", None),
    (header(1, [NAME]) + s(b"w") + struct.pack("<I", 9) + b"\0" * 80, "bad-dimensions", None),
    (header(2, [NAME]) + s(b"w") + struct.pack("<I", 1) + struct.pack("<QIQ", 32, 0, 0) + s(b"v"),
     "truncated-tensor-directory", None),
])
def test_reader_codes(tmp_path, raw, code, where):
    p = tmp_path / "bad.gguf"
    p.write_bytes(raw)
    with pytest.raises(ModelError) as e:
        open_gguf(p)
    f = e.value.finding
    assert e.value.code == code and f.hint and str(p) in str(e.value), str(e.value)
    if where is not None:
        assert f.offset is not None and f.offset >= where
    assert [x.code for x in validate_file(p)] == [code]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("codes"))


def _contents(path):
    with open_gguf(path) as gf:
        meta = [(k, mv.value, mv.vtype, mv.item_type) for k, mv in gf.metadata.items()]
        tensors = [TensorSpec(t.name, t.shape, t.type_id, gf.tensor_bytes(t).copy()) for t in gf.tensors]
    return meta, tensors


def found(path, code):
    hits = [f for f in validate_file(path) if f.code == code]
    assert hits, f"no {code} in {[str(f) for f in validate_file(path)]}"
    return hits


def test_duplicate_key(model, tmp_path):
    meta, tensors = _contents(model)
    p = write_gguf(tmp_path / "dup.gguf", meta + [("general.name", "again")], tensors)
    (f,) = found(p, "duplicate-key")
    assert f.severity == WARNING and f.key == "general.name" and f.offset is not None
    with open_gguf(p) as gf:
        assert gf.get("general.name") == "again"  # the last value is used, as the message says


def test_bad_alignment(model, tmp_path):
    meta, tensors = _contents(model)
    p = write_gguf(tmp_path / "align.gguf", meta, tensors, alignment=24)
    (f,) = found(p, "bad-alignment")
    assert f.severity == ERROR and f.key == "general.alignment" and "24" in f.message


def test_tensor_gap(model, tmp_path):
    """A norm written as F32 whose type id says F16: half the room is unexplained."""
    p = tmp_path / "gap.gguf"
    shutil.copy(model, p)
    patch(p, directory_field(p, "blk.0.attn_norm.weight", "type"), "<I", 1)
    f = next(x for x in found(p, "tensor-gap") if x.tensor == "blk.0.attn_norm.weight")
    assert f.severity == WARNING and f.offset is not None and "512 bytes" in f.message


def test_tl2_shape_without_kernels(model, tmp_path):
    """A projection whose type id says TL2, of a shape bitnet.cpp's code generator made no kernels for."""
    p = tmp_path / "tl2.gguf"
    shutil.copy(model, p)
    # tiny's ffn_gate (512 x 256); 256 x 256 has a tiling (the trained model's attn_q)
    patch(p, directory_field(p, "blk.0.ffn_gate.weight", "type"), "<I", TL2)
    (f,) = found(p, "tl-shape-without-kernels")
    assert f.severity == WARNING and f.tensor == "blk.0.ffn_gate.weight" and "512" in f.message


def test_unused_tensor(model, tmp_path):
    meta, tensors = _contents(model)
    extra = TensorSpec("extra.weight", (4, 8), 0, np.zeros((4, 8), np.float32))
    p = write_gguf(tmp_path / "extra.gguf", meta, tensors + [extra])
    (u,) = found(p, "unused-tensor")
    assert u.severity == INFO and u.tensor == "extra.weight" and "bitnet graph" in u.message
