"""JsonlEngine against tests/jsonl_example_engine.py: the handshake, round trips equal to the direct
results (toy backend always; llama-cpp-python when installed), and faults with no process left over."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bitnet_ref.synth import SynthSpec, synthesize
from harness.engines.base import EngineError, NotSupported, Sampling, file_sha256, require_receipt
from harness.engines.jsonl import JsonlEngine

EXAMPLE = Path(__file__).parent / "jsonl_example_engine.py"
sys.path.insert(0, str(Path(__file__).parent))
import jsonl_example_engine as example  # noqa: E402


def command(model, *extra, backend="toy"):
    return [sys.executable, str(EXAMPLE), "--model", str(model), "--backend", backend, *extra]


@pytest.fixture
def model(tmp_path):
    p = tmp_path / "toy.gguf"
    p.write_bytes(b"toy model")
    return p


def reaped(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_handshake_and_receipt(model):
    with JsonlEngine(command(model), model, timeout=20) as e:
        info = e.info()
        assert info.name == "toy-bytes" and info.version == "1.0" and "logits" in info.operations
        r = require_receipt("toy", e.receipt)
        assert r.artifact == str(EXAMPLE.resolve()) and r.artifact_sha256 == file_sha256(EXAMPLE)
        assert r.command == command(model) and r.threads == 2 and len(r.model_sha256) == 64
        pid = e.pid
    assert reaped(pid)


def test_toy_round_trips_equal_direct(model):
    toy = example.Toy(str(model))
    with JsonlEngine(command(model), model, timeout=20) as e:
        ids = e.tokenize("héllo")
        assert ids == toy.tokenize("héllo", True) and e.tokenize("hi", add_bos=False) == [104, 105]
        assert e.detokenize(ids) == "héllo"
        np.testing.assert_array_equal(e.logits(ids), toy.logits(ids))
        e.npy_threshold = 0  # the .npy path for large logits
        np.testing.assert_array_equal(e.logits(ids), toy.logits(ids))
        assert e.generate(ids, 4) == example.handle(toy, {"op": "generate", "ids": ids, "n": 4})["ids"]
        p = e.perplexity(list(range(64)) * 2, ctx=32)
        assert p.n_scored == 4 * 15 and len(p.per_chunk) == 4 and np.isfinite(p.ppl)
        with pytest.raises(NotSupported, match="convention"):
            e.perplexity([1] * 64, ctx=32, convention="sliding")
        assert e.receipt.timings["logits"] > 0 and e.receipt.timings["logits.engine_compute"] > 0


@pytest.mark.parametrize("fault,match", [("crash", "(?s)closed its stdout.*exit status 3"),
                                         ("segv", "killed by signal SIGSEGV"),
                                         ("garbage", "not a JSON object: 'this is not json"),
                                         ("wrongid", "request 2 \\(logits\\) with id 1002"),
                                         ("hang", "timed out after 1 s")])
def test_faults_kill_the_engine(model, fault, match):
    e = JsonlEngine(command(model, "--fault", fault, "--fault-op", "logits"), model, timeout=1)
    try:
        assert e.tokenize("ok") == [256, 111, 107]  # the fault comes on logits only
        with pytest.raises(EngineError, match=match) as ei:
            e.logits([256, 1, 2])
        assert f"fault {fault} on logits" in str(ei.value)  # the stderr tail
        assert reaped(e.pid), "the engine process outlived the failure"
        with pytest.raises(EngineError, match="engine is closed"):
            e.tokenize("again")
    finally:
        e.close()


def test_error_response_keeps_engine_usable(model):
    with JsonlEngine(command(model, "--fault", "error"), model, timeout=10) as e:
        with pytest.raises(EngineError, match="injected failure"):
            e.tokenize("x")
        assert e.tokenize("x") == [256, 120]
        with pytest.raises(NotSupported, match="greedy"):
            e.generate([256], 2, Sampling(temperature=0.8))
        pid = e.pid
    assert reaped(pid)


def test_interrupt_during_request_kills(model, tmp_path):
    e = JsonlEngine(command(model, "--fault", "hang"), model, timeout=30)

    def boom(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    t = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            e.logits([256, 1])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        e.close()
    assert time.monotonic() - t < 5 and reaped(e.pid)


def test_unstartable_and_unloadable(model, tmp_path):
    with pytest.raises(EngineError, match="cannot start"):
        JsonlEngine([str(tmp_path / "no-such-engine")], model)
    with pytest.raises(EngineError, match="does not exist"):
        JsonlEngine(command(model), tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")
    with pytest.raises(EngineError, match="cannot load"):
        JsonlEngine(command(bad, backend="llama"), bad, timeout=30)


@pytest.mark.llama_cpp
def test_llama_cpp_round_trips_equal_direct(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")
    m = synthesize(SynthSpec(preset="tiny", arch="bitnet", format="tq2_0"), tmp_path)
    text = "Once upon a time there was a tiny model"
    llm = llama_cpp.Llama(model_path=str(m), logits_all=True, n_ctx=example.N_CTX, n_threads=example.THREADS,
                          verbose=False, flash_attn=False, type_k=0, type_v=0)
    try:
        ids = llm.tokenize(text.encode(), add_bos=True)
        llm.eval(ids)
        direct = np.asarray(llm.scores[: len(ids)], dtype=np.float32).copy()
        greedy, cur = [], list(ids)
        for _ in range(5):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            greedy.append(nxt)
            cur.append(nxt)
            llm.eval([nxt])
        detok = llm.detokenize(ids[1:]).decode("utf-8", "replace")
    finally:
        llm.close()
    with JsonlEngine(command(m, backend="llama"), m, timeout=60) as e:
        assert e.info().name == "llama-cpp-python" and e.receipt.version.startswith("llama-cpp-python")
        assert e.tokenize(text) == ids and e.detokenize(ids[1:]) == detok
        got = e.logits(ids)
        assert got.shape == direct.shape
        np.testing.assert_array_equal(got, direct)  # the same library, threads and batch: bit-identical
        assert e.generate(ids, 5) == greedy
        assert e.receipt.artifact is None or Path(e.receipt.artifact).name == "libllama.so"
