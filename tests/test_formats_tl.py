"""TL1 and TL2 (bitnet.cpp lookup-table formats): round trips, sizes, hand-derived layouts, shape
rules, and byte identity with bitnet.cpp's own converter when BITNET_CPP_SRC names its source tree."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet_ref.errors import FormatError
from bitnet_ref.formats.tl1 import TL1_TILINGS, Tiling, TL1Format, load_kernel_config
from bitnet_ref.formats.tl2 import TL2_TILINGS, TL2Format
from bitnet_ref.gguf.types import TL1, TL2, tensor_nbytes

TL1_DEFAULT = TL1Format()
TL2_DEFAULT = TL2Format()
LLAMA3_SHAPES = {(14336, 4096), (4096, 14336), (1024, 4096), (4096, 4096)}


def ternary(rows, k, seed=0):
    return np.random.default_rng(seed).integers(-1, 2, size=(rows, k), dtype=np.int8)


def bitnet_nbytes(fmt: str, rows: int, k: int) -> int:
    """ggml_nbytes of bitnet.cpp's fork (ggml.c), written out again here for TL1/TL2."""
    if fmt == "tl1":
        return rows * k // 4 + 32
    n = (k - 256) * rows // 3 * 5 // 8 + 256 * rows // 2 * 4 // 8
    if n % 32:
        n = 32 - n % 32 + n
    return n + 32


def same_float32(a, b) -> bool:
    return np.float32(a).tobytes() == np.float32(b).tobytes()


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


# -- strategies for small shapes with valid tilings --------------------------------------------------
@st.composite
def tl1_case(draw):
    bm = draw(st.sampled_from([32, 64]))
    by = 256 // bm
    BM = bm * draw(st.integers(1, 2))
    BK = by * draw(st.integers(1, 3))
    shape = (BM * draw(st.integers(1, 2)), BK * draw(st.integers(1, 3)))
    return shape, Tiling(BM, BK, bm)


