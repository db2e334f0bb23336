"""Weight formats: layouts, round trips, byte identity with the references' encoders."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gq
from hypothesis import given
from hypothesis import strategies as st

from bitnet_ref.errors import FormatError
from bitnet_ref.formats import BF16, F16, F32, I2S_ARM, I2S_X86, TQ1_0, TQ2_0, absmean_quantize, get_format
from bitnet_ref.gguf.types import i2s_nbytes, tensor_nbytes


def ternary(rows, k, seed=0, p_zero=1 / 3):
    rng = np.random.default_rng(seed)
    v = rng.choice(np.array([-1, 0, 1], np.int8), size=(rows, k), p=[(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2])
    return v


# -- I2_S ---------------------------------------------------------------------------------------------
def test_i2s_x86_golden_layout():
    """Value j of a 128-value block sits in byte j % 32 at shift 6 - 2 * (j // 32); codes are w + 1."""
    v = np.zeros((1, 128), np.int8)
    v[0, 0] = 1  # byte 0, bits 7-6 -> code 2
    v[0, 32] = -1  # byte 0, bits 5-4 -> code 0
    v[0, 127] = 1  # byte 31, bits 1-0 -> code 2
    data = I2S_X86.pack(v, 0.5)
    assert data.nbytes == 128 // 4 + 32
    zero = 0b01010101  # four code-1 (zero) values
    assert data[0] == (2 << 6) | (0 << 4) | (1 << 2) | 1
    assert data[31] == (zero & ~0b11) | 2
    assert (data[1:31] == zero).all()
    assert data[32:36].view(np.float32)[0] == np.float32(0.5)
    assert (data[36:] == 0).all()


def test_i2s_arm_uses_64_value_blocks():
    v = np.zeros((1, 64), np.int8)
    v[0, 16] = 1  # ARM: byte 0, bits 5-4
    assert I2S_ARM.pack(v, 1.0)[0] == (1 << 6) | (2 << 4) | (1 << 2) | 1
    # the same bytes read as x86 would need 128 values: the flavours disagree on layout
    with pytest.raises(FormatError, match="multiple of 128"):
        I2S_X86.pack(v, 1.0)


@given(rows=st.integers(1, 4), blocks=st.integers(1, 3), seed=st.integers(0, 2**31),
       scale=st.floats(0.0001220703125, 8.0, width=32), arm=st.booleans())
def test_i2s_round_trip(rows, blocks, seed, scale, arm):
    fmt = I2S_ARM if arm else I2S_X86
    v = ternary(rows, blocks * fmt.block, seed)
    data = fmt.pack(v, scale)
    assert data.nbytes == fmt.nbytes(v.shape) == i2s_nbytes(v.size) == tensor_nbytes(36, v.shape[::-1])
    t = fmt.unpack(data, v.shape)
    np.testing.assert_array_equal(t.values, v)
    assert t.scale == np.float32(scale)
    np.testing.assert_array_equal(fmt.decode(data, v.shape), v.astype(np.float32) * np.float32(scale))


def test_i2s_encode_follows_quantize_i2s_semantics():
    """Any |w| >= 1e-6 becomes +-1 and the scale is max|w| (input should already be ternary x scale)."""
    w = np.zeros((1, 128), np.float32)
    w[0, :3] = [0.25, -0.25, 5e-7]
    t = I2S_X86.unpack(I2S_X86.encode(w), w.shape)
    assert t.values[0, :3].tolist() == [1, -1, 0] and t.scale == np.float32(0.25)


def test_i2s_code_3_reads_as_zero():
    data = I2S_X86.pack(np.zeros((1, 128), np.int8), 1.0)
    data[0] = 0b11111111
    assert (I2S_X86.unpack(data, (1, 128)).values == 0).all()


@pytest.mark.parametrize("shape", [(1, 100), (2, 130), (128,)])
def test_i2s_rejects_shapes_it_cannot_hold(shape):
    with pytest.raises(FormatError, match="multiple of 128"):
        I2S_X86.nbytes(shape)


def test_non_ternary_values_refused_with_position():
    v = np.zeros((2, 128), np.int8)
    v[1, 5] = 2
    with pytest.raises(FormatError, match=r"value 2 at \(1, 5\)"):
        I2S_X86.pack(v, 1.0)


def test_unpack_checks_the_byte_count():
    with pytest.raises(FormatError, match="needs 64"):
        I2S_X86.unpack(np.zeros(10, np.uint8), (1, 128))


# -- TQ1_0 / TQ2_0 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,qtype", [(TQ1_0, GGMLQuantizationType.TQ1_0), (TQ2_0, GGMLQuantizationType.TQ2_0)])
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 3), blocks=st.integers(1, 2))
def test_tq_pack_is_gguf_quants_and_round_trips(fmt, qtype, seed, rows, blocks):
    v = ternary(rows, blocks * 256, seed)
    scale = float(np.float16(0.0375))
    data = fmt.pack(v, scale)
    expected = gq.quantize(v.astype(np.float32) * np.float32(scale), qtype).reshape(-1)
    np.testing.assert_array_equal(data, expected)
    assert data.nbytes == fmt.nbytes(v.shape) == tensor_nbytes(fmt.type_id, v.shape[::-1])
    t = fmt.unpack(data, v.shape)
    np.testing.assert_array_equal(t.values, v)
    assert t.scale.shape == (rows, blocks) and (t.scale == np.float32(scale)).all()
    np.testing.assert_array_equal(fmt.decode(data, v.shape), t.dequantize())


