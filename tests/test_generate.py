"""Generation and scoring algorithms, on a bigram model whose answers can be computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bitnet_ref.errors import ModelError
from bitnet_ref.generate import (
    SamplingParams,
    generate,
    perplexity_llama,
    perplexity_sliding,
    pick,
    stream,
)

V = 11


class Bigram:
    """logits at a position depend only on the token there; counts forward calls for the tests."""

    def __init__(self, seed=0):
        self.table = np.random.default_rng(seed).standard_normal((V, V)).astype(np.float32) * 3
        self.calls = 0

    def new_state(self):
        return []

    def forward(self, ids, state, last_only=False):
        self.calls += 1
        state.extend(ids)
        return self.table[np.asarray(ids[-1:] if last_only else ids)]


def logp(table, a, b):
    z = table[a].astype(np.float64)
    return z[b] - z.max() - math.log(np.exp(z - z.max()).sum())


def test_greedy_follows_argmax_and_stops():
    m = Bigram()
    out = generate(m, [3], 6)
    expect, t = [], 3
    for _ in range(6):
        t = int(np.argmax(m.table[t]))
        expect.append(t)
    assert out == expect
    assert generate(m, [3], 6, stop_ids=(expect[1],)) == expect[:2]


def test_sampling_is_reproducible_and_seeded(monkeypatch):
    m = Bigram()
    p = SamplingParams(temperature=1.0, seed=7)
    assert generate(m, [1], 20, p) == generate(m, [1], 20, p)
    assert generate(m, [1], 20, p) != generate(m, [1], 20, SamplingParams(temperature=1.0, seed=8))
    monkeypatch.setenv("BITNET_SEED", "7")
    assert generate(m, [1], 20, SamplingParams(temperature=1.0)) == generate(m, [1], 20, p)
    monkeypatch.delenv("BITNET_SEED")
    monkeypatch.setenv("BITNET_DETERMINISTIC", "1")
    with pytest.raises(ValueError, match="needs a seed"):
        generate(m, [1], 3, SamplingParams(temperature=1.0))


def test_top_k_1_and_tiny_top_p_are_greedy():
    m = Bigram()
    greedy = generate(m, [2], 10)
    assert generate(m, [2], 10, SamplingParams(temperature=2.0, top_k=1, seed=3)) == greedy
    assert generate(m, [2], 10, SamplingParams(temperature=2.0, top_p=1e-9, seed=3)) == greedy


def test_top_k_restricts_choices():
    logits = np.arange(V, dtype=np.float32)
    rng = np.random.default_rng(0)
    picks = {pick(logits, SamplingParams(temperature=5.0, top_k=3), rng) for _ in range(300)}
    assert picks == {V - 1, V - 2, V - 3}


def test_stream_uses_the_kv_state_incrementally():
    m = Bigram()
    it = stream(m, [4, 5, 6], 3)
    assert len(list(it)) == 3 and m.calls == 3  # one prefill, then one call per new token but the last


def test_empty_prompt_is_an_error():
    with pytest.raises(ModelError, match="no tokens"):
        generate(Bigram(), [], 3)


def test_llama_perplexity_convention_by_hand():
    m = Bigram()
    ids = list(np.random.default_rng(1).integers(0, V, 40))
    ctx, bos = 8, 0
    s = perplexity_llama(m, ids, ctx, bos)
    total, count = 0.0, 0
    for c in range(40 // ctx):
        chunk = ids[c * ctx : (c + 1) * ctx]
        chunk[0] = bos
        for j in range(ctx // 2, ctx - 1):
            total -= logp(m.table, chunk[j], ids[c * ctx + j + 1])
            count += 1
    assert s.n_scored == count == 5 * 3
    assert s.ppl == pytest.approx(math.exp(total / count), rel=1e-6)  # float32 logits, as the tool
    assert len(s.per_chunk) == 5 and s.per_chunk[-1] == s.ppl


def test_llama_perplexity_needs_two_chunks():
    with pytest.raises(ModelError, match="at least 16 tokens"):
        perplexity_llama(Bigram(), [1] * 15, 8, 0)


@pytest.mark.parametrize("ctx,stride", [(8, 4), (8, 7), (5, 1), (64, None)])
def test_sliding_scores_every_token_once(ctx, stride):
    m = Bigram()
    ids = list(np.random.default_rng(2).integers(0, V, 37))
    s = perplexity_sliding(m, ids, ctx, stride)
    assert s.n_scored == len(ids) - 1
    # a bigram model's perplexity does not depend on context: the exact full-sequence value
    exact = -sum(logp(m.table, a, b) for a, b in zip(ids, ids[1:])) / (len(ids) - 1)
    assert s.nll == pytest.approx(exact, rel=1e-6)  # float32 logits, as the tool
    assert s.bits_per_byte(100) == pytest.approx(exact * (len(ids) - 1) / math.log(2) / 100)


def test_sliding_rejects_a_stride_that_skips_tokens():
    with pytest.raises(ValueError, match="1..ctx-1"):
        perplexity_sliding(Bigram(), [1, 2, 3], 4, 4)
