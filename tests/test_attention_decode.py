"""The native decode attention (one query row over an f16 KV cache) takes the query heads of a KV head together,
reading each K and V row once for all of them, and splits the heads over the threads in groups: bit for bit the
numpy definition for every ISA variant, every grouping, head sizes with column tails and long contexts."""

from __future__ import annotations

import numpy as np
import pytest
from test_kernels import attention_every_isa, attention_numpy, f16_cache, needs_native, same_bits

from bitnet_ref import kernels


@needs_native
@pytest.mark.parametrize("threads", ["1", "2", "3"])
@pytest.mark.parametrize("s_len", [63, 512, 513, 600])
def test_decode_2b_4t_shape(s_len, threads, monkeypatch):
    """The 2b-4t preset's attention (20 query heads over 5 KV heads of 128): whole groups of 4 (1 thread), pairs
    (2 threads: 10 items), single heads (3 threads); contexts past several 64-cell lane groups, n_kv from s_len and
    from a long context."""
    monkeypatch.setenv("BITNET_CPU_THREADS", threads)
    rng = np.random.default_rng(s_len)
    kvh, g, d = 5, 4, 128
    kc, vc = f16_cache(rng, s_len, kvh, d, 1.0), f16_cache(rng, s_len, kvh, d, 1.0)
    q = (rng.standard_normal((1, kvh * g, d)) * 3).astype(np.float32)
    for n_ctx in (s_len, 4096):
        want = attention_numpy(q, kc, vc, s_len, n_ctx)
        for isa, got in attention_every_isa(q, kc, vc, s_len, n_ctx):
            assert same_bits(got, want), (isa, n_ctx)


@needs_native
@pytest.mark.parametrize("g", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("d", [8, 24, 40, 100, 136])
def test_decode_groups_and_column_tails(d, g):
    """Head sizes that are not a multiple of 16 (columns past the 16-wide blocks) or of 64 (the dot's double tail)
    and group sizes that are not a multiple of 4 (the kernels take up to 4 heads at once)."""
    rng = np.random.default_rng(d * 10 + g)
    kvh, s_len = 2, 150
    kc, vc = f16_cache(rng, s_len, kvh, d, 1.0), f16_cache(rng, s_len, kvh, d, 1.0)
    q = (rng.standard_normal((1, kvh * g, d)) * 2).astype(np.float32)
    want = attention_numpy(q, kc, vc, s_len, 4096)
    for isa, got in attention_every_isa(q, kc, vc, s_len, 4096):
        assert same_bits(got, want), isa


@needs_native
def test_decode_threads_agree(monkeypatch):
    """Every thread count (and so every grouping of the heads into items) gives the same bits."""
    rng = np.random.default_rng(3)
    s_len, kvh, g, d = 300, 3, 4, 64
    kc, vc = f16_cache(rng, s_len, kvh, d, 1.0), f16_cache(rng, s_len, kvh, d, 1.0)
    q = rng.standard_normal((1, kvh * g, d)).astype(np.float32)
    outs = []
    for n in ("1", "2", "3", "4", "6", "12"):
        monkeypatch.setenv("BITNET_CPU_THREADS", n)
        outs.append(kernels.attention_f16(q, kc, vc, s_len, 4096))
    assert same_bits(outs[0], attention_numpy(q, kc, vc, s_len, 4096))
    assert all(same_bits(o, outs[0]) for o in outs[1:])
