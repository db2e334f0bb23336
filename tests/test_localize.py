"""Localization that proves itself. The system under test is bitnet_ref with a planted bug, the reference
is bitnet_ref itself (both real engines, exact profile, an F32 model: bit-identical without the bug):

- a bug in layer 0's Q projection that shows only when several tokens are evaluated in one batch (rows
  mis-strided, as bitnet.cpp's TL2 kernels do for batch > 1) is named at Qcur-0, and only because the
  intermediates pass reproduces the failing call (same micro-batches);
- fed one token per micro-batch the same engine passes (the control);
- a difference the intermediates pass does not reproduce gives "inconclusive", never a place by elimination;
- logits over the absolute limit with every tensor within its relative limit give "inconclusive" too.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness.cases import Case
from harness.crossval import run_ladder
from harness.engines.registry import open_engine
from harness.tolerances import resolve

PROMPT = "The quick brown fox jumps over the lazy dog."


def case(**kw) -> Case:
    base = dict(id="localize", file="(test)", model={"synth": {"preset": "tiny", "arch": "bitnet", "format": "f32"}},
                references=["bitnet_ref"], profile="exact", prompts=[PROMPT],
                rungs=["tokens", "first_logits", "all_logits"])
    base.update(kw)
    return Case(**base)


def tol(c: Case):
    return resolve(c.profile, c.format, case_overrides=c.tolerances, case_file=c.file)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("localize-models")


def planted_batch_bug(name, model, profile, options):
    """The system under test mis-strides layer 0's Q projection rows when a batch holds several tokens."""
    engine = open_engine(name, model, profile, options)
    m = engine.model
    wq, real = m.layers[0].proj["attn_q"], m._mm

    def mm(h, w):
        out = real(h, w)
        return np.roll(out, 1, axis=0) if w is wq and out.shape[0] > 1 else out

    m._mm = mm
    return engine


def sut_only(plant):
    """open_fn that plants the bug in the system under test only (the ladder opens the reference first)."""
    opened = []

    def open_fn(name, model, profile, options):
        opened.append(name)
        if len(opened) == 1:  # the reference
            return open_engine(name, model, profile, options)
        return plant(name, model, profile, options)

    return open_fn


def test_a_batch_only_bug_is_named_at_the_matmul(models):
    c = case()
    r = run_ladder(c, "bitnet_ref", tol(c), models, open_fn=sut_only(planted_batch_bug))
    assert r.status == "fail" and r.failed_rung in ("first_logits", "all_logits"), r.reason
    loc = r.rungs[-1].localization
    assert loc["reproduced"] is True and loc["layer"] == 0 and loc["op"] == "Qcur-0", loc
    assert [n["name"] for n in loc["nodes"]] == ["attn_norm-0", "Qcur-0"] and loc["nodes"][0]["max_abs"] == 0.0
    assert "first divergence: Qcur-0" in r.reason


def test_same_micro_batches_as_the_failing_call(models):
    """Fed one token per micro-batch the bug cannot show: the pair passes. In pieces of 4 it shows, and the
    intermediates pass, made in the same pieces, reproduces the failing logits bit for bit."""
    c = case(reference_options={"n_ubatch": 1})
    r = run_ladder(c, "bitnet_ref", tol(c), models, open_fn=sut_only(planted_batch_bug))
    assert r.status == "pass", r.reason
    c = case(reference_options={"n_ubatch": 4})
    r = run_ladder(c, "bitnet_ref", tol(c), models, open_fn=sut_only(planted_batch_bug))
    loc = r.rungs[-1].localization
    assert r.status == "fail" and loc["reproduced"] is True and loc["op"] == "Qcur-0", (r.reason, loc)


def test_a_failure_the_pass_does_not_reproduce_is_inconclusive(models):
    """The logits call differs (as a reference whose eval-callback pass computes otherwise would): the
    localization says so instead of blaming the output norm or the lm_head by elimination."""
    def plant(name, model, profile, options):
        engine = open_engine(name, model, profile, options)
        real = engine.logits

        def logits(ids):
            out = real(ids).copy()
            out[0, 3] += 1.0
            return out

        engine.logits = logits
        return engine

    c = case()
    r = run_ladder(c, "bitnet_ref", tol(c), models, open_fn=sut_only(plant))
    loc = r.rungs[-1].localization
    assert r.status == "fail" and r.failed_rung == "first_logits", r.reason
    assert loc["op"] is None and loc["reproduced"] is False and loc["nodes"] == []
    assert "inconclusive: the sut's intermediates pass does not reproduce its failing logits call" in loc["note"]
    assert "lm_head" not in r.reason and "output norm" not in r.reason


def test_logits_over_the_absolute_limit_only_is_inconclusive(models):
    """A tiny shift of one logit everywhere (in the forward pass, so the intermediates pass reproduces it)
    breaks max_abs = 1e-6 but stays within max_rel of the logits' scale: no tensor is named."""
    def plant(name, model, profile, options):
        engine = open_engine(name, model, profile, options)
        real = engine.model._lm_head

        def lm_head(x):
            out = np.array(real(x), dtype=np.float32)
            out[:, 5] += np.float32(4e-6)
            return out

        engine.model._lm_head = lm_head
        return engine

    c = case(tolerances={"max_abs": 1e-6})
    r = run_ladder(c, "bitnet_ref", tol(c), models, open_fn=sut_only(plant))
    loc = r.rungs[-1].localization
    assert r.status == "fail" and r.failed_rung == "first_logits", r.reason
    assert loc["reproduced"] is True and loc["op"] is None, loc
    assert "no captured tensor (result_output included) differs by more than 1e-05 of its scale" in loc["note"]
    assert [n["name"] for n in loc["nodes"]][-2:] == ["result_norm", "result_output"]
    assert all(n["max_abs"] == 0.0 for n in loc["nodes"][:-1])


def test_bitnet_cpp_tl2_batch_bug_is_named_at_its_first_matmul(tmp_path):
    """The issue's case: bitnet.cpp's TL2 kernels mis-stride a batch of several tokens. The ladder fails at
    first_logits, and localization (the TL2 build runs in its own process; intermediates over JSON lines)
    reproduces the failing call and names layer 0's Q projection, the first TL2 matmul."""
    import os

    from harness.cases import load_cases

    if not os.environ.get("BITNET_CPP_TL2_DIR"):
        pytest.skip("BITNET_CPP_TL2_DIR is not set: no bitnet.cpp build with TL2 kernels here")
    c = next(x for x in load_cases() if x.id == "tl2-bitnet-b1.58-large-shapes")
    r = run_ladder(c, "bitnet_cpp_tl2", tol(c), tmp_path)
    loc = r.rungs[-1].localization
    assert r.status == "fail" and r.failed_rung == "first_logits", r.reason
    assert loc["reproduced"] is True and loc["op"] == "Qcur-0" and loc["nodes"][0]["max_abs"] == 0.0, loc
