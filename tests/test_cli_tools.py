"""CliToolsEngine: fault handling and parsing against fake tools (every run), and the real bitnet.cpp
tools on a synthesized tiny bitnet-b1.58 I2_S model (BITNET_CPP_DIR; skipped, naming it, when unset)."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from bitnet_ref.synth import SynthSpec, synthesize
from harness.engines.base import EngineError, NotSupported, ReferenceUnavailable, require_receipt
from harness.engines.cli_tools import (
    CliToolsEngine,
    clean_cli_stdout,
    parse_kl_divergence,
    parse_perplexity,
    parse_timings,
)
from harness.engines.discovery import find_build

FAKES = Path(__file__).parent / "fake_tools"
TOOLS = ("llama-cli", "llama-perplexity", "llama-bench", "llama-tokenize")


def fake_tools(tmp_path: Path, script: str) -> dict[str, Path]:
    """Executable wrappers named like the tools that exec the fake script with this interpreter."""
    d = tmp_path / f"bin-{script}"
    d.mkdir()
    tools = {}
    for t in TOOLS:
        p = d / t
        p.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{FAKES / (script + '.py')}' \"$@\"\n")
        p.chmod(0o755)
        tools[t] = p
    return tools


@pytest.fixture
def model(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"GGUF fake model bytes")
    return p


def engine(tmp_path, model, script, **kw) -> CliToolsEngine:
    return CliToolsEngine(model, tools=fake_tools(tmp_path, script), threads=2, **kw)


def gone(pid: int, strict: bool) -> bool:
    """True when pid no longer runs. strict: not even a zombie (our own child must be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    if strict:
        return False
    try:  # a grandchild re-parented to an init that does not reap it: a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def wait_gone(pid: int, strict: bool, within: float = 3.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if gone(pid, strict):
            return True
        time.sleep(0.05)
    return gone(pid, strict)


# ---------------------------------------------------------------------------------------------- fakes


def test_well_formed_output_parses(tmp_path, model):
    e = engine(tmp_path, model, "fake_ok")
    assert e.receipt.version == "42 (fakecommit)"
    g = e.generate_text("Once upon a time", 5)
    assert g.text == " fake generated text" and g.ids == [100, 101, 102, 103, 104] and not g.ended
    assert g.timings["prompt_eval_tokens"] == 4 and g.timings["eval_runs"] == 4
    assert g.timings["load_ms"] == pytest.approx(123.45) and g.timings["total_ms"] == pytest.approx(797.80)
    assert e.receipt.timings["generate.tool_eval"] == pytest.approx(0.63389)
    assert e.receipt.timings["generate"] > 0
    assert e.tokenize("Hello world") == [1, 15043, 3186]

    p = e.perplexity("some text", ctx=64)
    assert p.per_chunk == [10.5, 11.25, 12.0] and p.ppl == 12.0 and p.uncertainty == pytest.approx(0.34567)
    assert p.n_chunks == 3 and p.n_scored == 3 * (64 - 1 - 32) and p.nll == pytest.approx(math.log(12.0))

    base = tmp_path / "base.kld"
    assert e.kl_divergence_base("text", base, ctx=64).ppl == 12.0 and base.is_file()
    k = e.kl_divergence(base, ctx=64)
    assert k.mean_kld == pytest.approx(0.0123) and k.kld["max"] == 0.5 and k.kld["median"] == 0.01
    assert k.kld["99.9"] == 0.4 and k.kld["min"] == pytest.approx(-0.00002)
    assert k.dp["95.0"] == 2.0 and k.dp["0.1"] == -4.0 and k.mean_dp == pytest.approx(-0.05)
    assert k.rms_dp == pytest.approx(1.234) and k.same_top_p == pytest.approx(97.5) and k.same_top_p_unc == 0.4
    assert k.ppl_q == 13.5 and k.ppl_base == 13.4 and [c["same_top_p"] for c in k.chunks] == [97.5, 97.5]

    b = e.bench(pp=64, tg=16)
    assert [(r.test, r.avg_ts, r.stddev_ts) for r in b] == [("pp64", 53.12, 0.67), ("tg16", 12.5, 0.67)]

    r = require_receipt("fake", e.receipt)
    assert r.artifact.endswith("llama-bench") and len(r.artifact_sha256) == 64 and len(r.model_sha256) == 64
    assert r.command[:3] == [str(e.tool("llama-bench")), "-m", str(model)] and r.threads == 2
    with pytest.raises(NotSupported, match="generate_text"):
        e.generate([1, 2], 3)
    with pytest.raises(NotSupported):
        e.perplexity([1, 2, 3], ctx=64)
    with pytest.raises(NotSupported, match="FFI"):
        e.logits([1, 2])


def test_crash_raises_with_command_and_tool_message(tmp_path, model):
    e = engine(tmp_path, model, "fake_crash")
    with pytest.raises(EngineError) as ei:
        e.generate_text("hi", 4)
    msg = str(ei.value)
    assert "exited with status 1" in msg and "llama-cli" in msg and "-n 4" in msg
    assert "error loading model: fake: unknown model architecture" in msg and "unable to load model" in msg
    with pytest.raises(EngineError, match="failed to load model"):
        e.perplexity("text", ctx=64)


def test_segfault_is_reported_by_signal(tmp_path, model):
    e = engine(tmp_path, model, "fake_segv")
    with pytest.raises(EngineError, match="killed by signal SIGSEGV") as ei:
        e.bench(pp=8, tg=8)
    assert "about to crash" in str(ei.value)


def test_garbage_output_raises_with_unparsed_tail(tmp_path, model):
    e = engine(tmp_path, model, "fake_garbage")
    for call in (lambda: e.perplexity("x", ctx=64), lambda: e.kl_divergence(tmp_path / "b", ctx=64),
                 lambda: e.bench(8, 8), lambda: e.generate_text("x", 2), lambda: e.tokenize("x")):
        with pytest.raises(EngineError, match="could not parse") as ei:
            call()
        assert "GARBAGE-TAIL-MARKER" in str(ei.value) or "blorp" in str(ei.value)


def _hang(tmp_path, model, monkeypatch, call):
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setenv("FAKE_PID_DIR", str(pids))
    e = engine(tmp_path, model, "fake_hang", timeout=1.5)
    t = time.monotonic()
    with pytest.raises(BaseException) as ei:
        call(e)
    assert time.monotonic() - t < 10
    leader, child = int((pids / "leader").read_text()), int((pids / "child").read_text())
    assert gone(leader, strict=True), "the tool outlived its call (or stayed a zombie)"
    assert wait_gone(child, strict=False), "the tool's own child outlived the call"
    return ei


def test_hang_is_killed_at_timeout_with_its_group(tmp_path, model, monkeypatch):
    ei = _hang(tmp_path, model, monkeypatch, lambda e: e.generate_text("hi", 4))
    assert ei.type is EngineError and "timed out after 1.5 s" in str(ei.value) and "hanging" in str(ei.value)


def test_interrupt_kills_the_tool(tmp_path, model, monkeypatch):
    def interrupted(e):
        def boom(*_):
            raise KeyboardInterrupt
        old = signal.signal(signal.SIGALRM, boom)
        signal.setitimer(signal.ITIMER_REAL, 0.7)
        try:
            e.perplexity("text", ctx=64, timeout=30)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    ei = _hang(tmp_path, model, monkeypatch, interrupted)
    assert ei.type is KeyboardInterrupt


def test_parsers_on_edge_cases():
    t = parse_timings("llama_perf_context_print:        eval time =       0.00 ms /     1 runs   "
                      "(    0.00 ms per token,      inf tokens per second)\n")
    assert t["eval_ms"] == 0 and t["eval_runs"] == 1 and math.isinf(t["eval_tokens_per_second"])
    assert parse_timings("nothing here") == {}
    assert parse_perplexity("[1]3.0,[2]4.0,", 128) is None
    assert parse_kl_divergence("Mean    KLD:   0.1 ± 0.0\n") is None
    assert clean_cli_stdout("abc [end of text]\n\n\n") == ("abc", True)


# ---------------------------------------------------------------------------------------------- real tools

PPL_TEXT = ("The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four papers "
            "that changed physics. def add(a, b): return a + b. Once upon a time there was a model. ") * 8


# each real build on the model format it is the reference for: bitnet.cpp's tools on I2_S, mainline's
# (LLAMA_CPP_DIR, built by `bitnet-xval reference llama.cpp`) on TQ2_0
REAL_BUILDS = {"BITNET_CPP_DIR": ("bitnet-b1.58", "i2_s", "bitnet.cpp"),
               "LLAMA_CPP_DIR": ("bitnet", "tq2_0", "llama.cpp")}


@pytest.fixture(scope="module", params=sorted(REAL_BUILDS))
def real(request, tmp_path_factory):
    try:
        build = find_build(request.param)
    except ReferenceUnavailable as e:
        pytest.skip(str(e))
    arch, fmt, name = REAL_BUILDS[request.param]
    d = tmp_path_factory.mktemp("cli-real")
    m = synthesize(SynthSpec(preset="tiny", arch=arch, format=fmt), d)
    return CliToolsEngine(m, build, threads=2, timeout=120, name=name), d


@pytest.mark.bitnet_cpp
def test_real_greedy_text(real):
    e, _ = real
    g = e.generate_text("Once upon a time", 6)
    assert g.text and g.timings["eval_runs"] == 5
    if e.name == "bitnet.cpp":  # its 2024 llama-cli still writes --logdir YAML with the token ids
        assert len(g.ids) == 6
    else:  # mainline: llama-completion, no --logdir
        assert e.completion_tool == "llama-completion" and g.ids is None
    assert e.generate_text("Once upon a time", 6).text == g.text  # greedy: deterministic
    with_bos = e.tokenize("Once upon a time")
    assert len(with_bos) > 2 and with_bos[1:] == e.tokenize("Once upon a time", add_bos=False)
    assert e.receipt.artifact.endswith("llama-tokenize") and e.receipt.timings["generate.tool_total"] > 0


@pytest.mark.bitnet_cpp
def test_real_perplexity_and_kl_divergence_against_itself(real):
    e, d = real
    p = e.perplexity(PPL_TEXT, ctx=64)
    assert math.isfinite(p.ppl) and p.ppl > 1 and p.n_chunks >= 2 and len(p.per_chunk) == p.n_chunks
    assert p.per_chunk[-1] == pytest.approx(p.ppl, rel=1e-6)
    base = d / "base.kld"
    e.kl_divergence_base(PPL_TEXT, base, ctx=64)
    k = e.kl_divergence(base, ctx=64)
    assert abs(k.mean_kld) < 1e-3 and k.kld["max"] < 1e-3  # the uint16 log-prob storage floor
    assert k.same_top_p == 100.0 and k.rms_dp < 0.1


@pytest.mark.bitnet_cpp
def test_real_bench_json(real):
    e, _ = real
    b = e.bench(pp=16, tg=4, repetitions=1)
    assert [r.test for r in b] == ["pp16", "tg4"] and all(r.avg_ts > 0 for r in b)


@pytest.mark.bitnet_cpp
def test_real_unloadable_model_carries_the_tools_message(real, tmp_path):
    e, _ = real
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(EngineError, match="(?i)failed to load model|error loading model"):
        CliToolsEngine(bad, e.build, threads=2, timeout=60).generate_text("hi", 2)


def test_threads_come_from_bitnet_cpu_threads_like_every_engine(tmp_path, model, monkeypatch):
    """The CLI adapter uses BITNET_CPU_THREADS (bitnet_ref.kernels.threads), not a count of this machine's
    cores: llama-perplexity's sums depend on the thread split."""
    monkeypatch.setenv("BITNET_CPU_THREADS", "3")
    (tmp_path / "a").mkdir()
    e = CliToolsEngine(model, tools=fake_tools(tmp_path / "a", "fake_ok"))
    assert e.threads == 3 and e.receipt.threads == 3
    e.generate_text("hi", 2)
    assert e.last_run.command[e.last_run.command.index("-t") + 1] == "3"
    monkeypatch.setenv("BITNET_CPU_THREADS", "many")
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="BITNET_CPU_THREADS='many' is not a positive integer"):
        CliToolsEngine(model, tools=fake_tools(tmp_path / "b", "fake_ok"))
