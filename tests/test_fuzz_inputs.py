"""Hostile inputs other than model files: tokenizer text, the documents a user writes (cases TOML,
baselines JSON, models.lock) and the lines a JSON-lines engine answers. Each property: only the project's
own errors (CaseError, BaselineError, ModelError with a lock code, EngineError), never another exception,
a hang or unbounded memory. `nox -s fuzz` runs them with many more examples (BITNET_FUZZ_EXAMPLES)."""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fuzz_budget import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet_ref import vocab as V
from bitnet_ref.errors import ModelError
from bitnet_ref.hub import ModelLock
from bitnet_ref.tokenizer import Tokenizer
from harness.baselines import Baseline, BaselineError
from harness.cases import CaseError, load_case_file
from harness.engines.base import EngineError
from harness.engines.jsonl import JsonlEngine

ROOT = Path(__file__).resolve().parent.parent
SCRIPTED = Path(__file__).parent / "fake_tools" / "jsonl_scripted.py"


# -- text mutations shared by the document properties ---------------------------------------------------
def mutate_text(text: str, muts) -> str:
    for kind, pos, s in muts:
        pos = pos % (len(text) + 1)
        if kind == "insert":
            text = text[:pos] + s + text[pos:]
        elif kind == "delete":
            text = text[:pos] + text[pos + len(s) + 1:]
        else:
            text = text[:pos] + s + text[pos + len(s):]
    return text


text_mutation = st.tuples(st.sampled_from(["insert", "delete", "replace"]), st.integers(0, 1 << 16),
                          st.one_of(st.text(max_size=8), st.sampled_from(
                              ['"', "'", "[", "]", "{", "}", "=", "\n", "[[case]]", "1e999", "nan", "-1", "true",
                               "0x10", '"\\u0000"', "\\", ",", ":", "null", "[]", "{}", "1.5", "9" * 40])))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=20),
                        st.floats(allow_nan=True, allow_infinity=True))
json_value = st.recursive(json_scalar, lambda c: st.one_of(st.lists(c, max_size=4),
                                                           st.dictionaries(st.text(max_size=10), c, max_size=4)),
                          max_leaves=12)


def replace_node(doc, path: list[int], value):
    """`doc` with the node reached by following `path` (indices into each container's items) replaced."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return value
    i = path[0] % len(doc)
    if isinstance(doc, dict):
        k = list(doc)[i]
        return {**doc, k: replace_node(doc[k], path[1:], value)}
    return [*doc[:i], replace_node(doc[i], path[1:], value), *doc[i + 1:]]


# -- cases TOML -----------------------------------------------------------------------------------------
CASES_TEXT = (ROOT / "cases" / "default.toml").read_text(encoding="utf-8")


@settings(max_examples=examples("cases"))
@given(muts=st.lists(text_mutation, min_size=1, max_size=4))
def test_mutated_cases_toml_give_case_error(muts, tmp_path_factory):
    d = tmp_path_factory.mktemp("cases")
    p = d / "fuzz.toml"
    p.write_text(mutate_text(CASES_TEXT, muts), encoding="utf-8")
    try:
        load_case_file(p)
    except CaseError as e:
        assert str(p) in str(e) or p.name in str(e), e


# -- baselines JSON -------------------------------------------------------------------------------------
BASELINE_FILES = sorted((ROOT / "baselines").glob("*/*.json"))


@settings(max_examples=examples("baselines-json"))
@given(which=st.integers(0, 1 << 10), path=st.lists(st.integers(0, 1 << 10), max_size=5), value=json_value)
def test_mutated_baselines_give_baseline_error(which, path, value):
    src = BASELINE_FILES[which % len(BASELINE_FILES)]
    doc = replace_node(json.loads(src.read_text(encoding="utf-8")), path, value)
    try:
        Baseline.from_json(doc, src)
    except BaselineError as e:
        assert str(src) in str(e), e


@settings(max_examples=examples("baselines-text"))
@given(muts=st.lists(text_mutation, min_size=1, max_size=3))
def test_mutated_baseline_text_gives_baseline_error(muts, tmp_path_factory):
    from harness import baselines as B

    src = BASELINE_FILES[0]
    doc = json.loads(src.read_text(encoding="utf-8"))
    d = tmp_path_factory.mktemp("baselines")
    key = B.BaselineKey(**doc["key"])
    target = B.path_for(d, doc["platform"], key)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(mutate_text(src.read_text(encoding="utf-8"), muts), encoding="utf-8")
    try:
        B.load(d, doc["platform"], key)
    except BaselineError as e:
        assert str(target) in str(e), e


# -- models.lock ----------------------------------------------------------------------------------------
LOCK_TEXT = """version = 1

