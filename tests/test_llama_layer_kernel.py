"""The llama-cpp profile's native one-call-per-layer forward (kernels.llama_cpp_layer, native/bk_ggml_layer.c and
bk_attention_f32.c) against the numpy definition: the same logits and KV cache bit for bit, for TQ1_0, TQ2_0, F16
and F32 projections, both gatings, every-row and last-row prefills and decode steps, on every ISA variant this CPU
runs, with any thread count; and its F16/F32 products (the lm_head's too) against the definition's float64 one."""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_ref import kernels
from bitnet_ref.model import Model
from bitnet_ref.synth import SynthSpec, synthesize

needs_native = pytest.mark.skipif(not kernels.available(),
                                  reason="native kernels not built (python native/build_kernels.py)")

ISAS = [isa for isa in ("portable", "avx2", "avx512-vnni", "neon") if kernels.available() and kernels.set_isa(isa)]
kernels.set_isa("auto") if kernels.available() else None
FORMATS = ["tq1_0", "tq2_0", "f16", "f32"]


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _run(path, ids, monkeypatch=None, threads=None):
    """logits of every row, of the last row, of three decode steps after a 4-token prompt, and that state's KV"""
    if threads is not None:
        monkeypatch.setenv("BITNET_CPU_THREADS", str(threads))
    with Model.load(path, "llama-cpp") as m:
        fused = m._layer_plans() is not None
        every = m.logits(ids)
        last = m.forward(ids, m.new_state(), last_only=True)
        st = m.new_state()
        m.forward(ids[:4], st, last_only=True)
        steps = [m.forward([i], st) for i in ids[4:7]]
        cache = [c[:st.pos].copy() for c in st.k + st.v]
    return fused, every, last, steps, cache


def _numpy_run(path, ids):
    with kernels.numpy_only():
        return _run(path, ids)


def _assert_same(native, ref):
    fused, every, last, steps, cache = native
    assert fused and not ref[0]
    assert same_bits(every, ref[1]) and same_bits(last, ref[2])
    assert all(same_bits(a, b) for a, b in zip(steps, ref[3]))
    assert len(cache) == len(ref[4]) and all(same_bits(a, b) for a, b in zip(cache, ref[4]))


IDS = [5, 1, 2, 3, 200, 7, 9, 44, 300, 12] * 5  # 50 positions: several 16-key chunks of the softmax and KQV


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama_layer")
    return {(fmt, arch): synthesize(SynthSpec(arch=arch, format=fmt, zero_tokens=(5,)), out)
            for fmt in FORMATS for arch in ("bitnet", "bitnet-b1.58")}


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("arch", ["bitnet", "bitnet-b1.58"])  # SiLU- and ReLU^2-gated
@pytest.mark.parametrize("fmt", FORMATS)
def test_llama_layer_kernel_equals_numpy(fmt, arch, isa, models):
    path = models[(fmt, arch)]
    assert kernels.set_isa(isa)
    try:
        native = _run(path, IDS)
    finally:
        kernels.set_isa("auto")
    ref = _numpy_run(path, IDS)
    _assert_same(native, ref)
    # mainline's row-wise operations and double-summed lm_head do not depend on the other rows: the last row of a
    # last-row-only prompt is the last row of an every-row one (unlike bitnet-cpp, whose lm_head path differs)
    assert same_bits(native[2], native[1][-1:])


@needs_native
def test_llama_layer_kernel_long_prompt(tmp_path):
    """A prompt longer than a GEMM pass's token tiles and the attention's many key chunks, then decode steps."""
    path = synthesize(SynthSpec(arch="bitnet", format="tq2_0", layers=1), tmp_path)
    ids = list(np.random.default_rng(3).integers(0, 500, 203))
    _assert_same(_run(path, ids), _numpy_run(path, ids))


@needs_native
def test_llama_layer_kernel_threads_do_not_change_results(models, monkeypatch):
    path = models[("tq2_0", "bitnet")]
    ids = IDS[:23]
    one = _run(path, ids, monkeypatch, 1)
    three = _run(path, ids, monkeypatch, 3)
    assert same_bits(one[1], three[1]) and same_bits(one[2], three[2])
    assert all(same_bits(a, b) for a, b in zip(one[3], three[3]))


@needs_native
def test_llama_layer_kernel_not_used_where_it_does_not_apply(models, tmp_path):
    """head_dim not a multiple of 64 (the definition's float64 KQ path) and taps take the numpy layers."""
    wide = synthesize(SynthSpec(preset="large-shapes", arch="bitnet", format="tq2_0", layers=1), tmp_path)
    with Model.load(wide, "llama-cpp") as m:
        assert m.cfg.head_dim % 64 and m._layer_plans() is None
    with Model.load(models[("tq2_0", "bitnet")], "llama-cpp") as m:
        st = m.new_state()
        st.taps = {}
        tapped = m.forward([1, 2, 3], st)
        assert "l_out-1" in st.taps
        assert same_bits(tapped, m.logits([1, 2, 3]))


@needs_native
def test_llama_layer_kernel_rejects_bad_arguments(models):
    with Model.load(models[("tq2_0", "bitnet")], "llama-cpp") as m:
        plan = m._layer_plans()[0]
        c = m.cfg
        x = np.zeros((2, c.hidden), np.float32)
        cache = np.zeros((1, c.kv_heads, c.head_dim), np.float32)
        angles = np.zeros((2, c.head_dim // 2), np.float32)
        with pytest.raises(ValueError, match="caches of 1 positions"):
            kernels.llama_cpp_layer(plan, x, 2, cache, cache, angles, angles, False)
        with pytest.raises(ValueError, match="C-contiguous float32"):
            kernels.llama_cpp_layer(plan, x, 2, cache.astype(np.float16), cache, angles, angles, False)
        with pytest.raises(ValueError, match="weight kind"):
            kernels.llama_layer_plan(
                {"hidden": c.hidden, "heads": c.heads, "kv_heads": c.kv_heads, "head_dim": c.head_dim, "ffn": c.ffn,
                 "n_ctx": c.context, "eps": c.rms_eps, "silu": 1}, m.layers[0].norms,
                {n: ("i2_s", x) for n in kernels.LAYER_PROJECTIONS}, {n: 1.0 for n in kernels.LAYER_PROJECTIONS})


@needs_native
@pytest.mark.parametrize("fmt", ["f16", "f32"])
def test_f64_matmul_equals_the_float64_product(fmt):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((9, 200)).astype(np.float32)
    w = (rng.standard_normal((67, 200)) * 0.05).astype(np.float16 if fmt == "f16" else np.float32)
    if fmt == "f16":
        x = x.astype(np.float16).astype(np.float32)
    want = (x.astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32)
    for isa in ISAS:
        assert kernels.set_isa(isa)
        try:
            got = kernels.f64_matmul(x, w, 67, fmt)
            one = kernels.f64_matmul(x[3:4], w, 67, fmt)
        finally:
            kernels.set_isa("auto")
        assert same_bits(got, want) and same_bits(one, want[3:4])
