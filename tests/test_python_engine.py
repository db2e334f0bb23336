"""The Python engine behind the Engine protocol, and the `run` / `score` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf_edit import rewrite

from bitnet_ref.synth import SynthSpec, synthesize
from harness.cli import main
from harness.engines.base import EngineError, Sampling, file_sha256, require_receipt
from harness.engines.python_engine import PythonEngine

TEXT = "The quick brown fox jumps over the lazy dog. " * 30


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synthesize(SynthSpec(arch="bitnet", format="tq2_0", layers=1), tmp_path_factory.mktemp("m"))


def test_engine_runs_and_leaves_a_receipt(model):
    with PythonEngine(model, "llama-cpp") as e:
        ids = e.tokenize("Hello world")
        assert ids[0] == e.tokenizer.bos_id and e.detokenize(ids[1:]) == "Hello world"
        logits = e.logits(ids)
        assert logits.shape == (len(ids), 512) and logits.dtype == np.float32 and np.isfinite(logits).all()
        out = e.generate(ids, 5)
        assert out == e.generate(ids, 5) and len(out) <= 5
        assert out[0] == int(np.argmax(logits[-1]))
        sampled = e.generate(ids, 5, Sampling(temperature=1.0, seed=3))
        assert sampled == e.generate(ids, 5, Sampling(temperature=1.0, seed=3))
        # sampling is used: seeds give different continuations, top_k=1 is greedy, top_k bounds every pick
        hot = {tuple(e.generate(ids, 5, Sampling(temperature=2.0, seed=s))) for s in range(8)}
        assert len(hot) > 1  # an engine that ignored sampling would give the greedy text eight times
        assert e.generate(ids, 5, Sampling(temperature=2.0, top_k=1, seed=5)) == out
        top3 = e.generate(ids, 5, Sampling(temperature=5.0, top_k=3, seed=7))
        for i, tok in enumerate(top3):
            row = e.logits(ids + top3[:i])[-1]
            assert np.count_nonzero(row > row[tok]) < 3, (i, tok)
        r = require_receipt("bitnet_ref", e.receipt)
        assert r.model_sha256 == file_sha256(model) and r.profile == "llama-cpp" and r.engine == "bitnet_ref"
        assert {"tokenize", "logits", "generate"} <= set(r.timings)


def test_engine_perplexity_conventions(model):
    with PythonEngine(model) as e:
        ids = e.tokenize(TEXT)
        a = e.perplexity(ids, 64)
        b = e.perplexity(ids, 64, "sliding")
        assert a.convention == "llama-perplexity" and np.isfinite(a.ppl) and a.n_scored == (len(ids) // 64) * 31
        assert b.n_scored == len(ids) - 1 and np.isfinite(b.ppl)
        with pytest.raises(EngineError, match="unknown perplexity convention"):
            e.perplexity(ids, 64, "wikitext")


def test_engine_errors_are_clear(model, tmp_path):
    with PythonEngine(model) as e:
        with pytest.raises(EngineError, match="outside the vocabulary"):
            e.logits([1, 99999])
        with pytest.raises(EngineError, match="non-empty"):
            e.logits([])
    bad = rewrite(model, tmp_path / "bad.gguf", set_keys={"general.architecture": "llama"})
    with pytest.raises(EngineError, match="not a BitNet architecture"):
        PythonEngine(bad)


def test_strict_tokenizers_name_the_missing_key(model, tmp_path, monkeypatch):
    bare = rewrite(model, tmp_path / "bare.gguf", drop_keys={"tokenizer.ggml.merges"})
    monkeypatch.setenv("BITNET_STRICT_TOKENIZERS", "1")
    with pytest.raises(Exception, match="tokenizer.ggml.merges"):
        PythonEngine(bare)


def test_run_command_json_with_metrics(model, capsys):
    assert main(["run", "--model", str(model), "--prompt", "Once upon a time", "-n", "6", "--metrics",
                 "--format", "json", "--profile", "llama-cpp"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["ids"]) <= 6 and doc["receipt"]["profile"] == "llama-cpp"
    m = doc["metrics"]
    assert m["prompt_tokens"] == len(doc["prompt_ids"]) and m["prefill_s"] > 0 and m["peak_rss_mb"] > 0


def test_run_prompt_longer_than_context(model, capsys):
    long = "word " * 600  # over the tiny preset's 512-token context
    assert main(["run", "--model", str(model), "--prompt", long, "-n", "4"]) == 2
    assert "pass --truncate" in capsys.readouterr().err
    assert main(["run", "--model", str(model), "--prompt", long, "-n", "4", "--truncate", "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["prompt_ids"]) == 512 - 4


def test_run_unknown_profile_and_missing_model(model, tmp_path, capsys):
    assert main(["run", "--model", str(model), "--prompt", "x", "--profile", "fast"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(["run", "--model", str(tmp_path / "none.gguf"), "--prompt", "x"]) == 2


def test_score_command(model, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    assert main(["score", "--model", str(model), "--file", str(corpus), "--ctx", "64", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["convention"] == "llama-perplexity" and np.isfinite(doc["ppl"]) and doc["per_chunk"][-1] == doc["ppl"]
    assert main(["score", "--model", str(model), "--file", str(corpus), "--ctx", "4096"]) == 2
    assert "at least 8192 tokens" in capsys.readouterr().err


def test_unknown_tensor_type_is_named(model, tmp_path):
    import shutil

    from gguf_edit import directory_field, patch

    p = tmp_path / "t99.gguf"
    shutil.copy(model, p)
    patch(p, directory_field(p, "blk.0.attn_v.weight", "type"), "<I", 99)
    with pytest.raises(EngineError, match="blk.0.attn_v.weight.*type id 99"):
        PythonEngine(p)
