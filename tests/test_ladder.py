"""The harness tests itself: a known bug must fail at the right rung, with the right place named; a
reference that did not run must never pass."""

from __future__ import annotations

import numpy as np
import pytest
from gguf_edit import rewrite

from bitnet_ref.gguf import open_gguf
from harness.cases import Case
from harness.crossval import run_ladder
from harness.engines.registry import open_engine
from harness.tolerances import resolve

pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")

PROMPT = "The quick brown fox jumps over the lazy dog."


def case(**kw) -> Case:
    base = dict(id="self-test", file="(test)", model={"synth": {"preset": "tiny", "arch": "bitnet", "format": "tq2_0"}},
                references=["llama_cpp"], profile="llama-cpp", prompts=[PROMPT], greedy_tokens=8,
                rungs=["file", "weights", "tokens", "first_logits", "all_logits", "greedy"])
    base.update(kw)
    return Case(**base)


def tol(c: Case):
    return resolve(c.profile, c.format, case_overrides=c.tolerances, case_file=c.file)


def test_the_honest_pair_passes(tmp_path):
    c = case()
    r = run_ladder(c, "llama_cpp", tol(c), tmp_path)
    assert r.status == "pass", r.reason
    assert [x.rung for x in r.rungs][:3] == ["file", "weights", "tokens"]
    assert r.receipts["sut"]["model_sha256"] == r.receipts["reference"]["model_sha256"] == r.model["sha256"]


def test_one_flipped_weight_fails_at_logits_with_the_layer_named(tmp_path):
    """The system under test runs a copy of the model with one ternary weight flipped in layer 1's
    ffn_down (as an engine with a packing bug would): the ladder stops at a logits rung and localizes
    the difference to layer 1."""
    c = case()
    flipped = tmp_path / "flipped.gguf"

    def open_fn(name, model, profile, options):
        if name != "bitnet_ref":
            return open_engine(name, model, profile, options)
        if not flipped.exists():
            from bitnet_ref.formats import format_for

            with open_gguf(model) as gf:
                t = gf.tensor("blk.1.ffn_down.weight")
                fmt = format_for(gf, t)
                tern = fmt.unpack(gf.tensor_bytes(t), t.shape)
            values = tern.values.copy()
            values[0, 0] = 1 if values[0, 0] != 1 else -1
            data = fmt.pack(values, float(tern.scale.max()))
            rewrite(model, flipped, tensor_data={"blk.1.ffn_down.weight": data})
        return open_engine(name, flipped, profile, options)

    r = run_ladder(c, "llama_cpp", tol(c), tmp_path / "models", open_fn=open_fn)
    assert r.status == "fail" and r.failed_rung in ("first_logits", "all_logits"), r.reason
    loc = r.rungs[-1].localization
    assert loc is not None and loc["layer"] == 1 and loc["reproduced"], loc
    assert loc["op"] == "ffn_down-1"  # named at the matmul whose weight was flipped
    assert all(n["max_abs"] == 0.0 for n in loc["nodes"][:-1])  # layer 0 and layer 1 up to the op agree


def test_a_different_tokenizer_fails_at_the_tokens_rung(tmp_path):
    c = case()

    def open_fn(name, model, profile, options):
        eng = open_engine(name, model, profile, options)
        if name == "bitnet_ref":
            real = eng.tokenize
            eng.tokenize = lambda text, add_bos=True: real(text, add_bos)[:-2] + real(text, add_bos)[-1:]
        return eng

    r = run_ladder(c, "llama_cpp", tol(c), tmp_path, open_fn=open_fn)
    assert r.status == "fail" and r.failed_rung == "tokens", r.reason
    assert "differs" in r.reason


def test_a_missing_reference_is_a_skip_never_a_pass(tmp_path, monkeypatch):
    monkeypatch.delenv("BITNET_CPP_DIR", raising=False)
    c = case(model={"synth": {"preset": "tiny", "arch": "bitnet-b1.58", "format": "i2_s"}}, references=["bitnet_cpp"],
             profile="bitnet-cpp")
    r = run_ladder(c, "bitnet_cpp", tol(c), tmp_path)
    assert r.status == "skip" and "BITNET_CPP_DIR" in r.reason
    assert not any(x.rung in ("tokens", "all_logits") for x in r.rungs)


def test_a_reference_without_receipt_is_an_error(tmp_path):
    c = case()

    def open_fn(name, model, profile, options):
        eng = open_engine(name, model, profile, options)
        if name == "llama_cpp":
            eng.receipt = None
        return eng

    r = run_ladder(c, "llama_cpp", tol(c), tmp_path, open_fn=open_fn)
    assert r.status == "error" and "no receipt" in r.reason


def test_tl1_on_x86_says_why(tmp_path):
    import platform

    if platform.machine() in ("aarch64", "arm64"):
        pytest.skip("this machine is ARM: TL1 can run here")
    c = case(model={"synth": {"preset": "large-shapes", "arch": "bitnet-b1.58", "format": "tl1", "layers": 1}},
             references=["bitnet_cpp"], profile="bitnet-cpp")
    r = run_ladder(c, "bitnet_cpp", tol(c), tmp_path)
    assert r.status == "skip" and "ARM-only" in r.reason


def test_tolerance_override_is_recorded(tmp_path):
    c = case(rungs=["all_logits"])
    t = resolve(c.profile, c.format, case_overrides={}, case_file=c.file, cli_max_abs=1e-9)
    r = run_ladder(c, "llama_cpp", t, tmp_path)
    check = next(ch for ch in r.rungs[-1].checks if ch.metric == "max_abs") if r.rungs else None
    assert r.status == "fail" and r.failed_rung == "all_logits"
    assert check is not None and check.limit == 1e-9 and check.source.startswith("cli")
    assert np.isfinite(check.value)


def test_an_unreadable_model_is_an_error_record(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x07\x00\x00\x00" + b"\x00" * 32)
    c = case(model={"path": str(bad)})
    r = run_ladder(c, "llama_cpp", tol(c), tmp_path)
    assert r.status == "fail" and r.failed_rung == "file" and "unsupported-version" in r.reason
    c = case(model={"path": str(tmp_path / "missing.gguf")}, rungs=["tokens"])
    r = run_ladder(c, "llama_cpp", tol(c), tmp_path)
    assert r.status == "error" and "missing.gguf" in r.reason
