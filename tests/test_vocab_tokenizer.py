"""Vocabularies for synthesized GGUF models (bitnet_ref.vocab) and the engine's tokenizer
(bitnet_ref.tokenizer), checked against mainline llama.cpp (llama-cpp-python) and tiktoken.

Each vocabulary is written once per session into a vocab-only GGUF (arch "bitnet", hyper-parameters,
tokenizer metadata, no tensors) and loaded by llama.cpp with vocab_only=True. Timings on the 2-core
development machine: Llama 3 vocabulary build 1.1-1.8 s, its GGUF write 0.5-0.7 s, llama.cpp
vocab-only load 0.5 s, our tokenizer build 0.9-1.3 s; the whole module runs in 4-7 s.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib

import gguf
import pytest

from bitnet_ref import vocab as V
from bitnet_ref.errors import ModelError
from bitnet_ref.tokenizer import ENV_STRICT, ENV_TOKENIZER, Tokenizer, load_tokenizer

LLAMA_CPP_REASON = "needs the 'llama-cpp-python' package (pip install llama-cpp-python==0.3.36)"


# ----------------------------------------------------------------------------------------------------
# Test strings


def tokenizer_strings() -> list[str]:
    """A few hundred strings that stress pre-tokenization and merging (deterministic)."""
    base = [
        "",
        " ",
        "  ",
        "Hello world",
        "Hello, world!",
        " Hello world",
        "hello  world",
        "The quick brown fox jumps over the lazy dog.",
        "I'm sure you'll see they've done what we'd said; it's John's.",
        "I'M SURE YOU'LL SEE THEY'VE DONE IT, DON'T WORRY",
        "'s 't 're 've 'm 'll 'd 'S 'T 'RE",
        "don'tcha 'sx '\u017fx '\u017f x'\u017f '\u212ax",  # U+017F long s, U+212A Kelvin: Unicode case folding
        "ǅemal Σίσυφος ΣΊΣΥΦΟΣ",
        # whitespace
        "\t",
        "\t\tindented",
        "\n",
        "\n\n",
        "\n\n\n",
        "\r\n",
        "a\r\nb\r\n\r\nc",
        "line one\nline two\n",
        "trailing spaces   ",
        "   leading spaces",
        "a    b",
        "a \n b",
        "a  \n\n  b",
        " \n \n ",
        "x\u00a0y",  # no-break space
        "x\u3000y",  # ideographic space
        "x\u2009y\u200by",  # thin space, zero width space
        "x\u2028y\u2029z",  # line / paragraph separator
        "x\x0by\x0cz\x85w",
        " " * 17,
        "\n" * 9 + "x",
        "\t \t \n",
        # digits
        "1",
        "12",
        "123",
        "1234",
        "12345",
        "1234567890",
        "12345678901234567890",
        "3.14159265358979",
        "1,000,000 and 2.5e-10",
        "x1y22z333w4444",
        " 42",
        "-17",
        "2024-01-02T03:04:05Z",
        "٣٤٥٦",  # Arabic-Indic digits
        "१२३४",  # Devanagari digits
        "²³ ½ ¼ Ⅻ ⅷ ① ⑩",  # other numerics
        "１２３４５",  # fullwidth
        # unicode letters, scripts
        "café naïve résumé",
        "cafe\u0301",  # combining acute
        "Straße İstanbul ıi",
        "Привет, мир! Как дела?",
        "Γειά σου Κόσμε",
        "مرحبا بالعالم",
        "שלום עולם",
        "สวัสดีชาวโลก",
        "नमस्ते दुनिया",
        "안녕하세요 세계",
        # whole words that are Llama 3 tokens but that merging alone does not reach (ignore_merges)
        "Việt Nam có nhiều việc hợp điều ngoài nhiên",
        "gelmektedir, yapıldı ektedir; jeho ایران",
        "你好，世界！这是一个测试。",
        "日本語のテキストとカタカナ、ひらがな。",
        "漢字かな交じり文",
        "Ｆｕｌｌｗｉｄｔｈ",
        "ﬁ ﬂ ﬀ",
        "\ufeffBOM at start",
        "\u00ad soft hyphen",
        "\ue000 private use \U000f0000",
        "\U0010ffff",
        "\x00\x01\x1f\x7f",
        "a\u0300\u0301\u0302",
        "\u0301 lone combining",
        # emoji
        "😀",
        "😀😃😄😁",
        "👍🏽",
        "👨‍👩‍👧‍👦",
        "🇺🇸🇯🇵",
        "I ❤️ tokenizers 🚀✨",
        "☕️ ☕",
        "🤖 says: beep",
        # code
        "def forward(self, x):\n    return self.w @ x\n",
        "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}",
        "if x == 1:\n        pass\n    else:\n        return None",
        '{"key": "value", "n": [1, 2, 3], "nested": {"a": null}}',
        '<html><body><p class="x">Hi &amp; bye</p></body></html>',
        "SELECT * FROM users WHERE id = 42 AND name LIKE '%bob%';",
        "x = a->b + c::d << 2 >>= 3 != 4 && !e || f ?: g",
        '#include <stdio.h>\nint main(void) { printf("%d\\n", 42); }',
        "$ ls -la | grep '^d' > /dev/null 2>&1 && echo ok",
        "re.compile(r'^\\s*(\\d{1,3})\\.(?:\\w+)$')",
        "λx. x + 1 → ∀y ∈ ℝ: y² ≥ 0",
        "====" * 20,
        "----------------------------------------",
        "________________",
        "...",
        "!!!???",
        "a.b.c",
        "e.g., i.e., etc.",
        "https://example.com/path?q=1&r=two#frag",
        "user@example.com",
        "C:\\Windows\\System32",
        "@@@ ### $$$ %%% ^^^ &&& ***",
        "((()))[[[]]]{{{}}}",
        "\"quoted\" 'single' `back`",
        "a" * 300,
        "ab" * 150,
        "The" + " the" * 60,
        "x" + "\n" * 40 + "y",
        "def f():  \n    x = 1  \n    return x",
        # special-token text (parse_special on and off)
        "<|begin_of_text|>Hello",
        "Hello<|end_of_text|>",
        "a<|eot_id|>b",
        "<|eot_id|><|eot_id|>",
        (
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        "<|reserved_special_token_0|> <|reserved_special_token_247|>",
        "<|python_tag|>print(1)<|eom_id|>",
        " <|eot_id|> ",
        "<|eot_id",
        "<|EOT_ID|>",
        "<|eot_id|x>",
        "<<|eot_id|>>",
        "text <|begin_of_text|><|end_of_text|> text",
    ]
    out = list(base)
    # Deterministic combinations of short fragments: joints between scripts, digits, spaces, newlines.
    frags = [
        "word",
        " Word",
        "123",
        "4567",
        " 89",
        "\n",
        "  ",
        "\t",
        "é",
        "日本",
        "😀",
        "'s",
        "'LL",
        ".",
        ",",
        "!?",
        "(x)",
        "->",
        "_id",
        "<|eot_id|>",
        "\r\n",
        "ß",
        "ﬁ",
        "x\u0301",
        "٣",
        "  \n",
    ]
    for i, a in enumerate(frags):
        for j, b in enumerate(frags):
            if (i * 7 + j * 3) % 5 == 0:
                out.append(a + b + frags[(i + j) % len(frags)])
    # Sentences with varied spacing.
    words = ["alpha", "Beta", "γάμμα", "δέλτα", "ε", "1", "22", "333", "4444", "中文", "🙂", "x_y", "a.b"]
    seps = [" ", "  ", "\n", " \n", "\t", "", ", ", ". "]
    for k in range(60):
        parts = [
            words[(k * 5 + m * 3) % len(words)] + seps[(k + m * 7) % len(seps)] for m in range(2 + k % 6)
        ]
        out.append("".join(parts))
    return out


STRINGS = tokenizer_strings()


def test_string_corpus_size():
    assert len(STRINGS) >= 250
    assert len(set(STRINGS)) >= 240


# ----------------------------------------------------------------------------------------------------
# Helpers: vocab-only GGUF, llama.cpp access


def write_vocab_only_gguf(path, spec: V.VocabSpec, arch: str = "bitnet", drop: tuple[str, ...] = ()) -> None:
    """A GGUF that llama.cpp can load with vocab_only=True: arch hyper-parameters + tokenizer, no tensors."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, val in (
        ("context_length", 4096),
        ("embedding_length", 64),
        ("block_count", 1),
        ("feed_forward_length", 128),
        ("attention.head_count", 2),
        ("attention.head_count_kv", 2),
        ("vocab_size", spec.vocab_size),
    ):
        w.add_uint32(f"{arch}.{key}", val)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    for key, value, vtype in spec.gguf_metadata():
        if key in drop:
            continue
        sub = V.ARRAY_ELEMENT_TYPES.get(key) if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, vtype, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


