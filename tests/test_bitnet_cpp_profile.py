"""The "bitnet-cpp" numerics profile against bitnet.cpp itself (its libllama in-process, BITNET_CPP_DIR).

Measured on a synthesized tiny `bitnet-b1.58` I2_S model with bitnet.cpp's x86 (AVX-512) I2_S build: the
logits of a 128-token prompt are bit-identical at every position (the "exact" profile is ~0.4 off), and so
is every single-token decode step, so 64-token greedy continuations agree. The I2_S kernel's int16 lane
wrap is checked against an int64 reference here (it is off in the profile: no real activation reaches it).
"""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_ref.formats.activations import quantize_i8_s
from bitnet_ref.ggml_ref import i2s_dot_i8_s_ggml
from bitnet_ref.model import Model, _rms
from bitnet_ref.synth import SynthSpec, synthesize
from harness.engines.base import ReferenceUnavailable
from harness.engines.discovery import find_build

T_PROMPT, N_GEN = 128, 64


@pytest.fixture(scope="module")
def fork(tmp_path_factory):
    try:
        find_build("BITNET_CPP_DIR").library("llama")
    except ReferenceUnavailable as e:
        pytest.skip(f"needs a bitnet.cpp build in BITNET_CPP_DIR: {e}")
    from harness.engines.llama_ffi import LlamaLibEngine

    model = synthesize(SynthSpec(arch="bitnet-b1.58", format="i2_s"), tmp_path_factory.mktemp("bcp"))
    with LlamaLibEngine(model, name="bitnet.cpp") as eng:
        rng = np.random.default_rng(7)
        ids = eng.tokenize("")[:1] + [int(i) for i in rng.integers(3, eng.n_vocab, T_PROMPT - 1)]
        yield model, eng, ids


@pytest.mark.bitnet_cpp
def test_prompt_logits_bit_identical(fork):
    model, eng, ids = fork
    ref = eng.logits(ids)
    with Model.load(model, "bitnet-cpp") as m:
        ours = m.logits(ids)
    with Model.load(model, "exact") as m:
        exact = m.logits(ids)
    assert ours.shape == ref.shape == (T_PROMPT, 512)
    per_pos = np.abs(ours - ref).max(axis=1)
    assert per_pos.max() <= 1e-4, per_pos
    assert per_pos.max() == 0.0  # what it measures today: every logit bit for bit
    assert np.abs(exact - ref).max() > 1e-2  # the profile is what closes the gap


@pytest.mark.bitnet_cpp
def test_first_nodes_bit_identical(fork):
    """Localizes a regression: ggml's float32 rms_norm, then the I2_S x I8_S product."""
    model, eng, ids = fork
    ids = ids[:24]
    got = eng.intermediates(ids, ["attn_norm-0", "Qcur-0#0"])
    with Model.load(model, "bitnet-cpp") as m:
        h = _rms(m.embed(np.asarray(ids)), m.layers[0].norms["attn_norm"], m.cfg.rms_eps, True)
        np.testing.assert_array_equal(h, got["attn_norm-0"])
        np.testing.assert_array_equal(m._mm(h, m.layers[0].proj["attn_q"]), got["Qcur-0#0"])


@pytest.mark.bitnet_cpp
def test_decode_steps_and_greedy_identical(fork):
    model, eng, ids = fork
    ref = eng.generate(ids, N_GEN)
    with Model.load(model, "bitnet-cpp") as m:
        st = m.new_state()
        last = m.forward(ids, st, last_only=True)[-1]  # llama-cli's prompt: only the last logits
        ours = []
        for _ in range(N_GEN):
            ours.append(int(np.argmax(last)))
            last = m.forward([ours[-1]], st)[-1]
    assert len(ref) == N_GEN and ours == ref
    # one decode step's logits, bit for bit (single-row paths: gemv, vec_dot_f16 on f16 probabilities)
    eng._clear()
    eng._decode(ids, 0, False)
    step = eng._decode([ref[0]], len(ids), False)[-1]
    with Model.load(model, "bitnet-cpp") as m:
        st = m.new_state()
        m.forward(ids, st)
        np.testing.assert_array_equal(m.forward([ref[0]], st)[-1], step)


@pytest.mark.bitnet_cpp
def test_last_only_prompt_logits_bit_identical(fork):
    """Only the last logits asked for (llama-cli, llama-bench): bitnet.cpp's last layer keeps one row for its
    FFN and its F16 lm_head takes the one-row path; forward(last_only=True) computes the same bits."""
    model, eng, ids = fork
    eng._clear()
    ref = eng._decode(ids, 0, False)
    with Model.load(model, "bitnet-cpp") as m:
        ours = m.forward(ids, m.new_state(), last_only=True)
        every = m.forward(ids, m.new_state())
    assert ref.shape == ours.shape == (1, m.cfg.vocab)
    np.testing.assert_array_equal(ours, ref)
    assert not np.array_equal(every[-1:], ref)  # the every-row run's last row is computed differently


def test_i2s_int16_wrap_option():
    rng = np.random.default_rng(3)
    values = rng.integers(-1, 2, size=(8, 4096 + 256), dtype=np.int8)
    x = rng.standard_normal((3, values.shape[1])).astype(np.float32)
    q, s = quantize_i8_s(x)
    plain = i2s_dot_i8_s_ggml(q, s, values, np.float32(0.5))
    wrapped = i2s_dot_i8_s_ggml(q, s, values, np.float32(0.5), int16_wrap=True)
    np.testing.assert_array_equal(plain, wrapped)  # ordinary activations never reach ±32768 per lane
    # an extreme row: every value +127 against all +1 weights: each lane sums 32 blocks x 8 x 2 x 127 = 65024
    q2 = np.full((1, 4096), 127, np.int8)
    v2 = np.ones((1, 4096), np.int8)
    exact = i2s_dot_i8_s_ggml(q2, np.ones(1, np.float32), v2, np.float32(1))
    wrap = i2s_dot_i8_s_ggml(q2, np.ones(1, np.float32), v2, np.float32(1), int16_wrap=True)
    assert exact[0, 0] == 4096 * 127
    lane = (65024 + 32768) % 65536 - 32768  # -512
    assert wrap[0, 0] == 16 * lane - 4096 * 127


@pytest.mark.bitnet_cpp
def test_perplexity_equals_llama_perplexity_to_its_printed_precision(fork, tmp_path):
    """`score` in the llama-perplexity convention gives bitnet.cpp's llama-perplexity's number on the same file
    and text to its printed precision: within one unit of the 4th decimal (this tiny model's PPL is ~3e5, so
    ~4e-10 relative). Not always the same digits: the tool adds its per-token log-probs in per-thread partial
    sums whose order depends on scheduling, so a value ~1e-11 from a rounding tie may print either way."""
    from pathlib import Path

    from harness.engines.cli_tools import CliToolsEngine
    from harness.engines.python_engine import PythonEngine

    model, _, _ = fork
    text = (Path(__file__).parents[1] / "README.md").read_text() * 2
    with CliToolsEngine(model, find_build("BITNET_CPP_DIR")) as tool:
        theirs = tool.perplexity(text, 128)
    with PythonEngine(model, "bitnet-cpp") as ours:
        mine = ours.perplexity(ours.tokenize(text), 128)
    assert mine.n_scored == theirs.n_scored
    assert abs(mine.ppl - theirs.ppl) <= 1.5e-4
    assert len(mine.per_chunk) == len(theirs.per_chunk)
    # running values: at most one unit in the last printed digit (a sum order away from a rounding tie)
    assert np.abs(np.array(mine.per_chunk) - np.array(theirs.per_chunk)).max() <= 1.5e-4
