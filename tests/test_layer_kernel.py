"""The native one-call-per-layer forward (kernels.bitnet_layer, native/bk_layer.c) against the numpy
definition: the same logits bit for bit in the bitnet-cpp profile, for every-row and last-row prefills and
decode steps, with any thread count; and its f32 -> f16 rounding against numpy's."""

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


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@needs_native
def test_f32_to_f16_rounds_as_numpy():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 2**-24, 2**-25, 1.5 * 2**-25, 2**-14,
                        2**-14 - 2**-25, np.inf, -np.inf, 1e-45, 3.0000002], np.float32)
    x = np.concatenate([bits.view(np.float32), special])
    mod = kernels._load()
    outs = []
    for isa in ISAS:  # every variant gives the same bits, NaN payloads included
        assert kernels.set_isa(isa)
        out = np.empty(x.size, np.uint16)
        assert mod.lib.bk_f32_to_f16(mod.ffi.from_buffer("float[]", x), x.size,
                                     mod.ffi.from_buffer("uint16_t[]", out)) == 0
        outs.append(out)
    kernels.set_isa("auto")
    assert all(np.array_equal(o, outs[0]) for o in outs[1:])
    keep = ~np.isnan(x)  # numpy quiets NaN payloads its own way
    with np.errstate(over="ignore"):  # values past 65504 become inf, as in C
        want = x[keep].astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(outs[0][keep], want)


def _run(path, ids, monkeypatch=None, threads=None):
    """logits of every row, of the last row, and of three decode steps after a 4-token prompt"""
    if threads is not None:
        monkeypatch.setenv("BITNET_CPU_THREADS", str(threads))
    with Model.load(path, "bitnet-cpp") as m:
        fused = m._layer_plans() is not None
        every = m.logits(ids)
        last = m.forward(ids, m.new_state(), last_only=True)
        st = m.new_state()
        m.forward(ids[:4], st, last_only=True)
        steps = [m.forward([i], st) for i in ids[4:7]]
    return fused, every, last, steps


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("arch", ["bitnet-b1.58", "bitnet"])  # ReLU^2- and SiLU-gated
def test_layer_kernel_equals_numpy(arch, isa, tmp_path):
    path = synthesize(SynthSpec(arch=arch, format="i2_s", zero_tokens=(5,)), tmp_path)
    ids = [5, 1, 2, 3, 200, 7, 9, 44, 300, 12] * 5  # 50 positions: past the 32-cell padding of the V path
    assert kernels.set_isa(isa)
    try:
        fused, every, last, steps = _run(path, ids)
    finally:
        kernels.set_isa("auto")
    assert fused
    with kernels.numpy_only():
        ref_fused, ref_every, ref_last, ref_steps = _run(path, ids)
    assert not ref_fused
    assert same_bits(every, ref_every) and same_bits(last, ref_last)
    assert all(same_bits(a, b) for a, b in zip(steps, ref_steps))
    assert not same_bits(last, every[-1:])  # last-row-only is computed differently (FFN rows, lm_head path)


@needs_native
def test_layer_kernel_threads_do_not_change_results(tmp_path, monkeypatch):
    path = synthesize(SynthSpec(arch="bitnet-b1.58", format="i2_s"), tmp_path)
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    one = _run(path, ids, monkeypatch, 1)
    three = _run(path, ids, monkeypatch, 3)
    assert same_bits(one[1], three[1]) and same_bits(one[2], three[2])
    assert all(same_bits(a, b) for a, b in zip(one[3], three[3]))


@needs_native
def test_layer_kernel_not_used_where_it_does_not_apply(tmp_path):
    """Other profiles, other formats and taps take the numpy layers."""
    b158 = synthesize(SynthSpec(arch="bitnet-b1.58", format="i2_s"), tmp_path)
    tq2 = synthesize(SynthSpec(arch="bitnet-b1.58", format="tq2_0"), tmp_path)
    with Model.load(b158, "exact") as m:
        assert m._layer_plans() is None
    with Model.load(tq2, "bitnet-cpp") as m:
        assert m._layer_plans() is None
    with Model.load(b158, "bitnet-cpp") as m:
        st = m.new_state()
        st.taps = {}
        tapped = m.forward([1, 2, 3], st)
        assert "l_out-1" in st.taps
        assert same_bits(tapped, m.logits([1, 2, 3]))


@needs_native
def test_layer_kernel_rejects_short_caches(tmp_path):
    path = synthesize(SynthSpec(arch="bitnet-b1.58", format="i2_s"), tmp_path)
    with Model.load(path, "bitnet-cpp") as m:
        plan = m._layer_plans()[0]
        c = m.cfg
        x = np.zeros((2, c.hidden), np.float32)
        cache = np.zeros((1, c.kv_heads, c.head_dim), np.float16)
        angles = np.zeros((2, c.head_dim // 2), np.float32)
        with pytest.raises(ValueError, match="caches of 1 positions"):
            kernels.bitnet_layer(plan, x, 2, cache, cache, angles, angles, False)
        with pytest.raises(ValueError, match="C-contiguous float32"):
            kernels.bitnet_layer(plan, x.astype(np.float64), 2, cache, cache, angles, angles, False)
        wide = np.zeros((4, c.kv_heads + 1, c.head_dim), np.float16)  # would be read past its end
        with pytest.raises(ValueError, match="do not fit the layer"):
            kernels.bitnet_layer(plan, x, 2, wide, wide, angles, angles, False)
        with pytest.raises(ValueError, match="angles"):
            kernels.bitnet_layer(plan, x, 1, cache, cache, angles[:1, :3], angles[:1, :3], False)


@needs_native
def test_tl2_runs_repacked_as_i2s(tmp_path):
    """bitnet-cpp computes TL2 products as I2_S ones: the native path repacks them at load (2 bits a weight,
    never int8) and gives the numpy path's logits."""
    path = synthesize(SynthSpec(preset="large-shapes", arch="bitnet-b1.58", format="tl2"), tmp_path)
    ids = [1, 2, 3, 4, 5, 6]
    with Model.load(path, "bitnet-cpp") as m:
        lin = m.layers[0].proj["ffn_up"]
        assert lin.fmt == "tl2" and lin.values is None and lin.packed.nbytes < lin.shape[0] * lin.shape[1] // 3
        assert m._layer_plans() is not None
        native = m.logits(ids)
    with kernels.numpy_only():
        with Model.load(path, "bitnet-cpp") as m:
            assert m.layers[0].proj["ffn_up"].values is not None
            ref = m.logits(ids)
    assert same_bits(native, ref)


@needs_native
def test_cos_sin_are_the_libm_functions(monkeypatch):
    """RoPE's cosf/sinf from C and through ctypes: the same library functions, the same bits."""
    import bitnet_ref.model as model

    theta = np.concatenate([np.random.default_rng(1).uniform(-5000, 5000, 20000),
                            [0.0, -0.0, 1e-30, 3.0e38, np.pi, 4096.0]]).astype(np.float32)
    native = model.cos_sin_f32(theta)
    monkeypatch.setattr(kernels, "cos_sin", lambda th: None)
    if model._COSF is None:
        pytest.skip("no libm through ctypes here")
    by_ctypes = model.cos_sin_f32(theta)
    assert same_bits(native[0], by_ctypes[0]) and same_bits(native[1], by_ctypes[1])