class LlamaCppVocab:
    """llama.cpp's tokenizer for a vocab-only GGUF, through llama-cpp-python."""

    def __init__(self, path):
        llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_CPP_REASON)
        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self.vocab = self.llm._model.vocab

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def piece(self, tok: int, special: bool = False) -> bytes:
        # llama-cpp-python's detokenize uses a 32-byte buffer; Llama 3 has 128-byte tokens.
        buf = ctypes.create_string_buffer(512)
        n = self.lib.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, special)
        assert n >= 0
        return buf.raw[:n]

    def detokenize(self, toks: list[int], special: bool = False) -> bytes:
        return b"".join(self.piece(t, special) for t in toks)

    def close(self) -> None:
        self.llm.close()


def _compare(ref_fn, ours_fn, strings) -> list[tuple[str, list[int], list[int]]]:
    bad = []
    for s in strings:
        a, b = ref_fn(s), ours_fn(s)
        if a != b:
            bad.append((s, a, b))
    return bad


def _report(bad, what: str, n: int) -> str:
    lines = [f"{len(bad)} of {n} strings differ ({what}):"]
    for s, a, b in bad[:10]:
        lines.append(f"  {s!r}: reference {a} ours {b}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Session fixtures


@pytest.fixture(scope="session")
def llama3_spec() -> V.VocabSpec:
    pytest.importorskip(
        "llama_models", reason="needs the 'llama-models' package (pip install llama-models==0.3.0)"
    )
    return V.llama3_vocab()


@pytest.fixture(scope="session")
def llama3_tok(llama3_spec) -> Tokenizer:
    return Tokenizer.from_metadata(llama3_spec.metadata_dict())


@pytest.fixture(scope="session")
def tiktoken_llama3():
    tiktoken = pytest.importorskip("tiktoken", reason="needs the 'tiktoken' package (pip install tiktoken)")
    pytest.importorskip(
        "llama_models", reason="needs the 'llama-models' package (pip install llama-models==0.3.0)"
    )
    ranks = V.load_tiktoken_ranks(V.llama3_tokenizer_model_path())
    specials = {t: V.LLAMA3_NUM_BASE_TOKENS + i for i, t in enumerate(V.llama3_special_tokens())}
    return tiktoken.Encoding(
        "llama3", pat_str=V.LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )


@pytest.fixture(scope="session")
def llama3_cpp(tmp_path_factory, llama3_spec):
    pytest.importorskip("llama_cpp", reason=LLAMA_CPP_REASON)
    path = tmp_path_factory.mktemp("vocab") / "llama3-vocab.gguf"
    write_vocab_only_gguf(path, llama3_spec)
    cpp = LlamaCppVocab(path)
    yield cpp
    cpp.close()


@pytest.fixture(scope="session")
def tiny_cpp(tmp_path_factory):
    pytest.importorskip("llama_cpp", reason=LLAMA_CPP_REASON)
    path = tmp_path_factory.mktemp("vocab") / "tiny-vocab.gguf"
    write_vocab_only_gguf(path, V.tiny_vocab())
    cpp = LlamaCppVocab(path)
    yield cpp
    cpp.close()


@pytest.fixture(scope="session")
def tiny_spm_cpp(tmp_path_factory):
    pytest.importorskip("llama_cpp", reason=LLAMA_CPP_REASON)
    path = tmp_path_factory.mktemp("vocab") / "tiny-spm-vocab.gguf"
    write_vocab_only_gguf(path, V.tiny_spm_vocab())
    cpp = LlamaCppVocab(path)
    yield cpp
    cpp.close()


# ----------------------------------------------------------------------------------------------------
# Part A: the vocabularies


def test_bytes_to_unicode_is_a_bijection():
    table = V.bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "\u0120" and table[ord("\n")] == "\u010a"
    for b in (b"", b"\x00\xff hello\n", bytes(range(256))):
        assert V.token_str_to_bytes(V.token_bytes_to_str(b)) == b


def test_llama3_vocab_layout(llama3_spec):
    s = llama3_spec
    assert s.model == "gpt2" and s.pre == "llama-bpe" and s.add_bos is True
    assert s.vocab_size == 128256
    assert len(s.merges) == 280147  # every valid split of every multi-byte token
    assert (s.bos_id, s.eos_id, s.eot_id) == (128000, 128001, 128009)
    assert s.tokens[128000] == "<|begin_of_text|>"
    assert s.tokens[128001] == "<|end_of_text|>"
    assert s.tokens[128006:128010] == ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]
    assert s.tokens[128255] == "<|reserved_special_token_245|>"
    assert s.token_type[:128000] == [V.TOKEN_NORMAL] * 128000
    assert s.token_type[128000:] == [V.TOKEN_CONTROL] * 256
    assert s.tokens[220] == "\u0120" and s.tokens[198] == "\u010a"  # " " and "\n"
    assert V.llama3_vocab() is s  # cached


