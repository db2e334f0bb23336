"""GGUF container: our writer and reader against each other and against the `gguf` package."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType

from bitnet_ref.errors import FormatError, ModelError
from bitnet_ref.gguf import I2_S, TensorSpec, open_gguf, write_gguf


def _sample(tmp_path, alignment=32):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 8)).astype(np.float32)
    b = rng.standard_normal((5,)).astype(np.float16)
    i2 = rng.integers(0, 256, size=128 * 2 // 4 + 32, dtype=np.uint8)
    meta = [
        ("general.architecture", "bitnet"),
        ("u8", 7, GGUFValueType.UINT8),
        ("i16", -3, GGUFValueType.INT16),
        ("u32", 4_000_000_000),
        ("i64", -(2**40)),
        ("f32", 0.5),
        ("f64", 1e-300, GGUFValueType.FLOAT64),
        ("flag", True),
        ("name", "héllo ✓"),
        ("strs", ["a", "", "ü"]),
        ("ints", [1, -2, 3]),
        ("floats", np.array([0.25, 2.0], dtype=np.float32)),
    ]
    tensors = [TensorSpec("a", a.shape, 0, a), TensorSpec("b", b.shape, 1, b),
               TensorSpec("i2", (2, 128), I2_S, i2)]
    path = write_gguf(tmp_path / "m.gguf", meta, tensors, alignment=alignment)
    return path, a, b, i2


def test_round_trip_metadata_and_tensors(tmp_path):
    path, a, b, i2 = _sample(tmp_path)
    with open_gguf(path) as gf:
        assert gf.version == 3
        assert gf.get("u8") == 7 and gf.metadata["u8"].vtype == GGUFValueType.UINT8
        assert gf.get("i16") == -3
        assert gf.get("u32") == 4_000_000_000
        assert gf.get("i64") == -(2**40)
        assert gf.get("f32") == 0.5
        assert gf.get("f64") == 1e-300
        assert gf.get("flag") is True
        assert gf.get("name") == "héllo ✓"
        assert gf.get("strs") == ["a", "", "ü"]
        assert gf.get("ints").tolist() == [1, -2, 3]
        assert gf.get("floats").dtype == np.float32
        assert [t.name for t in gf.tensors] == ["a", "b", "i2"]
        assert gf.tensor("a").shape == (3, 8) and gf.tensor("a").ne == (8, 3)
        np.testing.assert_array_equal(gf.tensor_bytes("a").view(np.float32).reshape(3, 8), a)
        np.testing.assert_array_equal(gf.tensor_bytes("b").view(np.float16), b)
        np.testing.assert_array_equal(gf.tensor_bytes("i2"), i2)
        assert all(t.data_start % 32 == 0 for t in gf.tensors)


def test_tensor_data_is_a_view_of_the_mapping_not_a_copy(tmp_path):
    path, *_ = _sample(tmp_path)
    with open_gguf(path) as gf:
        view = gf.tensor_bytes("a")
        assert np.shares_memory(view, gf.data)
        assert not view.flags.owndata


def test_custom_alignment_is_written_and_honoured(tmp_path):
    path, a, *_ = _sample(tmp_path, alignment=64)
    with open_gguf(path) as gf:
        assert gf.alignment == 64 and gf.get("general.alignment") == 64
        assert all(t.data_start % 64 == 0 for t in gf.tensors)
        np.testing.assert_array_equal(gf.tensor_bytes("a").view(np.float32).reshape(3, 8), a)


def test_gguf_package_reads_our_file(tmp_path):
    """Interop: the reference Python reader parses what we write (without our bitnet.cpp-only types)."""
    a = np.arange(24, dtype=np.float32).reshape(3, 8)
    path = write_gguf(tmp_path / "m.gguf", [("general.architecture", "bitnet"), ("k", [1, 2])],
                      [TensorSpec("a", a.shape, 0, a)])
    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "bitnet"
    t = r.tensors[0]
    assert t.name == "a" and list(t.shape) == [8, 3]
    np.testing.assert_array_equal(np.asarray(t.data).reshape(3, 8), a)


def test_we_read_gguf_package_files_v2_and_v3(tmp_path):
    for version in (2, 3):
        path = tmp_path / f"v{version}.gguf"
        w = gguf.GGUFWriter(str(path), "bitnet")
        w.add_uint32("bitnet.block_count", 2)
        w.add_array("arr", ["x", "y"])
        data = np.linspace(0, 1, 256 * 2, dtype=np.float32).reshape(2, 256)
        w.add_tensor("t", data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        if version == 2:  # same layout; only the version field differs
            raw = bytearray(path.read_bytes())
            raw[4:8] = struct.pack("<I", 2)
            path.write_bytes(raw)
        with open_gguf(path) as gf:
            assert gf.version == version
            assert gf.get("bitnet.block_count") == 2 and gf.get("arr") == ["x", "y"]
            np.testing.assert_array_equal(gf.tensor_bytes("t").view(np.float32).reshape(2, 256), data)


def test_failed_write_leaves_nothing(tmp_path):
    def broken():
        yield np.zeros(4, np.uint8)
        raise RuntimeError("producer failed")

    target = tmp_path / "m.gguf"
    with pytest.raises(RuntimeError):
        write_gguf(target, {"general.architecture": "bitnet"}, [TensorSpec("a", (1, 8), 0, broken)])
    assert list(tmp_path.iterdir()) == []


def test_wrong_data_size_is_an_error_and_leaves_nothing(tmp_path):
    target = tmp_path / "m.gguf"
    with pytest.raises(FormatError, match="needs 32"):
        write_gguf(target, {}, [TensorSpec("a", (1, 8), 0, np.zeros(3, np.float32))])
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_duplicate_tensor_names_refused(tmp_path):
    a = np.zeros(8, np.float32)
    with pytest.raises(FormatError, match="twice"):
        write_gguf(tmp_path / "m.gguf", {}, [TensorSpec("a", (8,), 0, a), TensorSpec("a", (8,), 0, a)])


def test_missing_file_and_directory_give_findings(tmp_path):
    with pytest.raises(ModelError) as e:
        open_gguf(tmp_path / "nope.gguf")
    assert e.value.code == "file-not-found"
    with pytest.raises(ModelError) as e:
        open_gguf(tmp_path)
    assert e.value.code == "not-a-file"
