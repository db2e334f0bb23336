"""Synthetic models: deterministic bytes, clean validation, and loaded by mainline llama.cpp with
logits that look like a trained model's."""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_ref.errors import FormatError
from bitnet_ref.gguf import open_gguf
from bitnet_ref.gguf.validate import validate_file
from bitnet_ref.synth import SynthSpec, synthesize

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1905, Albert Einstein published four papers that changed physics.",
    "def add(a, b):\n    return a + b\n",
    "Les élèves étudient la géométrie; 東京は日本の首都です。",
]


def test_same_arguments_give_identical_bytes(tmp_path):
    a = synthesize(SynthSpec(format="i2_s", arch="bitnet-b1.58"), tmp_path / "a")
    b = synthesize(SynthSpec(format="i2_s", arch="bitnet-b1.58"), tmp_path / "b")
    c = synthesize(SynthSpec(format="i2_s", arch="bitnet-b1.58", seed=1), tmp_path / "c")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_layer_count_does_not_change_other_tensors(tmp_path):
    one = synthesize(SynthSpec(layers=1), tmp_path)
    two = synthesize(SynthSpec(layers=2), tmp_path)
    with open_gguf(one) as g1, open_gguf(two) as g2:
        for name in ("token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"):
            np.testing.assert_array_equal(g1.tensor_bytes(name), g2.tensor_bytes(name))


@pytest.mark.parametrize("arch", ["bitnet", "bitnet-b1.58"])
@pytest.mark.parametrize("fmt", ["f32", "f16", "tq1_0", "tq2_0", "i2_s"])
def test_tiny_models_validate_clean(tmp_path, arch, fmt):
    p = synthesize(SynthSpec(arch=arch, format=fmt), tmp_path)
    assert validate_file(p) == []
    with open_gguf(p) as gf:
        assert gf.architecture == arch
        assert gf.tensor("blk.0.attn_q.weight").type_name == fmt.upper()


@pytest.mark.parametrize("fmt", ["tl1", "tl2"])
def test_large_shapes_lut_formats(tmp_path, fmt):
    p = synthesize(SynthSpec(preset="large-shapes", arch="bitnet-b1.58", format=fmt, layers=1), tmp_path)
    assert validate_file(p) == []


def test_formats_store_the_same_model(tmp_path):
    """Scales are float16-exact, so every format decodes to the same weights."""
    from bitnet_ref.formats import get_format

    decoded = {}
    for fmt in ("f32", "tq2_0", "i2_s"):
        p = synthesize(SynthSpec(format=fmt, layers=1), tmp_path)
        with open_gguf(p) as gf:
            t = gf.tensor("blk.0.ffn_down.weight")
            decoded[fmt] = get_format(t.type_id).decode(gf.tensor_bytes(t), t.shape)
    np.testing.assert_array_equal(decoded["f32"], decoded["tq2_0"])
    np.testing.assert_array_equal(decoded["f32"], decoded["i2_s"])


def test_lut_format_on_a_shape_without_kernels_is_a_clear_error(tmp_path):
    with pytest.raises(FormatError, match="preset 'tiny' cannot be stored as tl2"):
        synthesize(SynthSpec(format="tl2"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bad_spec_values(tmp_path):
    for bad, msg in [(dict(preset="huge"), "unknown preset"), (dict(format="q4_0"), "unknown format"),
                     (dict(arch="llama"), "unknown architecture"), (dict(layers=0), "at least 1")]:
        with pytest.raises(ValueError, match=msg):
            synthesize(SynthSpec(**bad), tmp_path)


@pytest.mark.llama_cpp
@pytest.mark.parametrize("fmt", ["f32", "tq1_0", "tq2_0"])
def test_mainline_llama_cpp_loads_and_logits_look_trained(tmp_path, fmt):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")
    p = synthesize(SynthSpec(arch="bitnet", format=fmt), tmp_path)
    llm = llama_cpp.Llama(model_path=str(p), logits_all=True, n_ctx=256, n_threads=2, verbose=False)
    try:
        for prompt in PROMPTS:
            llm.reset()
            toks = llm.tokenize(prompt.encode(), add_bos=True)
            llm.eval(toks)
            logits = np.asarray(llm.scores[: len(toks)])
            assert logits.shape == (len(toks), 512)
            assert np.isfinite(logits).all()
            std = logits.std(axis=1)
            assert (std > 1).all() and (std < 10).all(), std
            # a finite perplexity of the prompt under the model
            logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            nll = -logp[np.arange(len(toks) - 1), toks[1:]].mean()
            assert np.isfinite(np.exp(nll))
    finally:
        llm.close()


@pytest.mark.llama_cpp
@pytest.mark.parametrize("fmt,ftype", [("tq1_0", 36), ("tq2_0", 37)])
def test_mainline_quantizer_writes_our_tq_bytes(tmp_path, fmt, ftype):
    """llama.cpp's own llama_model_quantize turns our F32 model into TQ1_0/TQ2_0: compat-check accepts its
    file and its ternary tensors are byte-identical to what we write for the same model."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")
    src = synthesize(SynthSpec(arch="bitnet", format="f32", layers=1), tmp_path)
    ours = synthesize(SynthSpec(arch="bitnet", format=fmt, layers=1), tmp_path)
    theirs = tmp_path / f"llama-quantized-{fmt}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(theirs).encode(), params) == 0
    assert [f for f in validate_file(theirs) if f.severity == "error"] == []
    with open_gguf(ours) as a, open_gguf(theirs) as b:
        assert b.get("general.file_type") == ftype
        for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.0.ffn_gate.weight"):
            assert b.tensor(name).type_name == fmt.upper()
            np.testing.assert_array_equal(a.tensor_bytes(name), b.tensor_bytes(name))