def test_gguf_metadata_keys_and_types():
    s = V.tiny_vocab()
    meta = {k: (v, t) for k, v, t in s.gguf_metadata()}
    T = gguf.GGUFValueType
    assert meta["tokenizer.ggml.model"] == ("gpt2", T.STRING)
    assert meta["tokenizer.ggml.pre"] == ("llama-bpe", T.STRING)
    assert meta["tokenizer.ggml.tokens"][1] == T.ARRAY and len(meta["tokenizer.ggml.tokens"][0]) == 512
    assert meta["tokenizer.ggml.token_type"][1] == T.ARRAY
    assert meta["tokenizer.ggml.merges"][1] == T.ARRAY
    assert meta["tokenizer.ggml.bos_token_id"] == (509, T.UINT32)
    assert meta["tokenizer.ggml.eos_token_id"] == (510, T.UINT32)
    assert meta["tokenizer.ggml.eot_token_id"] == (511, T.UINT32)
    assert meta["tokenizer.ggml.add_bos_token"] == (True, T.BOOL)
    assert meta["tokenizer.ggml.add_eos_token"] == (False, T.BOOL)
    assert "tokenizer.ggml.scores" not in meta
    spm = {k: (v, t) for k, v, t in V.tiny_spm_vocab().gguf_metadata()}
    assert spm["tokenizer.ggml.model"] == ("llama", T.STRING)
    assert spm["tokenizer.ggml.scores"][1] == T.ARRAY and "tokenizer.ggml.merges" not in spm
    assert spm["tokenizer.ggml.add_space_prefix"] == (True, T.BOOL)