@st.composite
def tl2_case(draw):
    BM = 32 * draw(st.integers(1, 2))
    BK = draw(st.sampled_from([24, 48, 96, 192]))
    k2 = draw(st.sampled_from([x for x in (0, 32, 64, 96, 128, 160) if x < BK]))
    n3_min = -(-(256 - k2) // BK)  # K must reach 256
    n3 = draw(st.integers(n3_min, n3_min + 2))
    shape = (BM * draw(st.integers(1, 2)), n3 * BK + k2)
    return shape, Tiling(BM, BK, 32)


def check_round_trip(fmt, shape, seed, scale, decode=True):
    values = ternary(*shape, seed=seed)
    data = fmt.pack(values, scale)
    assert data.dtype == np.uint8 and data.ndim == 1
    assert data.size == fmt.nbytes(shape) == bitnet_nbytes(fmt.name, *shape)
    assert data.size == tensor_nbytes(fmt.type_id, (shape[1], shape[0]))
    back = fmt.unpack(data, shape)
    assert back.values.dtype == np.int8 and back.values.shape == shape
    np.testing.assert_array_equal(back.values, values)
    assert back.scale.dtype == np.float32 and back.scale.shape == ()
    assert same_float32(back.scale, scale)
    if decode:
        np.testing.assert_array_equal(fmt.decode(data, shape), values.astype(np.float32) * np.float32(scale))
    return data


@settings(max_examples=40, deadline=None)
@given(tl1_case(), st.integers(0, 2**32 - 1), finite32)
def test_tl1_round_trip_small(case, seed, scale):
    shape, tiling = case
    check_round_trip(TL1Format(tiling={shape: tiling}, presets=False), shape, seed, scale)


@settings(max_examples=40, deadline=None)
@given(tl2_case(), st.integers(0, 2**32 - 1), finite32)
def test_tl2_round_trip_small(case, seed, scale):
    shape, tiling = case
    check_round_trip(TL2Format(tiling={shape: tiling}, presets=False), shape, seed, scale)


@pytest.mark.parametrize("fmt, shape", [
    pytest.param(f, s, id=f"{f.name}-{s[0]}x{s[1]}",
                 marks=[pytest.mark.slow] if s in LLAMA3_SHAPES else [])
    for f in (TL1_DEFAULT, TL2_DEFAULT) for s in f.presets
])
def test_round_trip_shipped_shapes(fmt, shape):
    """The shapes bitnet.cpp generates kernels for (Llama3-8B's are big: slow)."""
    check_round_trip(fmt, shape, seed=sum(shape), scale=np.float32(0.0371), decode=False)


def test_shipped_tiling_tables():
    """The tables hold every model shape set of setup_env.py and the trained model's (models/), each with a
    tiling that fits."""
    trained = {(256, 256), (128, 256), (768, 256), (256, 768)}
    for fmt, table in ((TL1_DEFAULT, TL1_TILINGS), (TL2_DEFAULT, TL2_TILINGS)):
        assert set(table) == {(1536, 4096), (1536, 1536), (4096, 1536), (3200, 8640), (3200, 3200),
                              (8640, 3200)} | LLAMA3_SHAPES | trained
        for shape in table:
            fmt.check_shape(shape)


# -- encode / decode ---------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(tl1_case(), st.integers(0, 2**32 - 1), st.floats(0.25, 1024.0, width=32))
def test_tl1_encode_equals_pack(case, seed, scale):
    shape, tiling = case
    fmt = TL1Format(tiling={shape: tiling})
    values = ternary(*shape, seed=seed)
    values[0, 0] = 1  # max|w| is the scale
    w = values.astype(np.float32) * np.float32(scale)
    np.testing.assert_array_equal(fmt.encode(w), fmt.pack(values, scale))
    np.testing.assert_array_equal(fmt.decode(fmt.encode(w), shape), w)


def test_tl2_encode_equals_pack():
    shape = (64, 288)
    fmt = TL2Format(tiling={shape: (32, 24, 32)})
    values = ternary(*shape, seed=3)
    values[5, 7] = -1
    w = values.astype(np.float32) * np.float32(0.125)
    np.testing.assert_array_equal(fmt.encode(w), fmt.pack(values, 0.125))
    np.testing.assert_array_equal(fmt.decode(fmt.encode(w), shape), w)


def test_encode_all_zero():
    fmt = TL1Format(tiling={(32, 8): (32, 8, 32)})
    data = fmt.encode(np.zeros((32, 8), np.float32))
    t = fmt.unpack(data, (32, 8))
    assert (t.values == 0).all() and same_float32(t.scale, 0.0)


@pytest.mark.parametrize("fmt", [TL1Format(tiling={(32, 256): (32, 8, 32)}),
                                 TL2Format(tiling={(32, 256): (32, 96, 32)})], ids=["tl1", "tl2"])
def test_non_ternary_rejected(fmt):
    values = ternary(32, 256)
    values[3, 5] = 2
    with pytest.raises(FormatError, match="not ternary"):
        fmt.pack(values, 1.0)
    w = ternary(32, 256).astype(np.float32) * 0.5
    w[4, 6] = 0.3  # neither 0 nor +-max|w|
    with pytest.raises(FormatError, match=r"not ternary x one scale.*\(4, 6\)"):
        fmt.encode(w)
    w[4, 6] = np.nan
    with pytest.raises(FormatError, match="not finite"):
        fmt.encode(w)
    with pytest.raises(FormatError, match="finite"):
        fmt.pack(ternary(32, 256), float("inf"))


# -- shape rules -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [TL1_DEFAULT, TL2_DEFAULT], ids=["tl1", "tl2"])
@pytest.mark.parametrize("shape", [(2560, 2560), (6912, 2560), (1536, 1537), (3, 4096)])
def test_unsupported_shapes_rejected(fmt, shape):
    """Shapes without generated kernels (e.g. BitNet-b1.58-2B-4T's) are refused, naming the shape."""
    with pytest.raises(FormatError, match=rf"no tiling for shape \({shape[0]}, {shape[1]}\).*tiling="):
        fmt.check_shape(shape)
    with pytest.raises(FormatError, match=rf"\({shape[0]}, {shape[1]}\)"):
        fmt.pack(np.zeros(shape, np.int8), 1.0)


@pytest.mark.parametrize("fmt, shape, tiling, why", [
    (TL1Format, (32, 12), (32, 12, 32), "multiple of 256/bm=8"),
    (TL1Format, (32, 16), (32, 16, 16), "bm must be 32 or 64"),
    (TL1Format, (48, 16), (32, 16, 32), "multiple of BM=32"),
    (TL2Format, (32, 288), (32, 96, 64), "bm must be 32"),
    (TL2Format, (32, 256 + 16), (32, 96, 32), "multiple of 32"),
    (TL2Format, (32, 240), (32, 24, 32), "at least 256"),
    (TL2Format, (32, 288), (32, 36, 32), "multiple of 24"),
    (TL2Format, (32, 768), (32, 480, 32), "must not exceed 256"),
], ids=lambda x: x.name if isinstance(x, type) else None)
def test_tilings_that_do_not_fit(fmt, shape, tiling, why):
    f = fmt(tiling={shape: tiling})
    with pytest.raises(FormatError, match=rf"\({shape[0]}, {shape[1]}\)") as e:
        f.check_shape(shape)
    assert why in str(e.value)


def test_wrong_byte_count_rejected():
    fmt = TL1Format(tiling={(32, 8): (32, 8, 32)})
    with pytest.raises(FormatError, match="bytes"):
        fmt.unpack(np.zeros(95, np.uint8), (32, 8))


def test_invalid_codes_rejected():
    fmt = TL1Format(tiling={(32, 8): (32, 8, 32)})
    data = fmt.pack(np.zeros((32, 8), np.int8), 1.0)
    data[5] = 0x94  # pair code 9
    with pytest.raises(FormatError, match="pair code 9"):
        fmt.unpack(data, (32, 8))
    f2 = TL2Format(tiling={(32, 256): (32, 96, 32)})
    data = f2.pack(np.zeros((32, 256), np.int8), 1.0)
    data[0] = 0xE0  # magnitude 14
    with pytest.raises(FormatError, match="magnitude 14"):
        f2.unpack(data, (32, 256))


def test_tiling_forms_and_kernel_config(tmp_path):
    ini = "[Kernels_0]\nm = 64\nk = 16\nbm = 64\nbk = 16\nbmm = 32\n"
    p = tmp_path / "kernel_config.ini"
    p.write_text(ini)
    assert load_kernel_config(p) == {(64, 16): Tiling(64, 16, 32)} == load_kernel_config(ini)
    f = TL1Format.from_kernel_config(p)
    assert set(f.tilings) == {(64, 16)}
    a = TL1Format(tiling={(64, 16): {"BM": 64, "BK": 16, "bm": 32}})
    b = TL1Format(tiling={(64, 16): (64, 16, 32)})
    v = ternary(64, 16)
    np.testing.assert_array_equal(a.pack(v, 1.0), b.pack(v, 1.0))
    np.testing.assert_array_equal(a.pack(v, 1.0), f.pack(v, 1.0))


# -- golden layouts, derived by hand from the converter's description ----------------------------------
def test_tl1_golden_layout():
    """Tiling BM=32, BK=8, bm=32 (so 8 columns = 4 pairs per block), shape 32x8. Byte
    h*32 + p*16 + i holds pairs 2p (high nibble) and 2p+1 of row 16h + i; pair code 3*w0 + w1 + 4."""
    fmt = TL1Format(tiling={(32, 8): (32, 8, 32)})
    v = np.zeros((32, 8), np.int8)
    v[0, 0] = 1  # row 0, pair 0 = (1, 0) -> 7: byte 0 high
    v[0, 3] = -1  # row 0, pair 1 = (0, -1) -> 3: byte 0 low
    v[1, 4:6] = 1  # row 1, pair 2 = (1, 1) -> 8: byte 16 + 1 high
    v[17, 6:8] = -1  # row 17 (h=1, i=1), pair 3 = (-1, -1) -> 0: byte 32 + 16 + 1 low
    data = fmt.pack(v, 0.5)
    want = np.full(64 + 32, 0x44, np.uint8)  # all-zero pairs are code 4
    want[0], want[17], want[49] = 0x73, 0x84, 0x40
    want[64:] = 0
    want[64:68] = [0x00, 0x00, 0x00, 0x3F]  # float32 0.5, little-endian
    np.testing.assert_array_equal(data, want)


def test_tl1_golden_tile_order():
    """With two row tiles and two k-blocks (BM=32, BK=8, shape 64x16) the 64-byte blocks run
    (tile 0, kblock 0), (tile 0, kblock 1), (tile 1, kblock 0), (tile 1, kblock 1)."""
    fmt = TL1Format(tiling={(64, 16): (32, 8, 32)})
    v = np.zeros((64, 16), np.int8)
    v[0, 8] = 1  # tile 0, k-block 1, pair 0 -> byte 64 high nibble 7
    v[32, 1] = -1  # tile 1, k-block 0, row 0, pair 0 = (0, -1) -> code 3: byte 128 high
    data = fmt.pack(v, 1.0)
    assert data[64] == 0x74 and data[128] == 0x34
    assert np.count_nonzero(data[:256] != 0x44) == 2


def test_tl2_golden_layout():
    """Tiling BM=32, BK=96, bm=32, shape 32x256: K3 = 192 (64 triples, two k-blocks of 32 triples),
    K2 = 64. Magnitudes: byte b*512 + f*32 + slot*8 + s, with triple 32b + 2f + g (g=0 high nibble)
    of row 8*quarter + s, quarters stored in slots 0, 2, 1, 3. Signs from byte 1024: per (k-block b,
    8-triple block F) 16 little-endian words, word u bit 15-j = triple 8F + j//2 of row u + 16*(j%2).
    Pairs from byte 1280: byte 1280 + b*256 + f*32 + slot*8 + s for pair 16b + 2f + g."""
    fmt = TL2Format(tiling={(32, 256): (32, 96, 32)})
    v = np.zeros((32, 256), np.int8)
    v[0, 0:3] = [1, 0, -1]  # t = 8: byte 0 high nibble
    v[9, 3:6] = [-1, -1, -1]  # row 9 (quarter 1 -> slot 2), triple 1: t = -13: byte 17 low = 13
    v[19, 0:3] = [0, 0, -1]  # row 19 (quarter 2 -> slot 1, s=3), triple 0: t = -1: byte 11 high = 1
    v[20, 102:105] = [0, 1, 1]  # row 20 (slot 1, s=4), triple 34 (b=1, f=1, g=0): t = 4: byte 556 high
    v[0, 192:194] = [1, 1]  # two part pair 0 of row 0: code 8, byte 1280 high
    v[31, 254:256] = [-1, 0]  # row 31 (slot 3, s=7), pair 31 (b=1, f=7, g=1): code 1, byte 1791 low
    data = fmt.pack(v, 0.25)
    want = np.zeros(2080, np.uint8)
    want[1280:1792] = 0x44
    want[0], want[17], want[11], want[556] = 0x80, 0x0D, 0x10, 0x40
    want[1042:1044] = [0x00, 0x20]  # word 9 bit 13 (row 9, triple 1: j = 2)
    want[1030:1032] = [0x00, 0x40]  # word 3 bit 14 (row 19 = 3 + 16, triple 0: j = 1)
    want[1280], want[1791] = 0x84, 0x41
    want[2048:2052] = [0x00, 0x00, 0x80, 0x3E]  # float32 0.25 at the rounded size rule (2048)
    np.testing.assert_array_equal(data, want)


# -- byte identity with bitnet.cpp's own converter ----------------------------------------------------
# Runs, in a subprocess, the TL functions of the checkout's utils/convert-hf-to-gguf-bitnet.py (their
# code, loaded from their file) and, when the checkout carries the llama.cpp fork's gguf-py, writes the
# result through that fork's GGUF writer (which places the `<name>_scale` tensor after the weights).
REFERENCE_SCRIPT = textwrap.dedent(r'''
    import ast, json, os, sys, types
    import numpy as np

    src, fmt, weights, tiling, out = sys.argv[1:6]
    m, k, BM, BK, bm = json.loads(tiling)
    os.makedirs("include", exist_ok=True)  # their code reads include/kernel_config.ini from the cwd
    with open("include/kernel_config.ini", "w") as f:
        f.write(f"[Kernels_0]\nm = {m}\nk = {k}\nbm = {BM}\nbk = {BK}\nbmm = {bm}\n")
    path = os.path.join(src, "utils", "convert-hf-to-gguf-bitnet.py")
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    wanted = {"process_tl1", "preprocess_weights_tl1", "preprocess_two_weights_tl2",
              "preprocess_three_weights_tl2", "preprocess_weights_tl2", "transform_to_tl1", "transform_to_tl2"}
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    missing = wanted - {n.name for n in funcs}
    if missing:
        sys.exit(f"not in {path}: {sorted(missing)}")
    ns = {"np": np}
    code = compile(ast.Module(body=funcs, type_ignores=[]), path, "exec",
                   flags=__import__("__future__").annotations.compiler_flag, dont_inherit=True)
    exec(code, ns)
    w = np.load(weights)
    data, scale = ns["transform_to_" + fmt](w)
    np.save(out + ".data.npy", data)
    np.save(out + ".scale.npy", np.asarray(scale))
    gguf_py = os.path.join(src, "3rdparty", "llama.cpp", "gguf-py")
    if os.path.isdir(gguf_py):
        sys.path.insert(0, gguf_py)
        # their gguf package imports sentencepiece for vocabularies, which this does not use
        sys.modules.setdefault("sentencepiece", types.SimpleNamespace(SentencePieceProcessor=None))
        import gguf
        assert gguf.__file__.startswith(gguf_py), gguf.__file__
        qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
        writer = gguf.GGUFWriter(out + ".gguf", "bitnet")
        # as the converter's write_tensors does
        writer.add_tensor("blk.0.ffn_up.weight", data, raw_shape=w.shape, raw_dtype=qtype)
        writer.add_tensor("blk.0.ffn_up.weight_scale", scale, raw_dtype=gguf.GGMLQuantizationType.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
''')


def read_gguf_tensor(path: Path) -> tuple[str, tuple[int, ...], int, bytes]:
    """The first tensor of a small GGUF: (name, ne, type id, data from its offset to the end)."""
    buf = path.read_bytes()
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    assert magic == b"GGUF" and version == 3
    pos = 24

    def string():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        return buf[pos - n : pos].decode()

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    alignment = 32
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if vtype == 8:
            string()
        elif vtype in scalar:
            (val,) = struct.unpack_from("<" + scalar[vtype], buf, pos)
            pos += struct.calcsize(scalar[vtype])
            if key == "general.alignment":
                alignment = val
        else:
            raise AssertionError(f"unexpected metadata type {vtype} for {key}")
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        ne = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        pos += 4 + 8 * n_dims
        ttype, offset = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        infos.append((name, tuple(ne), ttype, offset))
    start = -(-pos // alignment) * alignment
    name, ne, ttype, offset = infos[0]
    return name, ne, ttype, buf[start + offset :]


REFERENCE_CASES = [
    ("tl1", (32, 8), (32, 8, 32)),
    ("tl1", (128, 64), (64, 16, 64)),
    ("tl1", (1536, 1536), None),
    ("tl1", (3200, 3200), None),
    ("tl1", (1536, 4096), None),
    ("tl2", (32, 256), (32, 96, 32)),
    ("tl2", (64, 288), (32, 24, 32)),
    ("tl2", (64, 448), (64, 192, 32)),
    ("tl2", (1536, 4096), None),
    ("tl2", (1536, 1536), None),
    ("tl2", (3200, 3200), None),
]


@pytest.mark.parametrize("name, shape, tiling", REFERENCE_CASES,
                         ids=[f"{n}-{s[0]}x{s[1]}" for n, s, _ in REFERENCE_CASES])
def test_bytes_match_bitnet_cpp_converter(name, shape, tiling, tmp_path):
    src = os.environ.get("BITNET_CPP_SRC")
    if not src:
        pytest.skip("set BITNET_CPP_SRC to a bitnet.cpp source checkout to compare with its converter")
    conv = Path(src) / "utils" / "convert-hf-to-gguf-bitnet.py"
    if not conv.is_file():
        pytest.skip(f"BITNET_CPP_SRC={src} has no utils/convert-hf-to-gguf-bitnet.py")
    cls = TL1Format if name == "tl1" else TL2Format
    fmt = cls(tiling={shape: tiling}) if tiling else cls()
    t = fmt.tiling_for(shape)
    values = ternary(*shape, seed=7)
    scale = np.float32(0.0371)
    weights = values.astype(np.float32) * scale
    np.save(tmp_path / "w.npy", weights)
    script = tmp_path / "ref.py"
    script.write_text(REFERENCE_SCRIPT)
    out = tmp_path / "ref"
    cfg = f"[{shape[0]}, {shape[1]}, {t.BM}, {t.BK}, {t.bm}]"
    r = subprocess.run([sys.executable, str(script), src, name, str(tmp_path / "w.npy"), cfg, str(out)],
                       check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    ours = fmt.encode(weights)
    ref_data = np.load(str(out) + ".data.npy").reshape(-1)  # TL1's is (M*K/64, 16); the writer flattens
    ref_scale = np.load(str(out) + ".scale.npy")
    assert ref_data.dtype == np.uint8
    assert same_float32(ref_scale, scale)
    # the converter's array is the packed weights (TL2: zero-padded to the unrounded size rule)
    np.testing.assert_array_equal(ours[: ref_data.size], ref_data)
    assert not ours[ref_data.size : fmt.nbytes(shape) - 32].any()

    gguf_file = Path(str(out) + ".gguf")
    assert gguf_file.exists() == (Path(src) / "3rdparty" / "llama.cpp" / "gguf-py").is_dir()
    if gguf_file.exists():
        # what a bitnet.cpp build reads: ggml_nbytes bytes from the tensor's offset, scale included
        tname, ne, ttype, tail = read_gguf_tensor(gguf_file)
        assert (tname, ne, ttype) == ("blk.0.ffn_up.weight", (shape[1], shape[0]), fmt.type_id)
        assert len(tail) == fmt.nbytes(shape)  # weights, scale, padding: nothing else follows
        np.testing.assert_array_equal(np.frombuffer(tail, np.uint8), ours)


def test_type_ids():
    assert (TL1_DEFAULT.name, TL1_DEFAULT.type_id, TL1_DEFAULT.ternary) == ("tl1", TL1, True)
    assert (TL2_DEFAULT.name, TL2_DEFAULT.type_id, TL2_DEFAULT.ternary) == ("tl2", TL2, True)
