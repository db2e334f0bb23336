"""Every crasher the fuzz properties found, replayed: tests/fuzz_corpus/*.json. Each entry names the
property, the mutations (as the property's strategy draws them) and the finding code the file must now give.
Add an entry for each new crasher (the falsifying example hypothesis prints)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_fuzz_gguf import apply, exercise, header_size, valid_bytes

from bitnet_ref.errors import ModelError
from bitnet_ref.gguf import open_gguf
from bitnet_ref.gguf.validate import validate

CORPUS = Path(__file__).parent / "fuzz_corpus"
GGUF_CASES = sorted(CORPUS.glob("gguf-*.json"))


@pytest.mark.parametrize("case", GGUF_CASES, ids=[p.stem for p in GGUF_CASES])
def test_gguf_crasher(case, tmp_path):
    spec = json.loads(case.read_text())
    raw = valid_bytes()
    limit = header_size() if spec["limit"] == "header" else len(raw)
    for m in spec["muts"]:
        raw = apply(raw, tuple(m), limit)
    exercise(raw, tmp_path)  # the property itself: only the project's errors
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(raw)
    try:
        with open_gguf(p) as gf:
            codes = [f.code for f in validate(gf)]
    except ModelError as e:
        codes = [e.code]
    assert spec["expect_code"] in codes, codes


@pytest.mark.parametrize("key,value,code", [
    ("bitnet-b1.58.embedding_length", 256.0, "metadata-not-integer"),
    ("bitnet-b1.58.attention.head_count", 0.5, "metadata-not-integer"),  # int(0.5) == 0: the modulo by zero
    ("bitnet-b1.58.block_count", float("inf"), "metadata-not-finite"),
    ("bitnet-b1.58.attention.layer_norm_rms_epsilon", float("nan"), "metadata-not-finite"),
    ("bitnet-b1.58.rope.freq_base", float("inf"), "metadata-not-finite"),
    ("bitnet-b1.58.vocab_size", 512.0, "metadata-not-integer"),
    ("tokenizer.ggml.scores", 5, "tokenizer-inconsistent"),  # len() of a scalar was a TypeError
    ("tokenizer.ggml.token_type", "x", "tokenizer-inconsistent"),
])
def test_metadata_of_the_wrong_kind(tmp_path, key, value, code):
    """Crafted: floats, NaN, infinities and scalars where the metadata needs integers or arrays are findings
    (validate) and ModelError with the same code (Model.load), never another exception."""
    from gguf_edit import rewrite, tiny_model

    from bitnet_ref.gguf.validate import validate_file
    from bitnet_ref.model import Model

    src = tiny_model(tmp_path, fmt="i2_s", arch="bitnet-b1.58")
    bad = rewrite(src, tmp_path / "bad.gguf", set_keys={key: value})
    found = [f for f in validate_file(bad) if f.severity == "error"]
    assert [f.code for f in found] == [code] and found[0].key == key and found[0].hint, found
    if not key.startswith("tokenizer."):
        with pytest.raises(ModelError) as e:
            Model.load(bad, "bitnet-cpp")
        assert e.value.code == code
