"""Validation: each finding code fires on a file damaged in exactly that way, with its location."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from gguf_edit import directory_field, nan_like, patch, rewrite, tiny_model

from bitnet_ref.errors import ModelError
from bitnet_ref.gguf import TensorSpec, open_gguf, write_gguf
from bitnet_ref.gguf.validate import errors, validate_file


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def i2s_model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("i2s"), fmt="i2_s", arch="bitnet-b1.58")


def codes(findings):
    return {f.code for f in findings}


def only(findings, code):
    hits = [f for f in findings if f.code == code]
    assert hits, f"no {code} in {[str(f) for f in findings]}"
    return hits[0]


def copy(model, tmp_path):
    dst = tmp_path / "m.gguf"
    shutil.copy(model, dst)
    return dst


def test_synthesized_models_are_clean(model, i2s_model):
    assert validate_file(model) == []
    assert validate_file(i2s_model) == []


@pytest.mark.parametrize("raw,code", [
    (b"GGML" + b"\0" * 60, "bad-magic"),
    (b"GGUF" + (1).to_bytes(4, "little") + b"\0" * 16, "unsupported-version"),
    (b"GGUF" + (3 << 24).to_bytes(4, "little") + b"\0" * 16, "unsupported-version"),
    (b"GGUF\x03\0\0\0\x01", "truncated-header"),
    (b"", "truncated-header"),
])
def test_unreadable_headers(tmp_path, raw, code):
    p = tmp_path / "bad.gguf"
    p.write_bytes(raw)
    with pytest.raises(ModelError) as e:
        open_gguf(p)
    assert e.value.code == code and e.value.finding.hint
    assert codes(validate_file(p)) == {code}


def test_big_endian_file_is_named_as_such(tmp_path):
    p = tmp_path / "be.gguf"
    p.write_bytes(b"GGUF" + (3).to_bytes(4, "big") + b"\0" * 16)
    with pytest.raises(ModelError, match="big-endian"):
        open_gguf(p)


def test_truncated_metadata_names_the_offset(model, tmp_path):
    p = tmp_path / "cut.gguf"
    p.write_bytes(model.read_bytes()[:200])
    with pytest.raises(ModelError) as e:
        open_gguf(p)
    assert e.value.code == "truncated-metadata" and e.value.finding.offset is not None


def test_truncated_tensor_data(model, tmp_path):
    p = tmp_path / "cut.gguf"
    p.write_bytes(model.read_bytes()[:-1000])
    size = p.stat().st_size
    with open_gguf(model) as gf:  # exactly the tensors whose data now runs past the end
        cut = {t.name: t.data_start for t in gf.tensors if t.data_start + t.nbytes > size}
    findings = [f for f in validate_file(p) if f.code == "tensor-out-of-bounds"]
    assert cut and {f.tensor: f.offset for f in findings} == cut
    f = findings[0]
    with open_gguf(p) as gf, pytest.raises(ModelError, match="truncated"):
        gf.tensor_bytes(f.tensor)


def test_misaligned_tensor(model, tmp_path):
    p = copy(model, tmp_path)
    at = directory_field(p, "blk.0.attn_q.weight", "offset")
    with open_gguf(p) as gf:
        off = gf.tensor("blk.0.attn_q.weight").offset
    patch(p, at, "<Q", off + 4)
    f = only(validate_file(p), "tensor-misaligned")
    assert f.tensor == "blk.0.attn_q.weight" and f.offset is not None


def test_overlapping_tensors(model, tmp_path):
    p = copy(model, tmp_path)
    with open_gguf(p) as gf:
        off = gf.tensor("blk.0.attn_q.weight").offset
    patch(p, directory_field(p, "blk.0.attn_k.weight", "offset"), "<Q", off)
    assert only(validate_file(p), "tensor-overlap").tensor in ("blk.0.attn_q.weight", "blk.0.attn_k.weight")


def test_unknown_type_id(model, tmp_path):
    p = copy(model, tmp_path)
    patch(p, directory_field(p, "blk.0.attn_v.weight", "type"), "<I", 99)
    f = only(validate_file(p), "unknown-type")
    assert f.tensor == "blk.0.attn_v.weight" and "99" in f.message


def test_type_that_cannot_hold_the_shape(model, tmp_path):
    p = copy(model, tmp_path)
    patch(p, directory_field(p, "blk.0.attn_norm.weight", "type"), "<I", 35)  # TQ2_0 for a 256-vector: fine
    patch(p, directory_field(p, "blk.0.attn_norm.weight", "ne0"), "<Q", 100)  # 100 is no multiple of 256
    assert only(validate_file(p), "tensor-shape-not-blockable").tensor == "blk.0.attn_norm.weight"


def test_duplicate_tensor_name(model, tmp_path):
    p = copy(model, tmp_path)
    patch(p, directory_field(p, "blk.0.attn_k.weight", "name"), "", b"blk.0.attn_q.weight")
    assert "duplicate-tensor" in codes(validate_file(p))


def test_missing_required_metadata(model, tmp_path):
    p = rewrite(model, tmp_path / "m.gguf", drop_keys={"bitnet.attention.head_count_kv"})
    assert only(validate_file(p), "missing-metadata").key == "bitnet.attention.head_count_kv"


def test_unknown_architecture(model, tmp_path):
    p = rewrite(model, tmp_path / "m.gguf", set_keys={"general.architecture": "llama"})
    assert only(validate_file(p), "unsupported-architecture").key == "general.architecture"


def test_shapes_inconsistent_with_hyperparameters(model, tmp_path):
    p = rewrite(model, tmp_path / "m.gguf", set_keys={"bitnet.attention.head_count_kv": 4})
    mism = [f for f in validate_file(p) if f.code == "tensor-shape-mismatch"]
    assert {f.tensor for f in mism} == {"blk.0.attn_k.weight", "blk.0.attn_v.weight"}


def test_missing_tensor(model, tmp_path):
    p = rewrite(model, tmp_path / "m.gguf", drop_tensors={"blk.0.ffn_down.weight"})
    assert only(validate_file(p), "missing-tensor").tensor == "blk.0.ffn_down.weight"


def test_non_finite_norm(model, tmp_path):
    with open_gguf(model) as gf:
        norm = nan_like(gf.tensor_bytes("output_norm.weight"), np.float32)
    p = rewrite(model, tmp_path / "m.gguf", tensor_data={"output_norm.weight": norm})
    assert only(validate_file(p), "non-finite-norm").tensor == "output_norm.weight"


def test_non_finite_tq_block_scale(model, tmp_path):
    with open_gguf(model) as gf:
        data = gf.tensor_bytes("blk.0.attn_q.weight").copy()
    data[64:66] = np.array([np.inf], np.float16).view(np.uint8)  # first block's fp16 d
    p = rewrite(model, tmp_path / "m.gguf", tensor_data={"blk.0.attn_q.weight": data})
    assert only(validate_file(p), "non-finite-scale").tensor == "blk.0.attn_q.weight"


def test_non_finite_i2s_scale(i2s_model, tmp_path):
    with open_gguf(i2s_model) as gf:
        t = gf.tensor("blk.0.ffn_up.weight")
        data = gf.tensor_bytes(t).copy()
    data[t.n_elements // 4 : t.n_elements // 4 + 4] = np.array([np.nan], np.float32).view(np.uint8)
    p = rewrite(i2s_model, tmp_path / "m.gguf", tensor_data={"blk.0.ffn_up.weight": data})
    assert only(validate_file(p), "non-finite-scale").tensor == "blk.0.ffn_up.weight"


def test_i2s_flavour_that_cannot_be_told(i2s_model, tmp_path):
    p = rewrite(i2s_model, tmp_path / "m.gguf", drop_keys={"bitnet_crossval.i2_s.block"})
    f = only(validate_file(p), "i2s-flavour-unknown")
    assert f.severity == "warning" and "BITNET_I2S_FLAVOUR" in f.hint


@pytest.mark.parametrize("change,code,key", [
    ({"drop_keys": {"tokenizer.ggml.model"}}, "missing-tokenizer", "tokenizer.ggml.model"),
    ({"drop_keys": {"tokenizer.ggml.merges"}}, "missing-merges", "tokenizer.ggml.merges"),
    ({"drop_keys": {"tokenizer.ggml.pre"}}, "missing-pre-tokenizer", "tokenizer.ggml.pre"),
    ({"set_keys": {"tokenizer.ggml.bos_token_id": 100000}}, "special-token-out-of-range",
     "tokenizer.ggml.bos_token_id"),
    ({"set_keys": {"tokenizer.ggml.token_type": [1, 1, 1]}}, "tokenizer-inconsistent", "tokenizer.ggml.token_type"),
])
def test_tokenizer_findings(model, tmp_path, change, code, key):
    p = rewrite(model, tmp_path / "m.gguf", **change)
    assert only(validate_file(p), code).key == key


def test_token_count_not_matching_embedding(model, tmp_path):
    with open_gguf(model) as gf:
        tokens = gf.get("tokenizer.ggml.tokens")
        types = gf.get("tokenizer.ggml.token_type")
    p = rewrite(model, tmp_path / "m.gguf", set_keys={
        "tokenizer.ggml.tokens": tokens + ["extra"], "tokenizer.ggml.token_type": list(types) + [1],
        "bitnet.vocab_size": len(tokens) + 1})
    assert "tokenizer-size-mismatch" in codes(validate_file(p))


def test_type_39_with_mxfp4_room_is_not_tl2(tmp_path):
    """Type id 39 is TL2 in bitnet.cpp and MXFP4 in mainline: an MXFP4-sized tensor is named as such."""
    raw = np.zeros(544, np.uint8)  # MXFP4 bytes for 2 x 512 values (17 bytes a 32-value block)
    p = write_gguf(tmp_path / "m.gguf", {"general.architecture": "bitnet"},
                   [TensorSpec("x", (2, 272), 24, raw), TensorSpec("y", (8,), 0, np.zeros(8, np.float32))])
    patch(p, directory_field(p, "x", "type"), "<I", 39)
    patch(p, directory_field(p, "x", "ne0"), "<Q", 512)
    f = only(validate_file(p), "type-39-is-mxfp4")
    assert f.tensor == "x" and "MXFP4" in f.hint


def test_errors_filter(model, tmp_path):
    p = rewrite(model, tmp_path / "m.gguf", drop_keys={"tokenizer.ggml.pre"})
    assert validate_file(p) and errors(validate_file(p)) == []


def test_implausible_hyperparameter_is_a_finding_not_a_memory_blowup(model, tmp_path):
    """Found by the fuzz session: a corrupt block_count of 2**31 made validation build 2**31 tensor names."""
    p = rewrite(model, tmp_path / "m.gguf", set_keys={"bitnet.block_count": 2**31})
    f = only(validate_file(p), "bad-metadata")
    assert f.key == "bitnet.block_count" and "implausibly large" in f.message


def test_zero_length_dimension_decodes_to_nothing():
    from bitnet_ref.formats import TQ2_0

    assert TQ2_0.decode(np.zeros(0, np.uint8), (0, 256)).shape == (0, 256)