[[model]]
repo = "microsoft/bitnet-b1.58-2B-4T-gguf"
revision = "0123456789abcdef0123456789abcdef01234567"
file = "ggml-model-i2_s.gguf"
sha256 = "%s"
size = 1187801280
""" % ("ab" * 32)


@settings(max_examples=examples("lock"))
@given(muts=st.lists(text_mutation, min_size=1, max_size=4))
def test_mutated_lock_gives_lock_error(muts, tmp_path_factory):
    p = tmp_path_factory.mktemp("lock") / "models.lock"
    p.write_text(mutate_text(LOCK_TEXT, muts), encoding="utf-8")
    try:
        ModelLock.load(p)
    except ModelError as e:
        assert e.code.startswith("lock-") and str(p) in str(e), e


def test_lock_text_is_valid():
    """The document the lock property mutates loads, so the mutations start from a valid file."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "models.lock"
        p.write_text(LOCK_TEXT, encoding="utf-8")
        assert len(ModelLock.load(p).entries) == 1
    assert load_case_file(ROOT / "cases" / "default.toml")
    for f in BASELINE_FILES:
        Baseline.from_json(json.loads(f.read_text(encoding="utf-8")), f)


# -- tokenizers -----------------------------------------------------------------------------------------
_TOK: dict[str, Tokenizer] = {}


def tokenizer(kind: str) -> Tokenizer:
    if kind not in _TOK:
        if kind == "llama3":
            try:
                spec = V.llama3_vocab()
            except Exception as e:  # noqa: BLE001 - the optional llama-models package
                pytest.skip(f"the Llama 3 vocabulary is not installed (llama-models): {e}")
        else:
            spec = {"bpe-tiny": V.tiny_vocab, "spm-tiny": V.tiny_spm_vocab}[kind]()
        _TOK[kind] = Tokenizer.from_metadata(spec.metadata_dict())
    return _TOK[kind]


texts = st.one_of(st.text(max_size=64),
                  st.binary(max_size=64).map(lambda b: b.decode("utf-8", "replace")),
                  st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
                  st.text(st.characters(codec="utf-8"), max_size=32).map(lambda s: " " + s + "  \n\t"))


