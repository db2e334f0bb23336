"""Malformed files: whatever is done to a valid model, the reader, the validator and the formats answer
with the project's own errors (ModelError with a finding code and a hint, or FormatError), never an
IndexError, a numpy error or a crash. `nox -s fuzz` runs this with many more examples."""

from __future__ import annotations

import struct

import pytest
from fuzz_budget import examples
from gguf_edit import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet_ref.errors import Finding, FormatError, ModelError
from bitnet_ref.formats import format_for
from bitnet_ref.gguf import open_gguf
from bitnet_ref.gguf.validate import validate

_MODEL: dict[str, bytes] = {}


def valid_bytes(tmp_path_factory=None) -> bytes:
    if "raw" not in _MODEL:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as d:
            _MODEL["raw"] = tiny_model(Path(d), fmt="i2_s", arch="bitnet-b1.58").read_bytes()
    return _MODEL["raw"]


def header_size() -> int:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(valid_bytes())
        f.flush()
        with open_gguf(f.name) as gf:
            return gf.data_offset


def exercise(raw: bytes, tmp_path) -> None:
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(raw)
    try:
        gf = open_gguf(p)
    except ModelError as e:
        assert e.finding.code and e.finding.hint and e.finding.path
        return
    with gf:
        findings = validate(gf)
        assert all(isinstance(f, Finding) and f.code and f.hint for f in findings)
        for t in gf.tensors[:6]:
            try:
                data = gf.tensor_bytes(t)
                format_for(gf, t).decode(data, t.shape)
            except (ModelError, FormatError):
                pass


overwrite = st.one_of(  # the mutations that keep the file's length
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(1, 255)),
    st.tuples(st.just("u64"), st.integers(0, 2**20), st.sampled_from([0, 1, 2**31, 2**32 + 5, 2**63, 2**64 - 1])),
    st.tuples(st.just("u32"), st.integers(0, 2**20), st.sampled_from([0, 9, 13, 36, 39, 99, 2**32 - 1])),
)
mutation = st.one_of(st.tuples(st.just("truncate"), st.integers(0, 2**20)), overwrite)


def apply(raw: bytes, m, limit: int) -> bytes:
    b = bytearray(raw)
    limit = min(limit, len(b))
    if limit < 8:  # already cut to almost nothing: only truncation still applies
        return bytes(b[: m[1] % (limit + 1)])
    kind, pos = m[0], m[1] % limit
    if kind == "truncate":
        return bytes(b[:pos])
    if kind == "flip":
        b[pos] ^= m[2]
    elif kind == "u64":
        struct.pack_into("<Q", b, min(pos, len(b) - 8), m[2])
    else:
        struct.pack_into("<I", b, min(pos, len(b) - 4), m[2])
    return bytes(b)


@settings(max_examples=examples("gguf-header"))
@given(muts=st.lists(mutation, min_size=1, max_size=3))
def test_header_mutations_give_project_errors(muts, tmp_path_factory):
    raw = valid_bytes()
    limit = header_size()  # mutate the parsed part: magic, counts, metadata, tensor directory
    for m in muts:
        raw = apply(raw, m, limit)
    exercise(raw, tmp_path_factory.mktemp("fuzz"))


@settings(max_examples=examples("gguf-whole"))
@given(m=mutation)
def test_whole_file_mutations_give_project_errors(m, tmp_path_factory):
    raw = valid_bytes()
    exercise(apply(raw, m, len(raw)), tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("field_at,value", [(8, 2**40), (16, 2**40), (24, 2**62)])
def test_huge_counts_and_lengths(tmp_path, field_at, value):
    """Tensor count, metadata count and the first key's string length set absurdly high."""
    b = bytearray(valid_bytes())
    struct.pack_into("<Q", b, field_at, value)
    p = tmp_path / "huge.gguf"
    p.write_bytes(bytes(b))
    with pytest.raises(ModelError) as e:
        open_gguf(p)
    assert e.value.code in ("bad-count", "bad-string-length")