def test_gguf_roundtrip_through_reader(tmp_path):
    s = V.tiny_vocab()
    path = tmp_path / "tiny.gguf"
    write_vocab_only_gguf(path, s)
    r = gguf.GGUFReader(str(path))
    f = r.fields
    assert f["general.architecture"].contents() == "bitnet"
    assert f["tokenizer.ggml.tokens"].contents() == s.tokens
    assert f["tokenizer.ggml.merges"].contents() == s.merges
    assert f["tokenizer.ggml.token_type"].contents() == s.token_type
    assert f["tokenizer.ggml.token_type"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert f["tokenizer.ggml.bos_token_id"].types == [gguf.GGUFValueType.UINT32]
    # and the tokenizer built from what the reader gives back equals the one built from the spec
    meta = {k: f[k].contents() for k in f if k.startswith("tokenizer.")}
    a, b = Tokenizer.from_metadata(meta), Tokenizer.from_metadata(s.metadata_dict())
    for text in STRINGS[:40]:
        assert a.encode(text, parse_special=True) == b.encode(text, parse_special=True)


# Pinned digests: the tiny vocabularies must not change by accident (they define CI models).
TINY_VOCAB_SHA256 = "0056c66542a4217e1a601b3d9b0733cc0152f934e9883a5d0238cd67ce96a820"
TINY_SPM_VOCAB_SHA256 = "6975d88a5d9ed18ea1055ca7c8b024fe18c690ea6f2917b9e4a335d56636cd9b"


def _digest(spec: V.VocabSpec) -> str:
    h = hashlib.sha256()
    for part in (
        spec.tokens,
        spec.merges or [],
        [str(x) for x in spec.token_type],
        [repr(x) for x in spec.scores or []],
    ):
        h.update("\x00".join(part).encode("utf-8"))
        h.update(b"\x01")
    return h.hexdigest()


def test_tiny_vocab_deterministic():
    a = V.tiny_vocab()
    V.tiny_vocab.cache_clear()
    b = V.tiny_vocab()
    assert a is not b and a == b
    assert a.vocab_size == 512 and len(a.merges) >= 253
    assert a.tokens[:256] == [V.token_bytes_to_str(bytes([i])) for i in range(256)]
    assert a.tokens[-3:] == ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    assert a.token_type[-3:] == [V.TOKEN_CONTROL] * 3
    if TINY_VOCAB_SHA256:
        assert _digest(a) == TINY_VOCAB_SHA256
    assert V.tiny_vocab(300).vocab_size == 300
    with pytest.raises(ValueError):
        V.tiny_vocab(100)


def test_tiny_spm_vocab_layout():
    s = V.tiny_spm_vocab()
    assert s.vocab_size == 512
    assert s.tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert s.tokens[3] == "<0x00>" and s.tokens[258] == "<0xFF>"
    assert s.token_type[:3] == [V.TOKEN_UNKNOWN, V.TOKEN_CONTROL, V.TOKEN_CONTROL]
    assert s.token_type[3:259] == [V.TOKEN_BYTE] * 256
    normal_scores = [x for x, t in zip(s.scores, s.token_type) if t == V.TOKEN_NORMAL]
    assert len(set(normal_scores)) == len(normal_scores)  # no ties in llama.cpp's merge order
    if TINY_SPM_VOCAB_SHA256:
        assert _digest(s) == TINY_SPM_VOCAB_SHA256


def test_vocab_spec_validation():
    with pytest.raises(ValueError, match="unique"):
        V.VocabSpec("gpt2", "llama-bpe", ["a", "a"], [1, 1], None, ["a a"], None, None, None, False)
    with pytest.raises(ValueError, match="merges"):
        V.VocabSpec("gpt2", "llama-bpe", ["a", "b"], [1, 1], None, None, None, None, None, False)
    with pytest.raises(ValueError, match="bos_id"):
        V.VocabSpec("gpt2", "llama-bpe", ["a", "b", "ab"], [1, 1, 1], None, ["a b"], 5, None, None, True)
    with pytest.raises(ValueError, match="token_type"):
        V.VocabSpec("gpt2", "llama-bpe", ["a", "b", "ab"], [1, 1], None, ["a b"], None, None, None, True)


# ----------------------------------------------------------------------------------------------------
# Part B against tiktoken (no llama.cpp needed)


def test_llama3_matches_tiktoken(llama3_tok, tiktoken_llama3):
    enc = tiktoken_llama3
    bad = _compare(
        lambda s: enc.encode(s, disallowed_special=()),
        lambda s: llama3_tok.encode(s, add_bos=False, parse_special=False),
        STRINGS,
    )
    assert not bad, _report(bad, "tiktoken, parse_special off", len(STRINGS))
    bad = _compare(
        lambda s: enc.encode(s, allowed_special="all"),
        lambda s: llama3_tok.encode(s, add_bos=False, parse_special=True),
        STRINGS,
    )
    assert not bad, _report(bad, "tiktoken, parse_special on", len(STRINGS))


def test_llama3_special_handling(llama3_tok):
    t = llama3_tok
    assert (t.bos_id, t.eos_id, t.eot_id, t.vocab_size, t.add_bos) == (128000, 128001, 128009, 128256, True)
    assert t.encode("a<|eot_id|>b", add_bos=False, parse_special=True) == [64, 128009, 65]
    assert 128009 not in t.encode("a<|eot_id|>b", add_bos=False, parse_special=False)
    assert t.encode("hi")[0] == 128000 and t.encode("hi", add_bos=False)[0] != 128000
    assert t.decode([128000, 6151, 128009]) == "hi"
    assert t.decode([128000, 6151, 128009], special=True) == "<|begin_of_text|>hi<|eot_id|>"


def test_llama3_roundtrip(llama3_tok):
    for s in STRINGS:
        assert llama3_tok.decode(llama3_tok.encode(s, add_bos=True)) == s


# ----------------------------------------------------------------------------------------------------
# Part B against llama.cpp


@pytest.mark.llama_cpp
@pytest.mark.parametrize("parse_special", [False, True])
def test_llama3_matches_llama_cpp(llama3_cpp, llama3_tok, parse_special):
    bad = _compare(
        lambda s: llama3_cpp.tokenize(s, add_bos=False, special=parse_special),
        lambda s: llama3_tok.encode(s, add_bos=False, parse_special=parse_special),
        STRINGS,
    )
    assert not bad, _report(bad, f"llama.cpp, parse_special={parse_special}", len(STRINGS))


@pytest.mark.llama_cpp
def test_llama3_llama_cpp_matches_tiktoken(llama3_cpp, tiktoken_llama3):
    """Proves the synthesized GGUF vocabulary itself: llama.cpp on it == tiktoken on the ranks."""
    bad = _compare(
        lambda s: tiktoken_llama3.encode(s, disallowed_special=()),
        lambda s: llama3_cpp.tokenize(s, add_bos=False, special=False),
        STRINGS,
    )
    assert not bad, _report(bad, "llama.cpp vs tiktoken", len(STRINGS))


@pytest.mark.llama_cpp
def test_llama3_bos_and_detokenize_match_llama_cpp(llama3_cpp, llama3_tok):
    for s in STRINGS:
        ids = llama3_cpp.tokenize(s, add_bos=True, special=True)
        assert ids == llama3_tok.encode(s, parse_special=True), s
        for special in (False, True):
            ref = llama3_cpp.detokenize(ids, special=special).decode("utf-8", errors="replace")
            assert llama3_tok.decode(ids, special=special) == ref, (s, special)
    assert llama3_cpp.llm.token_bos() == 128000 and llama3_cpp.llm.token_eos() == 128001
    assert llama3_cpp.llm.n_vocab() == 128256


@pytest.mark.llama_cpp
@pytest.mark.parametrize("parse_special", [False, True])
def test_tiny_vocab_matches_llama_cpp(tiny_cpp, parse_special):
    tok = Tokenizer.from_metadata(V.tiny_vocab().metadata_dict())
    bad = _compare(
        lambda s: tiny_cpp.tokenize(s, add_bos=True, special=parse_special),
        lambda s: tok.encode(s, parse_special=parse_special),
        STRINGS,
    )
    assert not bad, _report(bad, f"tiny vocab, parse_special={parse_special}", len(STRINGS))
    for s in STRINGS:
        ids = tok.encode(s, parse_special=parse_special)
        assert tok.decode(ids) == tiny_cpp.detokenize(ids).decode("utf-8", errors="replace")
        if not parse_special:
            assert tok.decode(ids) == s


def test_tiny_vocab_roundtrip_and_compression():
    tok = Tokenizer.from_metadata(V.tiny_vocab().metadata_dict())
    assert tok.vocab_size == 512 and (tok.bos_id, tok.eos_id, tok.eot_id) == (509, 510, 511)
    text = "The model reads the prompt and computes the logits for every position."
    ids = tok.encode(text, add_bos=False)
    assert len(ids) < len(text.encode()) / 2  # the learned merges do something
    for s in STRINGS:
        assert tok.decode(tok.encode(s)) == s


@pytest.mark.llama_cpp
@pytest.mark.parametrize("parse_special", [False, True])
def test_tiny_spm_vocab_matches_llama_cpp(tiny_spm_cpp, parse_special):
    tok = Tokenizer.from_metadata(V.tiny_spm_vocab().metadata_dict())
    strings = STRINGS + ["<s>a</s>", "x <s> y", "<unk>", "</s></s>"]
    bad = _compare(
        lambda s: tiny_spm_cpp.tokenize(s, add_bos=True, special=parse_special),
        lambda s: tok.encode(s, parse_special=parse_special),
        strings,
    )
    assert not bad, _report(bad, f"tiny SentencePiece vocab, parse_special={parse_special}", len(strings))
    for s in STRINGS:
        ids = tok.encode(s, add_bos=False)
        # llama.cpp's pieces keep the space the encoder put in front; our decode drops it
        ref = tiny_spm_cpp.detokenize(ids).decode("utf-8", errors="replace")
        assert tok.decode(ids) == ref.removeprefix(" "), s


def test_tiny_spm_roundtrip():
    tok = Tokenizer.from_metadata(V.tiny_spm_vocab().metadata_dict())
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 512)
    for s in STRINGS:
        assert tok.decode(tok.encode(s)) == s, s
    assert tok.encode("日", add_bos=False)[-3:] == [3 + b for b in "日".encode()]  # byte fallback