@pytest.mark.parametrize("kind", ["bpe-tiny", "spm-tiny", "llama3"])
@settings(max_examples=examples("tokenizer-round-trip"))
@given(text=texts)
def test_tokenizer_round_trip(kind, text):
    tok = tokenizer(kind)
    ids = tok.encode(text, add_bos=False)
    assert all(type(i) is int and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text  # byte-level BPE and byte-fallback SPM represent every text


@pytest.mark.parametrize("kind", ["bpe-tiny", "spm-tiny", "llama3"])
@settings(max_examples=examples("tokenizer-decode"))
@given(ids=st.lists(st.integers(-5, 200000), max_size=16), special=st.booleans())
def test_tokenizer_decode_any_ids(kind, ids, special):
    tok = tokenizer(kind)
    try:
        out = tok.decode(ids, special=special)
    except ValueError as e:
        assert any(not 0 <= i < tok.vocab_size for i in ids) and "outside the vocabulary" in str(e)
    else:
        assert isinstance(out, str) and all(0 <= i < tok.vocab_size for i in ids)


# -- JSON-lines engine responses ------------------------------------------------------------------------
class _Scripted:
    """One long-lived scripted engine, restarted after each fault that kills it."""

    def __init__(self):
        self.engine = None
        self.dir = Path(__import__("tempfile").mkdtemp(prefix="jsonl-fuzz-"))
        self.reply = self.dir / "reply"
        self.model = self.dir / "model.gguf"
        self.model.write_bytes(b"not a model")

    def get(self) -> JsonlEngine:
        if self.engine is None or self.engine._closed_why is not None:
            self.engine = JsonlEngine([sys.executable, str(SCRIPTED), str(self.reply)], self.model, timeout=0.5,
                                      max_line=1 << 16)
        return self.engine


_SCRIPTED = _Scripted()


@pytest.fixture(autouse=True, scope="module")
def _stop_scripted():
    yield
    if _SCRIPTED.engine is not None:
        _SCRIPTED.engine.close()
IDS = [1, 2]
F32 = base64.b64encode(np.arange(6, dtype="<f4").tobytes()).decode()
VALID = {
    "tokenize": {"ids": [1, 2, 3]},
    "detokenize": {"text": "hi"},
    "logits": {"logits": {"shape": [2, 3], "dtype": "<f4", "b64": F32}},
    "generate": {"ids": [4]},
    "perplexity": {"ppl": 3.5, "nll": 1.25, "n_scored": 4, "per_chunk": [3.5], "convention": "sliding", "ctx": 8},
}


def call(engine: JsonlEngine, op: str):
    if op == "tokenize":
        return engine.tokenize("hi")
    if op == "detokenize":
        return engine.detokenize(IDS)
    if op == "logits":
        return engine.logits(IDS)
    if op == "generate":
        return engine.generate(IDS, 2)
    return engine.perplexity(IDS, 8)


def line(doc) -> bytes:
    return json.dumps(doc, allow_nan=True).replace('"__ID__"', "{ID}").encode() + b"\n"


replies = st.one_of(
    # a valid response with one node replaced by anything JSON can hold
    st.tuples(st.lists(st.integers(0, 8), max_size=3), json_value).map(lambda t: ("replace",) + t),
    # a valid response line with its text mutated
    st.lists(text_mutation, min_size=1, max_size=3).map(lambda m: ("text", m)),
    st.binary(max_size=200).map(lambda b: ("raw", b.replace(b"\n", b"") + b"\n")),
    st.sampled_from([
        ("raw", b'{"id": {ID}, "ok": true, "ids": [' + b"0," * 40000 + b"0]}\n"),  # past max_line
        ("raw", b'{"id": {ID}, "ok": true, "ids": [1]'),  # no newline: the timeout
        ("raw", b"[" * 100000 + b"\n"),  # nesting past the recursion limit... and past max_line
        ("raw", b"[" * 30000 + b"\n"),
        ("raw", b'{"id": {ID}, "ok": true, "logits": {"shape": [2, 3], "b64": "!!!not base64"}}\n'),
        ("raw", b'{"id": {ID}, "ok": true, "logits": {"shape": [2, 99999999999], "b64": ""}}\n'),
        ("raw", b'{"id": {ID}, "ok": true, "logits": {"shape": [-1, 3], "b64": "%s"}}\n' % F32.encode()),
        ("raw", b'{"id": {ID}, "ok": true, "logits": {"shape": [2, 3], "npy": "/nonexistent.npy"}}\n'),
        ("raw", b'{"id": true, "ok": true, "ids": [1]}\n'),
        ("raw", b'{"id": {ID}, "ok": true, "ids": [1], "timings": {"x": "slow"}}\n'),
        ("raw", b'{"id": {ID}, "ok": false, "error": [1, 2], "kind": 5}\n'),
    ]),
)


@settings(max_examples=examples("jsonl"))
@given(op=st.sampled_from(sorted(VALID)), reply=replies)
def test_jsonl_engine_responses_give_engine_error(op, reply):
    base = {"id": "__ID__", "ok": True, **VALID[op]}
    if reply[0] == "replace":
        data = line(replace_node(base, reply[1], reply[2]))
    elif reply[0] == "text":
        data = mutate_text(line(base).decode(), reply[1]).replace("\n", " ").encode() + b"\n"
    else:
        data = reply[1]
    _SCRIPTED.reply.write_bytes(data)
    engine = _SCRIPTED.get()
    t0 = time.monotonic()
    try:
        out = call(engine, op)
    except EngineError as e:
        assert str(e)
    else:  # accepted: then it has the promised types
        if op in ("tokenize", "generate"):
            assert isinstance(out, list) and all(type(i) is int and i >= 0 for i in out)
        elif op == "detokenize":
            assert isinstance(out, str)
        elif op == "logits":
            assert out.dtype == np.float32 and out.shape[0] == len(IDS) and out.ndim == 2
        else:
            assert isinstance(out.ppl, float) and isinstance(out.n_scored, int)
    assert time.monotonic() - t0 < 10
