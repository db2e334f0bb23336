"""The libllama FFI adapter against its own references: mainline through llama-cpp-python (same library,
same settings: every run where llama-cpp-python is installed), bitnet.cpp's fork against its llama-cli
(where BITNET_CPP_DIR names a build), and its error paths."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf_edit import rewrite

from bitnet_ref.synth import SynthSpec, synthesize
from harness.engines.base import EngineError, NotSupported, ReferenceUnavailable, Sampling
from harness.engines.discovery import find_build
from harness.engines.llama_ffi import FORK, MAINLINE, LlamaLibEngine, mainline_library

PROMPT = ("The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four papers "
          "that changed physics; def add(a, b): return a + b")


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("ffi")
    return {fmt: synthesize(SynthSpec(arch="bitnet", format=fmt), d) for fmt in ("tq2_0", "tq1_0", "f32")}


# ---- mainline: the same library as llama-cpp-python, compared with llama-cpp-python itself ----------
@pytest.mark.llama_cpp
@pytest.mark.parametrize("fmt", ["tq2_0", "tq1_0", "f32"])
def test_mainline_matches_llama_cpp_python(llama_cpp, models, fmt):
    model = models[fmt]
    with LlamaLibEngine(model, threads=2, n_ctx=256) as eng:
        llm = llama_cpp.Llama(model_path=str(model), logits_all=True, flash_attn=False, n_ctx=256, n_batch=256,
                              n_ubatch=256, n_threads=2, n_threads_batch=2, type_k=0, type_v=0, verbose=False)
        try:
            ids = eng.tokenize(PROMPT)
            assert ids == llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
            assert 50 <= len(ids) <= 100
            ours = eng.logits(ids)
            llm.reset()
            llm.eval(ids)
            theirs = np.asarray(llm.scores[: len(ids)], np.float32)
            assert ours.shape == theirs.shape == (len(ids), 512) and ours.dtype == np.float32
            assert np.abs(ours - theirs).max() <= 1e-6
            # greedy continuation: llama-cpp-python's own sampler at temperature 0
            gen = eng.generate(ids, 32)
            ref = []
            for tok in llm.generate(ids, temp=0.0, reset=True):
                ref.append(tok)
                if len(ref) == 32:
                    break
            assert gen == ref
            assert eng.detokenize(gen) == llm.detokenize(gen).decode("utf-8", "replace")
        finally:
            llm.close()


@pytest.mark.llama_cpp
def test_mainline_receipt_and_generation(llama_cpp, models):
    model = models["tq2_0"]
    with LlamaLibEngine(model) as eng:
        ids = eng.tokenize("hello world")
        eng.logits(ids)
        eng.generate(ids, 2)
        r = eng.receipt
        assert eng.generation == MAINLINE
        assert r.engine == "llama.cpp" and r.device == "cpu" and r.threads == 2 and r.profile == "llama-cpp"
        assert r.model == str(model) and r.model_sha256 == sha256(model)
        assert r.artifact == str(mainline_library().resolve()) and r.artifact_sha256 == sha256(r.artifact)
        assert r.version.startswith("mainline ") and "AVX" in r.version  # llama_version + system info
        assert {"load", "tokenize", "logits", "generate"} <= set(r.timings)
        info = eng.info()
        assert info.name == "llama.cpp" and "intermediates" in info.operations
        with pytest.raises(NotSupported):
            eng.generate(ids, 2, Sampling(temperature=0.8))


@pytest.mark.llama_cpp
def test_mainline_intermediates_layer0(llama_cpp, models):
    with LlamaLibEngine(models["tq2_0"]) as eng:
        ids = eng.tokenize(PROMPT)
        T = len(ids)
        got = eng.intermediates(ids, ["attn_norm-0", "attn_sub_norm-0", "ffn_sub_norm-0", "l_out-0", "Qcur-0#0",
                                      "Qcur-0", "result_output"])
        assert got["attn_norm-0"].shape == (T, 256) and got["l_out-0"].shape == (T, 256)
        assert got["attn_sub_norm-0"].shape == (T, 256)
        assert got["ffn_sub_norm-0"].shape == (T, 512)
        assert got["Qcur-0#0"].shape == (T, 256)  # the projection; the last "Qcur-0" is after RoPE
        assert got["Qcur-0"].shape == (T, 4, 64)
        assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in got.values())
        # reading the graph does not change what it computes
        np.testing.assert_array_equal(got["result_output"], eng.logits(ids))
        nodes = eng.graph_nodes(ids)
        assert nodes[-1] == "result_output" and "ffn_sub_norm-1" in nodes
        with pytest.raises(EngineError, match="no node"):
            eng.intermediates(ids, ["no-such-node"])
        assert set(eng.intermediates(ids, ["l_out-0", "no-such-node"], missing_ok=True)) == {"l_out-0"}


def test_mainline_intermediates_in_micro_batches(llama_cpp, models):
    """With n_ubatch the prompt is several graph evaluations: every tensor's rows come from all of them, and
    the captured logits are the logits call's, bit for bit (what localization checks)."""
    with LlamaLibEngine(models["tq2_0"], n_ubatch=3) as eng:
        ids = eng.tokenize(PROMPT)
        got = eng.intermediates(ids, ["Qcur-0", "l_out-1", "result_output"])
        assert got["Qcur-0"].shape == (len(ids), 4, 64) and got["l_out-1"].shape == (len(ids), 256)
        np.testing.assert_array_equal(got["result_output"], eng.logits(ids))