@pytest.mark.llama_cpp
def test_missing_pre_falls_back_to_default_like_llama_cpp(tmp_path, monkeypatch):
    """Without tokenizer.ggml.pre both llama.cpp and we use the 'default' pre-tokenizer."""
    monkeypatch.delenv(ENV_STRICT, raising=False)
    spec = V.tiny_vocab()
    path = tmp_path / "nopre.gguf"
    write_vocab_only_gguf(path, spec, drop=("tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token"))
    cpp = LlamaCppVocab(path)
    meta = spec.metadata_dict()
    del meta["tokenizer.ggml.pre"], meta["tokenizer.ggml.add_bos_token"]
    with pytest.warns(UserWarning, match="default"):
        tok = Tokenizer.from_metadata(meta)
    assert tok.pre == "default" and tok.add_bos is False
    bad = _compare(lambda s: cpp.tokenize(s, add_bos=False), lambda s: tok.encode(s, add_bos=False), STRINGS)
    cpp.close()
    assert not bad, _report(bad, "default pre-tokenizer", len(STRINGS))


# ----------------------------------------------------------------------------------------------------
# Error paths and environment


def _tiny_meta() -> dict:
    return V.tiny_vocab().metadata_dict()


@pytest.mark.parametrize(
    "key",
    ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"],
)
def test_missing_required_key_names_it(key, monkeypatch):
    monkeypatch.delenv(ENV_TOKENIZER, raising=False)
    meta = _tiny_meta()
    del meta[key]
    with pytest.raises(ModelError) as e:
        Tokenizer.from_metadata(meta)
    assert e.value.code == "tokenizer-missing-key"
    assert e.value.finding.key == key
    assert key in str(e.value)


