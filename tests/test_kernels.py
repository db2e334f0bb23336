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
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitnet_ref import ggml_ref, kernels
from bitnet_ref import model as model_module
from bitnet_ref.formats.activations import quantize_i8_s, quantize_q8_k_blocks
from bitnet_ref.formats.i2s import I2S_X86
from bitnet_ref.formats.tq import TQ1_0, TQ2_0
from bitnet_ref.ggml_ref import (
    _i2s_epilogue,
    _i2s_raw_int16,
    _tq_epilogue,
    f16_gemm_ggml,
    i2s_dot_i8_s_ggml,
    tq_dot_q8_k_ggml,
    vec_dot_f16_ggml,
)
from bitnet_ref.model import Model
from bitnet_ref.numerics import get_profile
from bitnet_ref.synth import SynthSpec, synthesize

NATIVE = kernels.available()
NAMED = os.environ.get("BITNET_KERNELS_PATH")
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native kernels unavailable: {kernels.unavailable_reason()}")
ISAS = [isa for isa in ("portable", "avx2", "avx512-vnni", "neon") if NATIVE and kernels.set_isa(isa)]
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
def test_active_is_the_best_variant_this_cpu_runs():
    if not NATIVE:
        assert kernels.active() == "numpy"
        return
    assert ISAS and "portable" in ISAS  # the portable C code runs everywhere
    if not os.environ.get("BITNET_KERNELS_ISA"):  # auto: the widest this CPU runs (neon on AArch64)
        best = next(i for i in ("avx512-vnni", "avx2", "neon", "portable") if i in ISAS)
        assert kernels.active() == best, (kernels.active(), ISAS)
    if NAMED:
        assert os.path.samefile(kernels.library_path(), NAMED)


def _c_compiler() -> str | None:
    import sysconfig

    return shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]) or shutil.which("cc")


@pytest.mark.skipif(os.environ.get("BITNET_KERNELS") == "0", reason="BITNET_KERNELS=0: numpy computes, by request")
def test_the_extension_is_active_where_a_compiler_exists():
    """setup.py lets a machine without a compiler install (the build only warns), so a failed build would
    leave every kernel test skipped and CI green on numpy: where a C compiler exists, the extension must be
    the one computing."""
    cc = _c_compiler()
    if cc is None:
        pytest.skip("no C compiler here: the native extension cannot be built (numpy computes)")
    assert NATIVE, (f"the native kernels are not active although {cc} exists: {kernels.unavailable_reason()}. "
                    "Rebuild them (pip install -e ., or nox -s tests --install-only) and read the build warning; "
                    "BITNET_KERNELS=0 runs numpy on purpose")


def test_a_missing_extension_fails_the_suite_unless_numpy_is_asked_for(tmp_path):
    """The check above, in a run where the extension cannot load (as after a failed build)."""
    if _c_compiler() is None:
        pytest.skip("no C compiler here: the check skips by design")
    test = f"{Path(__file__).name}::test_the_extension_is_active_where_a_compiler_exists"

    def run(**env):
        full = {k: v for k, v in os.environ.items() if k not in ("BITNET_KERNELS", "BITNET_KERNELS_PATH")}
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", test],
                              cwd=Path(__file__).parent, env={**full, **env}, capture_output=True, text=True,
                              timeout=300)

    r = run(BITNET_KERNELS_PATH=str(tmp_path / "not-built.so"))
    assert r.returncode == 1 and "the native kernels are not active" in r.stdout, r.stdout[-2000:]
    r = run(BITNET_KERNELS="0")
    assert r.returncode == 0 and "BITNET_KERNELS=0" in r.stdout, r.stdout[-2000:]


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


needs_vnni = pytest.mark.skipif("avx512-vnni" not in ISAS, reason="the CPU has no AVX-512 VNNI")


def _i2s_raw_as(isa: str, q: np.ndarray, packed: np.ndarray, rows: int) -> np.ndarray:
    assert kernels.set_isa(isa)
    try:
        return kernels.i2s_raw(q, packed, rows)
    finally:
        kernels.set_isa("auto")