@pytest.mark.llama_cpp
def test_mainline_perplexity_convention(llama_cpp, models):
    with LlamaLibEngine(models["tq2_0"], n_ctx=128) as eng:
        ids = (eng.tokenize(PROMPT, add_bos=False) * 3)[:128]
        ppl = eng.perplexity(ids, ctx=64)
        assert ppl.n_scored == 2 * 31 and len(ppl.per_chunk) == 2 and ppl.convention == "llama-perplexity"
        # the same by hand: BOS replaces each chunk's first token, only the second half is scored
        bos = eng.tokenize("")[0]
        nll = []
        for c in range(2):
            chunk = [bos] + ids[c * 64 + 1:(c + 1) * 64]
            lg = eng.logits(chunk).astype(np.float64)
            logp = lg - np.logaddexp.reduce(lg, axis=1, keepdims=True)
            nll += [-logp[j, chunk[j + 1]] for j in range(32, 63)]
        assert ppl.nll == pytest.approx(np.mean(nll), rel=1e-9)
        assert ppl.ppl == pytest.approx(np.exp(np.mean(nll)), rel=1e-9)


# ---- error paths --------------------------------------------------------------------------------------
def test_library_that_is_not_a_library(tmp_path, models):
    fake = tmp_path / "libllama.so"
    fake.write_text("not an ELF file")
    with pytest.raises(EngineError, match=r"cannot load .*libllama.so.*LLAMA_CPP_LIB"):
        LlamaLibEngine(models["tq2_0"], fake)
    with pytest.raises(EngineError, match="BITNET_CPP_DIR"):
        LlamaLibEngine(models["tq2_0"], tmp_path / "missing.so", name="bitnet.cpp")


def test_mainline_library_names_its_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_CPP_LIB", str(tmp_path / "nowhere" / "libllama.so"))
    with pytest.raises(EngineError, match="LLAMA_CPP_LIB"):
        mainline_library()


@pytest.mark.llama_cpp
def test_library_without_the_symbols(llama_cpp, models):
    libggml = mainline_library().parent / "libggml.so"
    with pytest.raises(EngineError, match="llama_model_load_from_file.*llama_load_model_from_file"):
        LlamaLibEngine(models["tq2_0"], libggml)