def test_tq_all_zero_block_has_zero_scale():
    v = np.zeros((1, 256), np.int8)
    t = TQ2_0.unpack(TQ2_0.pack(v, 1.0), v.shape)
    assert (t.values == 0).all() and t.scale[0, 0] == 0


def test_tq_rejects_rows_not_multiple_of_256():
    with pytest.raises(FormatError, match="multiple of 256"):
        TQ1_0.nbytes((4, 128))


# -- floats and absmean --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,tol", [(F32, 0), (F16, 1e-3), (BF16, 1e-2)])
def test_float_formats_round_trip(fmt, tol):
    w = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    data = fmt.encode(w)
    assert data.nbytes == fmt.nbytes(w.shape)
    np.testing.assert_allclose(fmt.decode(data, w.shape), w, rtol=tol, atol=tol)


def test_absmean_quantization():
    w = np.array([[0.1, -0.5, 0.02, 0.9]], np.float32)
    values, scale = absmean_quantize(w)
    mean = np.float32(np.mean(np.abs(w)))
    assert scale == pytest.approx(float(mean))
    assert values.tolist() == [[0, -1, 0, 1]]
    values, scale = absmean_quantize(np.zeros((1, 4), np.float32))
    assert (values == 0).all() and scale == pytest.approx(1e-5)


def test_registry_by_name_and_type_id():
    assert get_format("TQ2_0") is TQ2_0 and get_format(36) is I2S_X86 and get_format("i2_s_arm") is I2S_ARM
    with pytest.raises(FormatError, match="unknown weight format"):
        get_format("q4_0")
    with pytest.raises(FormatError, match="type id 2"):
        get_format(2)


def test_i2s_flavour_resolution(monkeypatch):
    from bitnet_ref.formats import i2s_flavour

    monkeypatch.delenv("BITNET_I2S_FLAVOUR", raising=False)
    assert i2s_flavour() is I2S_X86 and i2s_flavour(64) is I2S_ARM and i2s_flavour(128) is I2S_X86
    monkeypatch.setenv("BITNET_I2S_FLAVOUR", "arm")
    assert i2s_flavour() is I2S_ARM and i2s_flavour(128) is I2S_X86  # the file's key wins
    monkeypatch.setenv("BITNET_I2S_FLAVOUR", "riscv")
    with pytest.raises(FormatError, match="x86 or arm"):
        i2s_flavour()
    with pytest.raises(FormatError, match="128 .x86. or 64"):
        i2s_flavour(32)
