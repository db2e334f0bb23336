"""Native kernels (bitnet_ref.kernels, native/): bit-identical to the numpy code on every ISA variant this CPU
runs, a numpy fallback that says so once, and a model forward that is the same bits either way.

The sanitizer build (`nox -s sanitize`) runs this file against an ASan/UBSan build named by
BITNET_KERNELS_PATH.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitnet_ref import kernels
from bitnet_ref.formats.activations import quantize_i8_s, quantize_q8_k_blocks
from bitnet_ref.formats.i2s import I2S_X86
from bitnet_ref.formats.tq import TQ1_0, TQ2_0
from bitnet_ref.model import (
    Model,
    _i2s_epilogue,
    _tq_epilogue,
    f16_gemm_ggml,
    i2s_dot_i8_s_ggml,
    tq_dot_q8_k_ggml,
    vec_dot_f16_ggml,
)
from bitnet_ref.synth import SynthSpec, synthesize

NATIVE = kernels.available()
NAMED = os.environ.get("BITNET_KERNELS_PATH")
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native kernels unavailable: {kernels.unavailable_reason()}")
ISAS = [isa for isa in ("portable", "avx2", "avx512-vnni") if NATIVE and kernels.set_isa(isa)]
kernels.set_isa(os.environ.get("BITNET_KERNELS_ISA", "auto")) if NATIVE else None
# huge activations overflow ggml's float32 epilogue (inf/nan) on both paths alike
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
EXAMPLES = int(os.environ.get("BITNET_KERNEL_EXAMPLES", "40"))


@pytest.fixture
def isa(request):
    assert kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa("auto")


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@st.composite
def activations(draw, k_multiple: int, max_blocks: int = 12, max_t: int = 5):
    """(T, K) float32 rows: Gaussian at a random magnitude, with all-zero rows, tiny (below the 1e-5 floor)
    rows, huge rows, and rows of one repeated extreme value (saturating q at -128/127)."""
    t = draw(st.integers(1, max_t))
    k = k_multiple * draw(st.integers(1, max_blocks))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(t):
        kind = draw(st.sampled_from(["gauss", "zero", "tiny", "huge", "const", "spiky"]))
        if kind == "gauss":
            r = rng.standard_normal(k) * 10.0 ** rng.uniform(-3, 3)
        elif kind == "zero":
            r = np.zeros(k)
        elif kind == "tiny":
            r = rng.standard_normal(k) * 1e-7
        elif kind == "huge":
            r = rng.standard_normal(k) * 1e30
        elif kind == "const":
            r = np.full(k, draw(st.sampled_from([-3.0e38, -1.0, 1.0, 3.0e38])))
        else:
            r = rng.standard_normal(k)
            r[rng.integers(0, k, 3)] = rng.choice([-1e4, 1e4], 3)
        rows.append(r)
    return np.asarray(rows, dtype=np.float32)


def ternary(rng, rows: int, k: int, p_zero: float = 0.3) -> np.ndarray:
    v = rng.choice(np.array([-1, 0, 1], np.int8), size=(rows, k), p=[(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2])
    return v.astype(np.int8)


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- availability and fallback -------------------------------------------------------------------------
def test_active_names_a_variant():
    assert kernels.active() in ("avx512-vnni", "avx2", "portable", "numpy")
    assert (kernels.active() == "numpy") == (not NATIVE)
    if NATIVE and NAMED:
        assert os.path.samefile(kernels._load().__file__, NAMED)


def test_fallback_says_so_once(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("BITNET_KERNELS_PATH", str(tmp_path / "missing.so"))
    kernels._reset_for_tests()
    try:
        with caplog.at_level(logging.WARNING, logger="bitnet_ref.kernels"):
            assert kernels.active() == "numpy"
            assert not kernels.available()
            q, s, sums = kernels.quantize_i8_s(np.ones((2, 128), np.float32))
        msgs = [r.getMessage() for r in caplog.records if "native kernels unavailable" in r.getMessage()]
        assert len(msgs) == 1 and msgs[0].endswith("; using numpy")
        assert q.dtype == np.int8 and (q == 127).all() and (sums == 127 * 128).all()
    finally:
        monkeypatch.undo()
        kernels._reset_for_tests()
    assert kernels.available() == NATIVE
    assert os.environ.get("BITNET_KERNELS_PATH") == NAMED


@pytest.mark.skipif(not os.environ.get("BITNET_KERNELS_PATH"),
                    reason="BITNET_KERNELS_PATH is not set: only `nox -s sanitize` names a separate kernel build")
def test_named_build_loads():
    """A build named by BITNET_KERNELS_PATH (the sanitizer session's) must load: never a silent numpy run."""
    assert NATIVE, kernels.unavailable_reason()


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv("BITNET_KERNELS", "0")
    kernels._reset_for_tests()
    try:
        assert kernels.active() == "numpy" and "BITNET_KERNELS=0" in kernels.unavailable_reason()
    finally:
        monkeypatch.undo()
        kernels._reset_for_tests()


@needs_native
def test_unknown_isa_is_refused():
    assert not kernels.set_isa("sse9")
    assert kernels.active() in ISAS


# -- activation quantizers -----------------------------------------------------------------------------
@needs_native
@SETTINGS
@given(x=activations(1, max_blocks=600))
def test_quantize_i8_s_bit_identical(x):
    q, s = quantize_i8_s(x)
    q2, s2, sums = kernels.quantize_i8_s(x)
    assert same_bits(q, q2) and same_bits(s, s2)
    assert same_bits(q.astype(np.int64).sum(axis=1).astype(np.int32), sums)


@needs_native
@SETTINGS
@given(x=activations(256, max_blocks=6))
def test_quantize_q8_k_bit_identical(x):
    q, d = quantize_q8_k_blocks(x)
    q2, d2 = kernels.quantize_q8_k_blocks(x)
    assert same_bits(q, q2) and same_bits(d, d2)


def test_quantize_q8_k_needs_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        kernels.quantize_q8_k_blocks(np.ones((1, 300), np.float32))


# -- I2_S ----------------------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("wrap16", [False, True])
@SETTINGS
@given(x=activations(128, max_blocks=40, max_t=11), rows=st.integers(1, 37), seed=st.integers(0, 2**32 - 1),
       p_zero=st.sampled_from([0.0, 0.3, 1.0]))
def test_i2s_product_bit_identical(isa, wrap16, x, rows, seed, p_zero):
    rng = np.random.default_rng(seed)
    k = x.shape[1]
    values = ternary(rng, rows, k, p_zero)
    w_scale = np.float32(rng.uniform(0.01, 3))
    packed = I2S_X86.pack(values, w_scale)
    q, s = quantize_i8_s(x)
    want = i2s_dot_i8_s_ggml(q, s, values, w_scale, int16_wrap=wrap16)
    q2, s2, act_sum = kernels.quantize_i8_s(x)
    raw = kernels.i2s_raw(q2, packed, rows, wrap16=wrap16)
    assert raw.dtype == np.int32 and raw.shape == (x.shape[0], rows)
    assert same_bits(_i2s_epilogue(raw, act_sum, s2, w_scale), want)


@needs_native
@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_i2s_extremes_exact_and_wrap(isa):
    """All codes 2 (w = +1) against saturated q over 33 blocks: the exact sum is 2*q*K; with bitnet.cpp's int16
    lanes (each takes 8 products a block, 2*2*127*4 = 2032, over 32 blocks: 65024) the sum wraps."""
    k = 128 * 33
    values = np.ones((3, k), np.int8)
    packed = I2S_X86.pack(values, 1.0)
    for val in (-128, 127):
        q = np.full((2, k), val, np.int8)
        raw = kernels.i2s_raw(q, packed, 3)
        assert (raw == 2 * val * k).all()
        codes = values.astype(np.int16) + 1
        from bitnet_ref.model import _i2s_raw_int16

        assert same_bits(kernels.i2s_raw(q, packed, 3, wrap16=True), _i2s_raw_int16(q, codes).astype(np.int32))
    q = np.full((1, k), 127, np.int8)
    wrapped = kernels.i2s_raw(q, packed, 3, wrap16=True)
    assert (wrapped != 2 * 127 * k).all()


@needs_native
def test_i2s_threads_do_not_change_results(monkeypatch):
    rng = np.random.default_rng(1)
    values = ternary(rng, 513, 1024)
    packed = I2S_X86.pack(values, 1.0)
    q = rng.integers(-128, 128, (3, 1024)).astype(np.int8)
    outs = []
    for n in ("1", "2", "7"):
        monkeypatch.setenv("BITNET_CPU_THREADS", n)
        outs.append(kernels.i2s_raw(q, packed, 513))
    assert same_bits(outs[0], outs[1]) and same_bits(outs[0], outs[2])


def test_i2s_rejects_partial_blocks():
    with pytest.raises(ValueError, match="multiple of the 128-value block"):
        kernels.i2s_raw(np.zeros((1, 200), np.int8), np.zeros(200, np.uint8), 4)
    with pytest.raises(ValueError, match="packed bytes"):
        kernels.i2s_raw(np.zeros((1, 128), np.int8), np.zeros(31, np.uint8), 1)


# -- TQ1_0 / TQ2_0 -------------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("fmt", [TQ1_0, TQ2_0], ids=lambda f: f.name)
@SETTINGS
@given(x=activations(256, max_blocks=6), rows=st.integers(1, 19), seed=st.integers(0, 2**32 - 1),
       p_zero=st.sampled_from([0.0, 0.3, 1.0]))
def test_tq_product_bit_identical(isa, fmt, x, rows, seed, p_zero):
    rng = np.random.default_rng(seed)
    k = x.shape[1]
    values = ternary(rng, rows, k, p_zero)
    block_scale = rng.uniform(0.01, 2, (rows, k // 256)).astype(np.float16).astype(np.float32)
    packed = fmt.encode((values.reshape(rows, -1, 256) * block_scale[:, :, None]).reshape(rows, k))
    tern = fmt.unpack(packed, (rows, k))
    q, dy = quantize_q8_k_blocks(x)
    want = tq_dot_q8_k_ggml(q, dy, tern.values, tern.scale)
    q2, dy2 = kernels.quantize_q8_k_blocks(x)
    lanes = kernels.tq_lanes(fmt.type_id, q2, packed, rows)
    assert lanes.dtype == np.int32 and lanes.shape == (x.shape[0], rows, k // 256, 8)
    assert same_bits(_tq_epilogue(lanes, dy2, fmt.block_scales(packed, (rows, k))), want)


def test_tq_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of the 256-value block"):
        kernels.tq_lanes(35, np.zeros((1, 384), np.int8), np.zeros(200, np.uint8), 1)
    with pytest.raises(ValueError, match="TQ1_0"):
        kernels.tq_lanes(36, np.zeros((1, 256), np.int8), np.zeros(66, np.uint8), 1)


# -- F16 rows x float32 activations (the F16 lm_head) --------------------------------------------------
def f16_rows(rng, rows: int, k: int) -> np.ndarray:
    """f16 weights at a random scale, with zeros, f16 subnormals and a few large values."""
    w = rng.standard_normal((rows, k)) * 10.0 ** rng.uniform(-6, 1)
    w[rng.random((rows, k)) < 0.05] = 0.0
    w[rng.random((rows, k)) < 0.02] = rng.choice([-6e-8, 3e-6, -1e3, 5e4], 1)
    return w.astype(np.float16)


@needs_native
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("mode", ["vec_dot", "gemm"])
@SETTINGS
@given(t=st.integers(1, 19), blocks=st.integers(1, 40), extra=st.integers(0, 15), rows=st.integers(1, 70),
       scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]), seed=st.integers(0, 2**32 - 1))
def test_f16_matmul_bit_identical(isa, mode, t, blocks, extra, rows, scale, seed):
    rng = np.random.default_rng(seed)
    k = 16 * blocks + (extra if mode == "vec_dot" else 0)  # vec_dot: any K (a double tail past k & ~63)
    x = (rng.standard_normal((t, k)) * scale).astype(np.float32)
    w = f16_rows(rng, rows, k)
    if mode == "vec_dot":
        x = x.astype(np.float16).astype(np.float32)  # ggml_vec_dot_f16 takes f16 activations
        want = vec_dot_f16_ggml(x.astype(np.float16)[:, None, :], w[None, :, :])
    else:
        want = f16_gemm_ggml(x, w.astype(np.float32))
    got = kernels.f16_matmul(x, w.reshape(-1).view(np.uint8), rows, mode)
    assert got.dtype == np.float32 and got.shape == (t, rows)
    assert same_bits(got, want)


@needs_native
def test_f16_matmul_unaligned_bytes_and_threads(monkeypatch):
    rng = np.random.default_rng(3)
    k, rows = 320, 1031
    w = f16_rows(rng, rows, k)
    buf = np.zeros(w.nbytes + 1, np.uint8)
    buf[1:] = w.reshape(-1).view(np.uint8)  # an odd address: rows read in place, unaligned
    x = rng.standard_normal((2, k)).astype(np.float16).astype(np.float32)
    outs = []
    for n in ("1", "2", "5"):
        monkeypatch.setenv("BITNET_CPU_THREADS", n)
        outs.append((kernels.f16_matmul(x[:1], buf[1:], rows, "vec_dot"), kernels.f16_matmul(x, buf[1:], rows, "gemm")))
    assert same_bits(outs[0][0], vec_dot_f16_ggml(x[:1].astype(np.float16)[:, None, :], w[None]))
    assert same_bits(outs[0][1], f16_gemm_ggml(x, w.astype(np.float32)))
    for a, b in outs[1:]:
        assert same_bits(a, outs[0][0]) and same_bits(b, outs[0][1])


def test_f16_matmul_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of the 16-value block"):
        kernels.f16_matmul(np.zeros((2, 40), np.float32), np.zeros(80, np.uint8), 1, "gemm")
    with pytest.raises(ValueError, match="packed bytes"):
        kernels.f16_matmul(np.zeros((1, 64), np.float32), np.zeros(127, np.uint8), 1, "vec_dot")
    with pytest.raises(ValueError, match="mode"):
        kernels.f16_matmul(np.zeros((1, 64), np.float32), np.zeros(128, np.uint8), 1, "f64")


@needs_native
@pytest.mark.parametrize("profile", ["bitnet-cpp", "llama-cpp", "exact"])
def test_model_lm_head_native_equals_numpy(profile, tmp_path, monkeypatch):
    """Whole-model logits with the F16 lm_head (prefill: tinyBLAS; decode: ggml_vec_dot_f16) native vs numpy;
    only bitnet-cpp's goes native (llama-cpp's and exact's float64 products stay numpy)."""
    fmt, arch = ("i2_s", "bitnet-b1.58") if profile == "bitnet-cpp" else ("tq2_0", "bitnet")
    path = synthesize(SynthSpec(arch=arch, format=fmt), tmp_path)
    ids = [5, 1, 2, 3, 200, 7]

    def run():
        with Model.load(path, profile) as m:
            h = np.ones((1, m.cfg.hidden), np.float32)
            uses_native = m._lm_head_native(h) is not None
            st_ = m.new_state()
            prefill = m.forward(ids[:4], st_)
            steps = [m.forward([i], st_) for i in ids[4:]]
        return uses_native, prefill, steps

    native, prefill, steps = run()
    assert native == (profile == "bitnet-cpp")
    monkeypatch.setenv("BITNET_KERNELS", "0")
    kernels._reset_for_tests()
    try:
        ref_native, ref_prefill, ref_steps = run()
    finally:
        monkeypatch.undo()
        kernels._reset_for_tests()
    assert not ref_native
    assert same_bits(prefill, ref_prefill) and all(same_bits(a, b) for a, b in zip(steps, ref_steps))


# -- the model: native and numpy paths give the same bits ----------------------------------------------
@needs_native
@pytest.mark.parametrize("fmt,profile", [("i2_s", "bitnet-cpp"), ("tq2_0", "llama-cpp"), ("tq1_0", "llama-cpp")])
def test_model_native_equals_numpy(fmt, profile, tmp_path, monkeypatch):
    arch = "bitnet-b1.58" if fmt == "i2_s" else "bitnet"
    path = synthesize(SynthSpec(arch=arch, format=fmt, zero_tokens=(5,)), tmp_path)
    ids = [5, 1, 2, 3, 200, 7, 9]
    with Model.load(path, profile) as m:
        lin = m.layers[0].proj["ffn_down"]
        assert lin.packed is not None and lin.values is None  # weights stay packed
        native = m.logits(ids)
        assert all(p.values is None for layer in m.layers for p in layer.proj.values())
        st_ = m.new_state()
        m.forward(ids[:4], st_)
        step = m.forward(ids[4:5], st_)
    monkeypatch.setenv("BITNET_KERNELS", "0")
    kernels._reset_for_tests()
    try:
        with Model.load(path, profile) as m:
            assert m.layers[0].proj["ffn_down"].values is not None
            ref = m.logits(ids)
            st_ = m.new_state()
            m.forward(ids[:4], st_)
            ref_step = m.forward(ids[4:5], st_)
    finally:
        monkeypatch.undo()
        kernels._reset_for_tests()
    assert same_bits(native, ref) and same_bits(step, ref_step)


@needs_native
def test_model_f16_kv_attention_native_equals_numpy(tmp_path, monkeypatch):
    """bitnet-cpp's f16 KV cache attention (K·Q and one-row V·softmax in C) past 64 cells: the vec_dot body
    and its double tail, decode steps after a prefill, bit for bit against numpy."""
    path = synthesize(SynthSpec(arch="bitnet-b1.58", format="i2_s", layers=1), tmp_path)
    ids = [int(i) for i in np.random.default_rng(3).integers(1, 200, 70)]

    def run():
        with Model.load(path, "bitnet-cpp") as m:
            st_ = m.new_state()
            out = [m.forward(ids[:66], st_)]
            out += [m.forward([i], st_) for i in ids[66:]]
            return out

    native = run()
    monkeypatch.setenv("BITNET_KERNELS", "0")
    kernels._reset_for_tests()
    try:
        ref = run()
    finally:
        monkeypatch.undo()
        kernels._reset_for_tests()
    assert all(same_bits(a, b) for a, b in zip(native, ref))


@needs_native
def test_model_int16_wrap_profile_native(tmp_path):
    from dataclasses import replace

    from bitnet_ref.numerics import get_profile

    prof = replace(get_profile("bitnet-cpp"), name="bitnet-cpp-wrap", i2s_int16_wrap=True)
    path = synthesize(SynthSpec(arch="bitnet-b1.58", format="i2_s", layers=1), tmp_path)
    with Model.load(path, prof) as m:
        native = m.logits([1, 2, 3])
        for layer in m.layers:  # the numpy path on the same model: unpack every projection
            for p in layer.proj.values():
                p.ternary_values()
        assert same_bits(m.logits([1, 2, 3]), native)


# -- CUDA: the GEMV compiles (no GPU here) -------------------------------------------------------------
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA compiler")
def test_cuda_gemv_compiles(tmp_path):
    src = Path(__file__).resolve().parents[1] / "native" / "i2s_gemv.cu"
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # not the sanitizer session's libasan
    r = subprocess.run(["nvcc", "-c", str(src), "-o", str(tmp_path / "i2s_gemv.o")], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
