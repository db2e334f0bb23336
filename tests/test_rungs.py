"""The ladder's rungs on their failure paths, with the real Python engine on a tiny model: a reference that
stops early, a greedy divergence that is a near-tie (not a bug) and one that is not, a perplexity that
differs, NaN logits. Each must fail (or pass) for the right reason and name the position."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bitnet_ref.synth import SynthSpec, synthesize
from harness.cases import CASES_DIR, Case
from harness.crossval import _logits_rung, rung_greedy, rung_perplexity
from harness.engines.python_engine import PythonEngine
from harness.tolerances import resolve

PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synthesize(SynthSpec(preset="tiny", arch="bitnet", format="tq2_0"), tmp_path_factory.mktemp("rungs"))


@pytest.fixture(scope="module")
def engines(model):
    sut, ref = PythonEngine(model, "llama-cpp"), PythonEngine(model, "llama-cpp")
    yield sut, ref
    sut.close()
    ref.close()


def case(**kw) -> Case:
    base = dict(id="rungs", file="(test)", model={"synth": {"preset": "tiny", "arch": "bitnet", "format": "tq2_0"}},
                references=["llama_cpp"], profile="llama-cpp", prompts=[PROMPT], greedy_tokens=8,
                corpus=str(CASES_DIR / "corpus" / "small.txt"), ctx=64)
    base.update(kw)
    return Case(**base)


TOL = resolve("llama-cpp", "tq2_0")


class Patched:
    """The real engine with one operation replaced (as a reference with that behaviour would answer)."""

    def __init__(self, engine, **ops):
        self._engine, self._ops = engine, ops

    def __getattr__(self, name):
        return self._ops.get(name) or getattr(self._engine, name)


def test_a_reference_that_stops_early_fails_at_the_position_where_it_stopped(engines):
    sut, ref = engines
    ids = sut.tokenize(PROMPT)
    short = Patched(ref, generate=lambda i, n, *a: ref.generate(i, n)[:3])
    r = rung_greedy(case(), sut, short, ids, TOL)
    assert r.status == "fail" and r.first_bad_position == 3, r.detail
    assert "reference stopped after 3 tokens" in r.detail and "identical" not in r.detail
    assert r.metrics["length_a"] == 8 and r.metrics["length_b"] == 3
    # and the other way round
    r = rung_greedy(case(), Patched(sut, generate=lambda i, n, *a: sut.generate(i, n)[:5]), ref, ids, TOL)
    assert r.status == "fail" and r.first_bad_position == 5 and "sut stopped after 5 tokens" in r.detail


def _swap_at(engine, ids, j, rank):
    """The engine's greedy tokens with token j replaced by its rank-th best candidate there."""
    toks = engine.generate(ids, 8)
    row = engine.logits(ids + toks[:j])[-1]
    toks[j] = int(np.argsort(-row, kind="stable")[rank])
    return toks[: j + 1]


def test_a_divergence_on_a_near_tie_passes_and_one_far_down_the_list_fails(engines):
    sut, ref = engines
    ids = sut.tokenize(PROMPT)
    runner_up = Patched(ref, generate=lambda i, n, *a: _swap_at(ref, i, 2, 1))
    r = rung_greedy(case(), sut, runner_up, ids, TOL)
    assert r.status == "pass" and "near-tie" in r.detail and r.first_bad_position == 2, r.detail
    assert r.metrics["match_rate"] < TOL.limit("greedy_match_rate")  # passed by the near-tie rule only
    far = Patched(ref, generate=lambda i, n, *a: _swap_at(ref, i, 2, 100))
    r = rung_greedy(case(), sut, far, ids, TOL)
    assert r.status == "fail" and r.first_bad_position == 2 and "first divergence at generated token 2" in r.detail
    assert r.metrics["rank_a_in_b"] == 0 and r.metrics["rank_b_in_a"] == 100


def test_a_different_perplexity_fails_the_perplexity_rung(engines):
    sut, ref = engines
    worse = Patched(ref, perplexity=lambda i, ctx, *a: dataclasses.replace(ref.perplexity(i, ctx),
                                                                           ppl=ref.perplexity(i, ctx).ppl * 1.01))
    r = rung_perplexity(case(), sut, worse, TOL)
    assert r.status == "fail" and abs(r.metrics["ppl_rel_diff"] - 0.01 / 1.01) < 1e-9, r.detail
    assert not [c for c in r.checks if c.metric == "ppl_rel_diff"][0].passed
    assert rung_perplexity(case(), sut, ref, TOL).status == "pass"


def test_a_nan_logit_fails_and_its_position_is_named():
    b = np.random.default_rng(0).standard_normal((6, 32)).astype(np.float32)
    a = b.copy()
    a[3, 7] = np.nan
    r = _logits_rung("all_logits", a, b, None, TOL)
    assert r.status == "fail" and r.first_bad_position == 3, r.detail
    assert "first position over max_abs: 3" in r.detail and "non-finite" in r.detail
    assert r.series["max_abs_per_position"][:3] == [0.0, 0.0, 0.0]
    assert _logits_rung("all_logits", b.copy(), b, None, TOL).first_bad_position is None