def test_strict_mode_missing_pre_is_an_error(monkeypatch):
    monkeypatch.setenv(ENV_STRICT, "1")
    meta = _tiny_meta()
    del meta["tokenizer.ggml.pre"]
    with pytest.raises(ModelError) as e:
        Tokenizer.from_metadata(meta)
    assert e.value.code == "tokenizer-missing-key" and e.value.finding.key == "tokenizer.ggml.pre"


def test_non_strict_missing_pre_warns(monkeypatch):
    monkeypatch.delenv(ENV_STRICT, raising=False)
    meta = _tiny_meta()
    del meta["tokenizer.ggml.pre"]
    with pytest.warns(UserWarning, match="tokenizer.ggml.pre"):
        tok = Tokenizer.from_metadata(meta)
    assert tok.pre == "default"
    assert tok.add_bos is True  # the key is still there


@pytest.mark.parametrize(
    "change, code, key",
    [
        ({"tokenizer.ggml.model": "bert"}, "tokenizer-unsupported", "tokenizer.ggml.model"),
        ({"tokenizer.ggml.pre": "no-such-pre"}, "tokenizer-unsupported", "tokenizer.ggml.pre"),
        ({"tokenizer.ggml.merges": ["Ġ t", "nosuch token"]}, "tokenizer-bad-value", "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": ["nospace"]}, "tokenizer-bad-value", "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.bos_token_id": 99999}, "tokenizer-bad-value", "tokenizer.ggml.bos_token_id"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "tokenizer-bad-value", "tokenizer.ggml.token_type"),
        ({"tokenizer.ggml.tokens": "abc"}, "tokenizer-bad-value", "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": []}, "tokenizer-bad-value", "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.add_bos_token": "yes"}, "tokenizer-bad-value", "tokenizer.ggml.add_bos_token"),
    ],
)
def test_bad_metadata_names_the_key(change, code, key):
    meta = _tiny_meta()
    meta.update(change)
    with pytest.raises(ModelError) as e:
        Tokenizer.from_metadata(meta)
    assert e.value.code == code and e.value.finding.key == key, str(e.value)