@pytest.mark.llama_cpp
def test_model_the_library_refuses_carries_its_message(llama_cpp, models, tmp_path):
    bad = rewrite(models["tq2_0"], tmp_path / "llama-arch.gguf", set_keys={"general.architecture": "llama"})
    with pytest.raises(EngineError, match="key not found in model: llama"):
        LlamaLibEngine(bad)
    # a bitnet.cpp-only format on mainline: the library names the tensor it cannot read
    i2s = synthesize(SynthSpec(arch="bitnet-b1.58", format="i2_s", layers=1), tmp_path)
    with pytest.raises(EngineError, match="blk.0.attn_q.weight"):
        LlamaLibEngine(i2s)
    # an architecture mainline does not know
    b158 = synthesize(SynthSpec(arch="bitnet-b1.58", format="f32", layers=1), tmp_path)
    with pytest.raises(EngineError, match="unknown model architecture: 'bitnet-b1.58'"):
        LlamaLibEngine(b158)


# ---- bitnet.cpp's fork --------------------------------------------------------------------------------
def build_or_skip():
    try:
        build = find_build("BITNET_CPP_DIR")
        build.library("llama")
        return build
    except ReferenceUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def fork_model(tmp_path_factory):
    build = build_or_skip()
    return build, synthesize(SynthSpec(arch="bitnet-b1.58", format="i2_s"), tmp_path_factory.mktemp("fork"))


@pytest.mark.bitnet_cpp
def test_fork_logits_and_receipt(fork_model):
    build, model = fork_model
    with LlamaLibEngine(model, name="bitnet.cpp") as eng:
        assert eng.generation == FORK
        ids = eng.tokenize(PROMPT)
        lg = eng.logits(ids)
        assert lg.shape == (len(ids), 512) and lg.dtype == np.float32 and np.isfinite(lg).all()
        assert (lg.std(axis=1) > 1).all()
        r = eng.receipt
        assert r.engine == "bitnet.cpp" and r.profile == "bitnet-cpp" and r.model_sha256 == sha256(model)
        assert r.artifact == str(build.library("llama").resolve()) and r.artifact_sha256 == sha256(r.artifact)
        assert r.version.startswith(FORK)


@pytest.mark.bitnet_cpp
def test_fork_greedy_equals_llama_cli(fork_model):
    build, model = fork_model
    prompt, n = "Once upon a time", 16
    cmd = [str(build.tool("llama-cli")), "-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0", "-t", "2",
           "--seed", "1"]
    r = subprocess.run(cmd, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    with LlamaLibEngine(model, name="bitnet.cpp") as eng:
        ids = eng.tokenize(prompt)
        gen = eng.generate(ids, n)
        assert len(gen) == n
        ours = b"".join(eng.token_piece(t) for t in ids + gen)  # llama-cli echoes the prompt (no BOS)
    # llama-cli ends its output with newlines of its own
    assert r.stdout.startswith(ours) and r.stdout[len(ours):].strip(b"\n") == b"", (r.stdout, ours)


@pytest.mark.bitnet_cpp
def test_fork_refused_model_carries_its_message(fork_model, tmp_path):
    _, model = fork_model
    bad = rewrite(model, tmp_path / "llama-arch.gguf", set_keys={"general.architecture": "llama"})
    with pytest.raises(EngineError, match=r"(?s)bitnet\.cpp .*key not found in model: llama\.context_length"):
        LlamaLibEngine(bad, name="bitnet.cpp")


@pytest.mark.bitnet_cpp
def test_fork_intermediates_layer0(fork_model):
    _, model = fork_model
    with LlamaLibEngine(model, name="bitnet.cpp") as eng:
        ids = eng.tokenize(PROMPT)
        T = len(ids)
        got = eng.intermediates(ids, ["inp_embd", "attn_norm-0", "attn_sub_norm-0", "ffn_sub_norm-0", "l_out-0",
                                      "result_output"])
        assert got["inp_embd"].shape == (T, 256) and got["attn_norm-0"].shape == (T, 256)
        assert got["attn_sub_norm-0"].shape == (T, 256) and got["l_out-0"].shape == (T, 256)
        assert got["ffn_sub_norm-0"].shape == (T, 512)
        np.testing.assert_array_equal(got["result_output"], eng.logits(ids))
