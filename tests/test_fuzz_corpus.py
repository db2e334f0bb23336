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