def test_load_tokenizer_strict_and_lenient(monkeypatch):
    meta = _tiny_meta()
    meta["tokenizer.ggml.model"] = "t5"
    monkeypatch.delenv(ENV_STRICT, raising=False)
    with pytest.warns(UserWarning, match="t5"):
        assert load_tokenizer(meta) is None
    with pytest.warns(UserWarning, match="tokenizer.ggml.model"):
        assert load_tokenizer({}) is None
    monkeypatch.setenv(ENV_STRICT, "1")
    with pytest.raises(ModelError) as e:
        load_tokenizer(meta)
    assert e.value.finding.key == "tokenizer.ggml.model"
    with pytest.raises(ModelError) as e:
        load_tokenizer({})
    assert e.value.finding.key == "tokenizer.ggml.model"
    assert load_tokenizer(_tiny_meta()) is not None


def test_external_tokenizer_json(tmp_path, monkeypatch):
    tok = Tokenizer.from_metadata(_tiny_meta())
    path = tmp_path / "tokenizer.json"
    tok._hf.save(str(path))
    monkeypatch.setenv(ENV_TOKENIZER, str(path))
    ext = Tokenizer.from_metadata({"tokenizer.ggml.bos_token_id": 509, "tokenizer.ggml.add_bos_token": True})
    assert ext.source == str(path) and ext.bos_id == 509
    for s in STRINGS[:60]:
        assert ext.encode(s, parse_special=True) == tok.encode(s, parse_special=True)
        assert ext.encode(s) == tok.encode(s)
    monkeypatch.setenv(ENV_TOKENIZER, str(tmp_path / "missing.json"))
    with pytest.raises(ModelError) as e:
        Tokenizer.from_metadata(_tiny_meta())
    assert e.value.code == "tokenizer-file-missing"
    (tmp_path / "bad.json").write_text("{not json")
    monkeypatch.setenv(ENV_TOKENIZER, str(tmp_path / "bad.json"))
    with pytest.raises(ModelError) as e:
        Tokenizer.from_metadata(_tiny_meta())
    assert e.value.code == "tokenizer-bad-file"


