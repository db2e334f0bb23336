"""The exact profile's products in C (kernels.exact_matmul, native/bk_exact.c) against their numpy definition
(exact_sum.ternary_dot, lane_dot): the same float64 bits for every format and ISA variant, and the whole exact-profile
forward the same bits with and without the kernels, the ternary weights never unpacked by the native path."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from bitnet_ref import kernels
from bitnet_ref.exact_sum import attention_scores, attention_values, lane_dot, rms_norm, ternary_dot
from bitnet_ref.formats import get_format
from bitnet_ref.formats.i2s import I2S_X86
from bitnet_ref.model import Model
from bitnet_ref.synth import SynthSpec, synthesize

needs_native = pytest.mark.skipif(not kernels.available(),
                                  reason="native kernels not built (python native/build_kernels.py)")

ISAS = [isa for isa in ("portable", "avx2", "avx512-vnni", "neon") if kernels.available() and kernels.set_isa(isa)]
kernels.set_isa("auto") if kernels.available() else None
TYPES = {"tq1_0": 34, "tq2_0": 35, "i2_s": 36, "f32": 0, "f16": 1}


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _case(fmt: str, t: int, r: int, k: int, rng):
    """activations spanning many binades (so that the order of the sums shows), weights in `fmt`: (x, stored
    bytes, what the numpy definition takes: values/weights and scale)"""
    x = rng.standard_normal((t, k)) * np.exp2(rng.integers(-30, 30, (t, k)))
    if fmt in ("f32", "f16"):
        w = rng.standard_normal((r, k)).astype(np.float16 if fmt == "f16" else np.float32)
        return x, w.reshape(-1).view(np.uint8), w.astype(np.float32), None
    vals = rng.integers(-1, 2, (r, k)).astype(np.int8)
    if fmt == "i2_s":
        return x, I2S_X86.pack(vals, 0.37), vals, np.full((1, 1), 0.37, np.float32)
    f = get_format(fmt)
    scales = rng.uniform(0.05, 3, (r, k // 256)).astype(np.float32)
    data = f.encode(vals.astype(np.float32) * np.repeat(scales, 256, axis=1))
    tern = f.unpack(data, (r, k))
    assert np.array_equal(tern.values, vals)
    return x, data, vals, np.asarray(tern.scale, np.float32)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", list(TYPES))
def test_exact_matmul_equals_numpy_definition(fmt, isa):
    rng = np.random.default_rng(TYPES[fmt])
    # tokens: 1 (decode), a short tile (3), more than a tile with a padded tail (35), two full 16-token tiles;
    # rows not a multiple of 4 or 8; float rows with a k tail that is not a multiple of 8
    shapes = [(1, 37, 512), (3, 21, 768), (35, 18, 256), (32, 9, 512)]
    if fmt == "i2_s":
        shapes += [(6, 11, 384), (1, 13, 384)]  # a last chunk of 128 values
    if fmt in ("f32", "f16"):
        shapes += [(5, 9, 300), (2, 5, 7)]
    assert kernels.set_isa(isa)
    try:
        for t, r, k in shapes:
            x, data, w, scale = _case(fmt, t, r, k, rng)
            got = kernels.exact_matmul(TYPES[fmt], x, data, r, scale)
            want = lane_dot(x, w) if scale is None else ternary_dot(x, w, scale)
            assert same_bits(got, want), (fmt, isa, t, r, k, np.max(np.abs(got - want)))
    finally:
        kernels.set_isa("auto")


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["tq1_0", "tq2_0", "i2_s"])
def test_exact_matmul_many_equals_one_call_each(fmt, isa):
    """Q, K, V (or gate and up) in one call: every matrix the bits of its own exact_matmul, on every tile size."""
    rng = np.random.default_rng(TYPES[fmt] + 100)
    mats = []
    for r in (29, 8, 3):
        _, data, _, scale = _case(fmt, 1, r, 512, rng)
        mats.append((data, r, scale))
    assert kernels.set_isa(isa)
    try:
        for t in (1, 3, 21):
            x = rng.standard_normal((t, 512)) * np.exp2(rng.integers(-30, 30, (t, 512)))
            outs = kernels.exact_matmul_many(TYPES[fmt], x, mats)
            assert all(same_bits(o, kernels.exact_matmul(TYPES[fmt], x, d, r, sc)) for o, (d, r, sc) in zip(outs, mats))
    finally:
        kernels.set_isa("auto")


def _error_bound(got, terms, n_adds):
    """float64 error bound of any order of n_adds additions of `terms` against the exactly rounded sum"""
    bound = (n_adds + 4) * 2.0**-53 * math.fsum(abs(v) for v in terms) * 1.0001
    return abs(got - math.fsum(terms)) <= bound


def test_ternary_dot_is_the_defined_order():
    """ternary_dot is the order exact_sum's docstring states (checked with plain Python floats, including a scale
    block padded to a multiple of 128 and a weight 2), and stays within the float64 error bound of the exactly
    rounded sum (math.fsum), as any summation order does."""
    rng = np.random.default_rng(7)
    for k, nb in ((512, 2), (320, 2)):  # 320: blocks of 160 values, padded to 256
        x = rng.standard_normal((2, k)) * np.exp2(rng.integers(-20, 20, (2, k)))
        vals = rng.integers(-1, 2, (3, k)).astype(np.int8)
        vals[1, 5] = 2
        scale = rng.uniform(0.5, 2, (3, nb)).astype(np.float32)
        got = ternary_dot(x, vals, scale)
        g = k // nb
        for i in range(2):
            for r in range(3):
                out = 0.0
                for b in range(nb):
                    # the block's products, padded with +0.0 to a multiple of 128
                    v = [float(vals[r, b * g + p]) * float(x[i, b * g + p]) for p in range(g)] + [0.0] * (-g % 128)
                    s = 0.0
                    for c in range(len(v) // 128):
                        for m in range(32):
                            p = 128 * c + m
                            s = s + ((v[p] + v[p + 32]) + (v[p + 64] + v[p + 96]))
                    out = out + s * float(scale[r, b])
                assert got[i, r] == out
                terms = [float(vals[r, j]) * float(x[i, j]) * float(scale[r, j // g]) for j in range(k)]
                assert _error_bound(got[i, r], terms, g // 4 + 8)


def test_lane_dot_is_the_defined_order():
    """lane_dot (float weights) is its stated lane order, within the float64 error bound."""
    rng = np.random.default_rng(8)
    k = 301
    x = rng.standard_normal((2, k)) * np.exp2(rng.integers(-20, 20, (2, k)))
    w = rng.standard_normal((3, k)).astype(np.float32)
    got = lane_dot(x, w)
    for i in range(2):
        for r in range(3):
            lanes = [0.0] * 8
            for p in range(k):
                lanes[p % 8] += float(w[r, p]) * float(x[i, p])
            out = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
            assert got[i, r] == out
            assert _error_bound(got[i, r], [float(w[r, p]) * float(x[i, p]) for p in range(k)], k // 8 + 4)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_exact_matmul_malformed_tq2_code(isa):
    """A TQ2_0 code 3 (not written by ggml's quantizer; ggml reads it as the weight 2) is the value 2 in the
    kernel's pair tables too: the definition's bits on every path (one token, a short tile, full tiles)."""
    rng = np.random.default_rng(3)
    x, data, vals, scale = _case("tq2_0", 17, 6, 512, rng)
    data = data.copy()
    data[66 * 3 + 5] |= 0xC0  # row 1, block 1: code 3 at bits 6-7 of qs[5]
    vals = get_format("tq2_0").unpack(data, (6, 512)).values
    assert vals.max() == 2
    assert kernels.set_isa(isa)
    try:
        for t in (1, 3, 17):
            got = kernels.exact_matmul(35, x[:t], data, 6, scale)
            assert same_bits(got, ternary_dot(x[:t], vals, scale)), (isa, t)
    finally:
        kernels.set_isa("auto")


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_exact_attention_equals_numpy_definition(isa):
    """kernels.exact_scores / exact_values (float32 caches read in place) give exact_sum's bits: queries and keys
    not multiples of the 4x4 blocks, head sizes not multiples of 8 or 32, grouped KV heads."""
    rng = np.random.default_rng(11)
    assert kernels.set_isa(isa)
    try:
        for t, s, heads, kvh, d in ((1, 37, 4, 2, 64), (5, 9, 6, 3, 20), (13, 13, 2, 1, 128), (3, 70, 8, 8, 35)):
            q = rng.standard_normal((t, heads, d)) * np.exp2(rng.integers(-20, 20, (t, heads, d)))
            cache = rng.standard_normal((2, s + 3, kvh, d)).astype(np.float32)  # 3 positions past s_len
            got = kernels.exact_scores(q, cache[0], s)
            assert same_bits(got, attention_scores(q, cache[0][:s])), (isa, t, s, heads, kvh, d)
            w = rng.uniform(0, 1, (heads, t, s)) * np.exp2(rng.integers(-20, 20, (heads, t, s)))
            got = kernels.exact_values(w, cache[1], s)
            assert same_bits(got, attention_values(w, cache[1][:s])), (isa, t, s, heads, kvh, d)
    finally:
        kernels.set_isa("auto")


def test_exact_attention_rejects_shapes_that_do_not_fit():
    cache = np.zeros((3, 2, 8), np.float32)
    with pytest.raises(ValueError, match="exact_scores: .* does not fit the cache"):
        kernels.exact_scores(np.zeros((2, 4, 9)), cache, 3)  # head size 9 against 8
    with pytest.raises(ValueError, match="exact_values: .* does not fit the cache"):
        kernels.exact_values(np.zeros((4, 2, 5)), cache, 3)  # 5 weights a row for 3 positions
    with pytest.raises(ValueError, match="exact_scores: a \\(>= 4, kv_heads, d\\) cache"):
        kernels.exact_scores(np.zeros((2, 4, 8)), cache, 4)  # the cache holds 3 positions


def test_attention_definition_is_the_stated_order():
    """attention_scores is lane_dot per head (GQA: head h reads KV head h // g); attention_values adds the
    weighted V rows in key order from +0.0 (checked with plain Python floats)."""
    rng = np.random.default_rng(12)
    t, s, heads, kvh, d = 2, 5, 4, 2, 11
    q = rng.standard_normal((t, heads, d)) * np.exp2(rng.integers(-20, 20, (t, heads, d)))
    k = rng.standard_normal((s, kvh, d)).astype(np.float32)
    v = rng.standard_normal((s, kvh, d)).astype(np.float32) * np.exp2(rng.integers(-20, 20, (s, kvh, d)))
    w = rng.uniform(0, 1, (heads, t, s))
    sc, out = attention_scores(q, k), attention_values(w, v)
    for h in range(heads):
        for i in range(t):
            assert np.array_equal(sc[h, i], lane_dot(q[i, h][None], k[:, h // 2])[0])
            for j in range(d):
                acc = 0.0
                for p in range(s):
                    acc = acc + float(w[h, i, p]) * float(v[p, h // 2, j])
                assert out[i, h, j] == acc


def _run(path, ids):
    """exact-profile logits of every row, of the last row, and of three decode steps after a 4-token prompt"""
    with Model.load(path, "exact") as m:
        every = m.logits(ids)
        last = m.forward(ids, m.new_state(), last_only=True)
        st = m.new_state()
        m.forward(ids[:4], st)
        steps = [m.forward([i], st) for i in ids[4:7]]
        unpacked = [lin.name for layer in m.layers for lin in layer.proj.values() if lin.values is not None]
    return every, last, steps, unpacked


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["tq1_0", "tq2_0", "i2_s", "f16", "f32"])
def test_exact_forward_native_equals_numpy(fmt, isa, tmp_path):
    path = synthesize(SynthSpec(arch="bitnet", format=fmt, zero_tokens=(5,)), tmp_path)
    ids = [5, 1, 2, 3, 200, 7, 9, 44, 300, 12] * 4
    assert kernels.set_isa(isa)
    try:
        every, last, steps, unpacked = _run(path, ids)
    finally:
        kernels.set_isa("auto")
    assert unpacked == []  # the native path read every ternary projection packed
    with kernels.numpy_only():
        ref_every, ref_last, ref_steps, ref_unpacked = _run(path, ids)
    assert fmt in ("f16", "f32") or ref_unpacked  # numpy computed from unpacked values
    assert same_bits(every, ref_every) and same_bits(last, ref_last)
    assert all(same_bits(a, b) for a, b in zip(steps, ref_steps))


@needs_native
def test_exact_keeps_weights_packed(tmp_path):
    """Loading a TQ2_0 model in the exact profile and running it allocates less than an int8 copy of its
    ternary weights would take (tracemalloc sees numpy's allocations): only the packed bytes are held."""
    path = synthesize(SynthSpec(preset="large-shapes", arch="bitnet", format="tq2_0", layers=1), tmp_path)
    tracemalloc.start()
    try:
        with Model.load(path, "exact") as m:
            m.forward([1, 2, 3], m.new_state())
            n_weights = sum(int(np.prod(lin.shape)) for layer in m.layers for lin in layer.proj.values())
            packed = sum(lin.packed.nbytes for layer in m.layers for lin in layer.proj.values())
            assert all(lin.values is None and lin.weight is None for layer in m.layers for lin in layer.proj.values())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert packed < n_weights / 3  # TQ2_0: 66 bytes a 256 weights
    assert peak < n_weights * 0.6, (peak, n_weights)


@needs_native
@pytest.mark.parametrize("fmt", ["tl1", "tl2"])
def test_exact_tl_formats_run_repacked(fmt, tmp_path):
    """TL1/TL2 projections (one scale per tensor) are repacked to I2_S bytes at load for the native exact kernel:
    2 bits a weight, no int8 copy, and the numpy definition's bits."""
    path = synthesize(SynthSpec(preset="large-shapes", arch="bitnet", format=fmt, layers=1), tmp_path)
    ids = [1, 2, 3, 200, 7]
    with Model.load(path, "exact") as m:
        lins = [lin for layer in m.layers for lin in layer.proj.values()]
        assert all(lin.values is None and lin.type_id == I2S_X86.type_id for lin in lins)
        got = m.logits(ids)
    with kernels.numpy_only():
        with Model.load(path, "exact") as m:
            want = m.logits(ids)
    assert same_bits(got, want)


@needs_native
def test_exact_forward_native_equals_numpy_relu2(tmp_path):
    """bitnet-b1.58 (ReLU^2 gating: bk_exact_relu2_mul) through the native exact steps, bit for bit numpy"""
    path = synthesize(SynthSpec(arch="bitnet-b1.58", format="i2_s"), tmp_path)
    ids = [5, 1, 2, 3, 200, 7, 9, 44, 300, 12] * 2
    every, last, steps, _ = _run(path, ids)
    with kernels.numpy_only():
        ref_every, ref_last, ref_steps, _ = _run(path, ids)
    assert same_bits(every, ref_every) and same_bits(last, ref_last)
    assert all(same_bits(a, b) for a, b in zip(steps, ref_steps))


def _specials(rng, shape):
    """normal values across 60 binades, with NaN, +-inf, -0.0, subnormals and values whose squares overflow"""
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-30, 30, shape))
    flat = x.reshape(-1)
    picks = rng.choice(flat.size, size=min(12, flat.size // 4), replace=False)
    flat[picks] = [np.nan, np.inf, -np.inf, -0.0, 0.0, 5e-324, -3e-310, 1e200, -1e300, 1.5, -2.5, 7.0][:picks.size]
    return x


@needs_native
@pytest.mark.parametrize("k", [8, 35, 2560])
def test_exact_rms_equals_numpy_definition(k):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((5, k)) * np.exp2(rng.integers(-30, 30, (5, k)))
    x[1] = _specials(rng, (k,))  # one row with NaN/inf: its own result, not its neighbours'
    x[2, :3] = [1e200, -1e200, 1e-300]  # squares overflow to inf
    x[3] = 0.0  # ms = 0: 1 / sqrt(eps)
    gain = (rng.standard_normal(k) * 3).astype(np.float32)
    with np.errstate(all="ignore"), kernels.numpy_only():
        want = kernels.exact_rms(x, gain, 1e-5)
    got = kernels.exact_rms(x, gain, 1e-5)
    assert same_bits(got, want)
    assert np.isfinite(got[0]).all() and np.isnan(got[1]).all() and not np.isfinite(x[1]).all()


def test_rms_norm_is_the_defined_order():
    """rms_norm: squares into 8 lanes in order, folded, / K; then (x * (1 / sqrt(ms + eps))) * gain (plain floats)"""
    rng = np.random.default_rng(3)
    k, eps = 203, 1e-6  # 25 values a lane and a tail of 3
    x = rng.standard_normal((2, k)) * np.exp2(rng.integers(-20, 20, (2, k)))
    gain = rng.standard_normal(k).astype(np.float32)
    got = rms_norm(x, gain, eps)
    for r in range(2):
        lane = [0.0] * 8
        for p in range(k):
            lane[p % 8] = lane[p % 8] + float(x[r, p]) * float(x[r, p])
        ms = (((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))) / k
        inv = 1.0 / math.sqrt(ms + eps)
        assert [(float(x[r, p]) * inv) * float(gain[p]) for p in range(k)] == got[r].tolist()


@needs_native
def test_exact_rope_and_relu2_equal_numpy():
    rng = np.random.default_rng(8)
    t, heads, d = 6, 3, 10
    x = _specials(rng, (t, heads, d))
    cos, sin = rng.uniform(-1, 1, (t, d // 2)), rng.uniform(-1, 1, (t, d // 2))
    x0, x1, c, s = x[..., :d // 2], x[..., d // 2:], cos[:, None, :], sin[:, None, :]
    want = np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)  # Model._rope's exact-profile expression
    got = x.copy()
    assert kernels.exact_rope(got, cos, sin) and same_bits(got, want)
    gate, up = _specials(rng, (4, 33)), _specials(rng, (4, 33))
    with np.errstate(all="ignore"):
        want = np.square(np.maximum(gate, 0)) * up  # Model._ffn_act's numpy steps
    assert same_bits(kernels.exact_relu2_mul(gate, up), want)
    assert kernels.exact_relu2_mul(gate[:, ::2], up[:, ::2]) is None  # not contiguous: numpy computes it
    with pytest.raises(ValueError, match="exact_rope: x .* needs cos and sin of shape \\(6, 5\\)"):
        kernels.exact_rope(got, cos[:, :4], sin)
    with pytest.raises(ValueError, match="exact_rms: x must be \\(T, K\\) with a gain of K values"):
        kernels.exact_rms(gate, np.ones(5, np.float32), 1e-5)