@needs_vnni
@SETTINGS
@given(t=st.one_of(st.integers(1, 40), st.just(512)), rows=st.sampled_from([1, 16, 31, 32, 33, 70]),
       k=st.sampled_from([128, 384, 2560]), threads=st.sampled_from(["1", "2", "3"]),
       q_kind=st.sampled_from(["random", "min", "max"]), zero_rows=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_i2s_gemm_matches_portable(monkeypatch, t, rows, k, threads, q_kind, zero_rows, seed):
    """The many-token VNNI path (32-row panels, 12-token tiles; rows and tokens past a multiple, 1-3 threads)
    against the portable sum; raw bytes, so code 3 occurs too."""
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, rows * k // 4, dtype=np.uint8)
    if zero_rows:  # all-zero codes in a few rows
        packed.reshape(rows, k // 4)[rng.integers(0, rows, max(1, rows // 4))] = 0
    if q_kind == "random":
        q = rng.integers(-128, 128, (t, k)).astype(np.int8)
    else:
        q = np.full((t, k), -128 if q_kind == "min" else 127, np.int8)
    monkeypatch.setenv("BITNET_CPU_THREADS", threads)
    got = _i2s_raw_as("avx512-vnni", q, packed, rows)
    assert same_bits(got, _i2s_raw_as("portable", q, packed, rows))


@needs_vnni
def test_i2s_gemm_extremes_and_thread_counts(monkeypatch):
    """All codes 3 against q = -128 (the largest |sum|, 384*K) and 127, t = 512, for rows just past a panel."""
    k, rows = 2560, 70
    packed = np.full(rows * k // 4, 0xFF, np.uint8)
    for val in (-128, 127):
        q = np.full((512, k), val, np.int8)
        for n in ("1", "2", "3"):
            monkeypatch.setenv("BITNET_CPU_THREADS", n)
            assert (_i2s_raw_as("avx512-vnni", q, packed, rows) == 3 * val * k).all()


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
    assert same_bits(kernels.tq_dot(fmt.type_id, q2, dy2, packed, rows), want)  # the epilogue in C too


@needs_native
def test_tq_dot_threads_and_bad_input(monkeypatch):
    rng = np.random.default_rng(7)
    rows, k = 37, 512
    values = ternary(rng, rows, k)
    packed = TQ2_0.encode(values.astype(np.float32) * np.float32(0.5))
    q, dy = kernels.quantize_q8_k_blocks(rng.standard_normal((9, k)).astype(np.float32))
    outs = []
    for n in ("1", "3"):
        monkeypatch.setenv("BITNET_CPU_THREADS", n)
        outs.append(kernels.tq_dot(TQ2_0.type_id, q, dy, packed, rows))
    assert same_bits(outs[0], outs[1])
    with pytest.raises(ValueError, match="dy must be"):
        kernels.tq_dot(TQ2_0.type_id, q, dy[:, :1], packed, rows)
    with pytest.raises(ValueError, match="packed bytes"):
        kernels.tq_dot(TQ2_0.type_id, q, dy, packed[:-1], rows)


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
@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_f16_gemm_rounds_once(isa):
    """tinyBLAS's acc = fma(x, w, acc) rounds once: on constructed cases where rounding x*w + acc to double and
    then to float (the former definition) is wrong, C (fmaf, vfmadd231ps, FMLA) and f16_gemm_ggml give the exact
    rational answer. K = 32: lane 0 of token i holds c_i (times w = 1), then a_i times row j's f16 b_j; the other
    lanes are 0. 19 tokens: the 8-token gemmn blocks and the single-token tail."""
    from test_fma import double_rounding_cases, fma_exact, old_double_rounding

    n = 19
    a, b, c = double_rounding_cases(np.random.default_rng(31), 11, n, f16_b=True)
    x = np.zeros((n, 32), np.float32)
    w = np.zeros((n, 32), np.float16)
    x[:, 0], x[:, 16] = c, a
    w[:, 0], w[:, 16] = 1.0, b
    assert (w[:, 16].astype(np.float32) == b).all()
    want = np.array([[fma_exact(a[i], b[j], c[i]) for j in range(n)] for i in range(n)], np.float32)
    assert (old_double_rounding(a, b, c) != np.diagonal(want)).sum() >= 4  # the corner is reached
    assert same_bits(f16_gemm_ggml(x, w.astype(np.float32)), want)
    assert same_bits(kernels.f16_matmul(x, w.reshape(-1).view(np.uint8), n, "gemm"), want)


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
def test_model_lm_head_native_equals_numpy(profile, tmp_path):
    """Whole-model logits with the F16 lm_head (bitnet-cpp: tinyBLAS in prefill, ggml_vec_dot_f16 in decode;
    llama-cpp: the float64 product, kernels.f64_matmul) native vs numpy; exact's stays numpy."""
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
    assert native == (profile != "exact")
    with kernels.numpy_only():
        ref_native, ref_prefill, ref_steps = run()
    assert not ref_native
    assert same_bits(prefill, ref_prefill) and all(same_bits(a, b) for a, b in zip(steps, ref_steps))


# -- attention over an f16 KV cache (bitnet-cpp) ------------------------------------------------------
def attention_numpy(q, kc, vc, s_len: int, n_ctx: int) -> np.ndarray:
    """The numpy definition, Model._attention_ggml with bitnet-cpp's f16 KV cache, on the same inputs."""
    t, heads, d = q.shape
    kvh = kc.shape[1]
    fake = SimpleNamespace(profile=get_profile("bitnet-cpp"), cfg=SimpleNamespace(context=n_ctx, heads=heads))
    qg = q.reshape(t, kvh, heads // kvh, d).astype(np.float16).astype(np.float32)
    with mock.patch.object(kernels, "available", lambda: False):
        return Model._attention_ggml(fake, qg, kc[:s_len].astype(np.float32), vc[:s_len].astype(np.float32),
                                     np.arange(s_len - t, s_len))


def attention_every_isa(q, kc, vc, s_len: int, n_ctx: int) -> list:
    outs = []
    try:
        for isa in ISAS:
            assert kernels.set_isa(isa)
            outs.append((isa, kernels.attention_f16(q, kc, vc, s_len, n_ctx)))
    finally:
        kernels.set_isa("auto")
    return outs


def f16_cache(rng, s_len: int, kvh: int, d: int, scale: float) -> np.ndarray:
    """(s_len + 3, kvh, d) f16 with zeros, f16 subnormals and large values; the 3 positions past s_len hold inf
    and NaN, which must not be read."""
    c = rng.standard_normal((s_len + 3, kvh, d)) * scale
    c[rng.random(c.shape) < 0.03] = 0.0
    c[rng.random(c.shape) < 0.01] = rng.choice([-6e-8, 3e-6, -2e3, 6e4], 1)
    c = c.astype(np.float16)
    c[s_len:] = np.float16(np.inf)
    c[s_len + 1:, :, : d // 2] = np.float16(np.nan)
    return c


def same_bits_or_nan(a: np.ndarray, b: np.ndarray) -> bool:
    """NaN in the same places (its payload aside), the same bits everywhere else."""
    na, nb = np.isnan(a), np.isnan(b)
    return a.shape == b.shape and (na == nb).all() and same_bits(np.where(na, 0, a), np.where(nb, 0, b))


ATT_BUDGET = 6_000_000  # t * heads * keys * d of a case: the numpy definition's float64 products stay small


@needs_native
@SETTINGS
@given(d=st.sampled_from([16, 64, 80, 128]), kvh=st.integers(1, 3), g=st.integers(1, 4), s_len=st.integers(1, 300),
       t=st.one_of(st.just(1), st.integers(1, 40)), ctx_extra=st.integers(0, 200),
       q_scale=st.sampled_from([1e-3, 0.3, 1.0, 4.0, 30.0]), kv_scale=st.sampled_from([1e-4, 1.0, 8.0]),
       seed=st.integers(0, 2**32 - 1))
def test_attention_f16_bit_identical(d, kvh, g, s_len, t, ctx_extra, q_scale, kv_scale, seed):
    """C (every ISA variant) against the numpy definition: prefill (t > 1: sgemm) and decode (t == 1: vec_dot over
    n_kv cells), keys past 128 (more than 8 chunk sums: their order), GQA groups, head sizes with a vec_dot tail."""
    t = max(1, min(t, s_len, ATT_BUDGET // (kvh * g * s_len * d)))
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((t, kvh * g, d)) * q_scale).astype(np.float32)
    kc, vc = f16_cache(rng, s_len, kvh, d, kv_scale), f16_cache(rng, s_len, kvh, d, kv_scale)
    want = attention_numpy(q, kc, vc, s_len, s_len + ctx_extra)
    for isa, got in attention_every_isa(q, kc, vc, s_len, s_len + ctx_extra):
        assert got.dtype == np.float32 and got.shape == (t, kvh * g * d)
        assert same_bits(got, want), isa


@needs_native
@pytest.mark.parametrize("t", [1, 2, 17])
@pytest.mark.parametrize("case", ["exp-ramp", "f16-extremes", "one-hot"])
def test_attention_f16_extremes(case, t):
    """exp-ramp: scores from 0 down to -150 (ggml_expf through f16-subnormal, float-subnormal and zero results
    past |n| > 192); f16-extremes: q (float32 rounding to f16 ties and to 65504), K and V at +-65504 and f16
    subnormals; one-hot: scores so far apart that every probability is 0 or 1."""
    rng = np.random.default_rng(7)
    s_len, kvh, g, d = 300, 2, 2, 16
    if case == "exp-ramp":
        kc = np.zeros((s_len, kvh, d), np.float16)
        kc[:, :, 0] = (-0.5 * rng.permutation(s_len)).astype(np.float16)[:, None]  # w = q0 * k0 / 4
        q = np.zeros((t, kvh * g, d), np.float32)
        q[:, :, 0] = 4.0
        vc = rng.standard_normal((s_len, kvh, d)).astype(np.float16)
    elif case == "f16-extremes":
        vals = np.array([65504, -65504, 6e-8, -6e-8, 2.0 ** -14, 0.0, 1.0, -3.0], np.float32)
        kc = rng.choice(vals, (s_len, kvh, d)).astype(np.float16)
        vc = rng.choice(vals, (s_len, kvh, d)).astype(np.float16)
        qv = np.array([65519.0, -65519.0, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 2.0 ** -25, 3e-8, 0.0], np.float32)
        q = rng.choice(qv, (t, kvh * g, d))
    else:
        kc = (rng.standard_normal((s_len, kvh, d)) * 100).astype(np.float16)
        vc = rng.standard_normal((s_len, kvh, d)).astype(np.float16)
        q = (rng.standard_normal((t, kvh * g, d)) * 500).astype(np.float32)
    want = attention_numpy(q, kc, vc, s_len, 4096)
    assert np.isfinite(want).all()
    for isa, got in attention_every_isa(q, kc, vc, s_len, 4096):
        assert same_bits(got, want), isa


@needs_native
def test_attention_f16_sgemm_rounds_once():
    """Peaked softmax rows put tiny p*v products next to larger accumulators, where rounding the sum to double
    and then to float (the former definition) and a float32 FMA (ggml's sgemm) differ: about 1 case in 5 here
    has such an output. Every FMA step of the numpy definition where the two differ is checked against exact
    rational arithmetic, and C (fmaf, vfmadd231ps) gives the definition's bits."""
    from test_fma import fma_exact, old_double_rounding

    s_len, t, kvh, g, d = 64, 8, 1, 2, 64
    real_fma, corners = model_module._fma, []

    def spy(a, b, c):
        got = real_fma(a, b, c)
        a, b, c = np.broadcast_arrays(a, b, c)
        finite = np.isfinite(a) & np.isfinite(b) & np.isfinite(c)  # expf meets -inf (masked keys) too
        for i in zip(*np.nonzero(finite & (old_double_rounding(a, b, c) != got))):
            corners.append(i)
            assert same_bits(got[i], fma_exact(a[i], b[i], c[i]))
        return got

    for seed in range(40):
        rng = np.random.default_rng(seed)
        q = (rng.standard_normal((t, kvh * g, d)) * 12).astype(np.float32)
        kc = rng.standard_normal((s_len, kvh, d)).astype(np.float16)
        vc = rng.standard_normal((s_len, kvh, d)).astype(np.float16)
        with mock.patch.object(model_module, "_fma", spy), mock.patch.object(ggml_ref, "_fma", spy):
            want = attention_numpy(q, kc, vc, s_len, 4096)
        for isa, got in attention_every_isa(q, kc, vc, s_len, 4096):
            assert same_bits(got, want), (isa, seed)
    assert len(corners) >= 5  # the double-rounding corners were reached


@needs_native
@pytest.mark.parametrize("s_len", [1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 95, 96, 97, 127, 128, 129, 160, 161, 257])
def test_attention_f16_context_padding(s_len):
    """One decoded row over n_kv = min(ceil32(s_len), ceil32(n_ctx)) cells (the float32 lanes over n_kv & ~63, the
    rest in double) for contexts at and past s_len; a two-row prefill over keys padded to 16."""
    rng = np.random.default_rng(s_len)
    kvh, g, d = 1, 3, 64
    kc, vc = f16_cache(rng, s_len, kvh, d, 1.0), f16_cache(rng, s_len, kvh, d, 1.0)
    for t in {1, min(2, s_len)}:
        q = (rng.standard_normal((t, kvh * g, d)) * 2).astype(np.float32)
        for n_ctx in (s_len, s_len + 1, -(-s_len // 32) * 32 + 1, 4096):
            want = attention_numpy(q, kc, vc, s_len, n_ctx)
            for isa, got in attention_every_isa(q, kc, vc, s_len, n_ctx):
                assert same_bits(got, want), (isa, t, n_ctx)


@needs_native
@pytest.mark.parametrize("t", [1, 5])
def test_attention_f16_non_finite(t):
    """inf in V at a future (masked) key: 0 * inf makes the earlier rows NaN in ggml's sgemm and in the numpy
    definition, so C must not skip masked keys there; q past the f16 range (inf after rounding) gives NaN rows."""
    rng = np.random.default_rng(11)
    s_len, kvh, g, d = 40, 2, 2, 64
    kc = rng.standard_normal((s_len, kvh, d)).astype(np.float16)
    vc = rng.standard_normal((s_len, kvh, d)).astype(np.float16)
    vc[s_len - 2, 0, 3] = np.inf
    kc[s_len - 1, 1, 5] = -np.inf
    q = rng.standard_normal((t, kvh * g, d)).astype(np.float32)
    q[0, 3, 7] = 1e6
    want = attention_numpy(q, kc, vc, s_len, 4096)
    assert np.isnan(want).any() and not np.isnan(want).all()
    for isa, got in attention_every_isa(q, kc, vc, s_len, 4096):
        assert same_bits_or_nan(got, want), isa


@needs_native
def test_attention_f16_threads_and_views(monkeypatch):
    """Threads change nothing; the caches are read in place from a longer buffer (only s_len positions)."""
    rng = np.random.default_rng(5)
    s_len, t, kvh, g, d = 150, 33, 2, 3, 80
    kc, vc = f16_cache(rng, s_len, kvh, d, 1.0), f16_cache(rng, s_len, kvh, d, 1.0)
    q = rng.standard_normal((t, kvh * g, d)).astype(np.float32)
    outs = []
    for n in ("1", "2", "5"):
        monkeypatch.setenv("BITNET_CPU_THREADS", n)
        outs.append(kernels.attention_f16(q, kc, vc, s_len, 512))
        outs.append(kernels.attention_f16(q[-1:], kc, vc, s_len, 512))
    assert same_bits(outs[0], attention_numpy(q, kc, vc, s_len, 512))
    assert same_bits(outs[1], attention_numpy(q[-1:], kc, vc, s_len, 512))
    assert all(same_bits(a, b) for a, b in zip(outs[2:], outs * 2))


def test_attention_f16_rejects_bad_input():
    q, c = np.zeros((2, 4, 16), np.float32), np.zeros((8, 2, 16), np.float16)
    if not NATIVE:
        with pytest.raises(RuntimeError, match="unavailable"):
            kernels.attention_f16(q, c, c, 8, 8)
        return
    with pytest.raises(ValueError, match="s_len <= n_ctx"):
        kernels.attention_f16(q, c, c, 8, 7)
    with pytest.raises(ValueError, match="T <= s_len"):
        kernels.attention_f16(q, c, c, 1, 8)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.attention_f16(q, c, c, 9, 9)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.attention_f16(np.zeros((2, 3, 16), np.float32), c, c, 8, 8)
    with pytest.raises(TypeError, match="float16"):
        kernels.attention_f16(q, c.astype(np.float32), c, 8, 8)
    mod = kernels._load()
    lib, ffi = mod.lib, mod.ffi
    out = np.zeros((2, 64), np.float32)
    cb = ffi.from_buffer("uint16_t[]", c.view(np.uint16))
    args = dict(q=ffi.from_buffer("float[]", q), t=2, heads=4, kv_heads=2, d=16, kc=cb, vc=cb, s_len=8, n_ctx=8,
                out=ffi.from_buffer("float[]", out), nthreads=2)
    assert lib.bk_attention_f16(*args.values()) == 0
    for bad in (dict(t=0), dict(s_len=1), dict(n_ctx=7), dict(kv_heads=3), dict(kv_heads=0), dict(d=0),
                dict(heads=0), dict(q=ffi.NULL), dict(out=ffi.NULL), dict(kc=ffi.NULL)):
        assert lib.bk_attention_f16(*{**args, **bad}.values()) == lib.BK_EBADARG, bad


# -- the model: native and numpy paths give the same bits ----------------------------------------------
@needs_native
@pytest.mark.parametrize("fmt,profile", [("i2_s", "bitnet-cpp"), ("tq2_0", "llama-cpp"), ("tq1_0", "llama-cpp")])
def test_model_native_equals_numpy(fmt, profile, tmp_path):
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
    with kernels.numpy_only():
        with Model.load(path, profile) as m:
            assert m.layers[0].proj["ffn_down"].values is not None
            ref = m.logits(ids)
            st_ = m.new_state()
            m.forward(ids[:4], st_)
            ref_step = m.forward(ids[4:5], st_)
    assert same_bits(native, ref) and same_bits(step, ref_step)


@needs_native
def test_model_f16_kv_attention_native_equals_numpy(tmp_path):
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
    with kernels.numpy_only():
        ref = run()
    assert all(same_bits(a, b) for a, b in zip(native, ref))


@needs_native
@pytest.mark.parametrize("route", ["python-layers", "layer-kernel"])
def test_model_attention_native_equals_numpy(route, tmp_path, monkeypatch):
    """bitnet-cpp's f16-cache attention in C (kernels.attention_f16 from Model._attention_ggml when the Python
    layers run, as with taps; the one-call layer calls bk_attention_f16 itself) against BITNET_KERNELS=0: a
    150-token prefill (more than 8 softmax chunk sums) and decode steps over n_kv = 160 (a double tail past 128
    cells) and 192 cells, bit for bit."""
    path = synthesize(SynthSpec(arch="bitnet", format="i2_s", layers=1), tmp_path)
    ids = [int(i) for i in np.random.default_rng(4).integers(1, 200, 168)]
    calls = []
    real = kernels.attention_f16
    monkeypatch.setattr(kernels, "attention_f16", lambda *a: calls.append(a[0].shape[0]) or real(*a))

    def run():
        with Model.load(path, "bitnet-cpp") as m:
            st_ = m.new_state()
            if route == "python-layers":
                st_.taps = {}  # taps keep the numpy layers
            out = [m.forward(ids[:150], st_)]
            return out + [m.forward([i], st_) for i in ids[150:]]

    native = run()
    assert calls == ([150] + [1] * 18 if route == "python-layers" else [])
    with kernels.numpy_only():
        ref = run()
    assert len(calls) == (19 if route == "python-layers" else 0)
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