def test_metadata_values_from_numpy_and_bytes():
    np = pytest.importorskip("numpy")
    meta = _tiny_meta()
    meta["tokenizer.ggml.token_type"] = np.array(meta["tokenizer.ggml.token_type"], dtype=np.int32)
    meta["tokenizer.ggml.model"] = b"gpt2"
    meta["tokenizer.ggml.bos_token_id"] = np.uint32(509)
    tok = Tokenizer.from_metadata(meta)
    assert tok.bos_id == 509 and tok.encode("hi")[0] == 509


def test_decode_rejects_out_of_range_ids():
    tok = Tokenizer.from_metadata(_tiny_meta())
    with pytest.raises(ValueError):
        tok.decode([512])


@pytest.mark.llama_cpp
def test_user_defined_tokens_match_llama_cpp(tmp_path):
    """User-defined tokens (type 4) are matched in the text even with parse_special off."""
    base = V.tiny_vocab()
    spec = dataclasses.replace(
        base,
        tokens=[*base.tokens, "<tool>", "ĠHELLO", "é!"],
        token_type=[*base.token_type, *[V.TOKEN_USER_DEFINED] * 3],
    )
    path = tmp_path / "user.gguf"
    write_vocab_only_gguf(path, spec)
    cpp = LlamaCppVocab(path)
    tok = Tokenizer.from_metadata(spec.metadata_dict())
    strings = ["<tool>", "a<tool>b <tool> <|eot_id|><tool>", "x ĠHELLO y", "<tool", "aé!b"] + STRINGS[:80]
    try:
        for parse_special in (False, True):
            bad = _compare(
                lambda s, p=parse_special: cpp.tokenize(s, add_bos=True, special=p),
                lambda s, p=parse_special: tok.encode(s, parse_special=p),
                strings,
            )
            assert not bad, _report(bad, f"user-defined tokens, parse_special={parse_special}", len(strings))
            for text in strings:
                ids = tok.encode(text, parse_special=parse_special)
                for special in (False, True):
                    ref = cpp.detokenize(ids, special=special).decode("utf-8", errors="replace")
                    assert tok.decode(ids, special=special) == ref, (text, special)
        ids = tok.encode("a<tool>b")
        assert 512 in ids
        assert tok.decode(ids) == cpp.detokenize(ids).decode() == "a<tool>b"
    finally:
        cpp.close()
