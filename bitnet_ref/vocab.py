"""Vocabularies to put into synthesized GGUF models (`tokenizer.ggml.*` metadata).

Three builders:

- :func:`llama3_vocab` -- the real Llama 3 vocabulary (128000 BPE ranks from the llama-models
  package plus the 256 special tokens Llama 3 defines), as llama.cpp's `gpt2` model with the
  `llama-bpe` pre-tokenizer. Needs the optional `llama-models` package (Llama 3 Community License).
- :func:`tiny_vocab` -- a small byte-level BPE (256 byte tokens, merges learned deterministically from
  a built-in English + code text, three Llama-3-named specials) for tiny CI models.
- :func:`tiny_spm_vocab` -- a small SentencePiece-style (`llama` model) vocabulary with <unk>, <s>, </s>,
  byte-fallback tokens <0x00>..<0xFF> and scored pieces.

All three are plain data (:class:`VocabSpec`); :meth:`VocabSpec.gguf_metadata` lists the exact keys,
values and GGUF value types that llama.cpp reads, and :meth:`VocabSpec.add_to_writer` puts them into a
`gguf.GGUFWriter`.
"""

from __future__ import annotations

import base64
import functools
import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import GGUFValueType

# token types (llama.cpp's llama_token_type)
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# The Llama 3 pre-tokenizer split pattern (tiktoken / tokenizer.json form).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA3_NUM_BASE_TOKENS = 128000
LLAMA3_NUM_SPECIAL_TOKENS = 256
# Named special tokens in id order from 128000 (llama_models/llama3/tokenizer.py, llama-models 0.3.0);
# the rest up to 128255 are <|reserved_special_token_{2+i}|>.
LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map used by byte-level BPE vocabularies.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the other 68 bytes map,
    in byte order, to U+0100, U+0101, ...
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes_to_str(b: bytes) -> str:
    """Bytes of a byte-level BPE token -> the token's string as stored in GGUF / tokenizer.json."""
    table = bytes_to_unicode()
    return "".join(table[x] for x in b)


def token_str_to_bytes(s: str) -> bytes:
    """Inverse of :func:`token_bytes_to_str`; raises KeyError for characters outside the map."""
    table = unicode_to_bytes()
    return bytes(table[c] for c in s)


@dataclass
class VocabSpec:
    """A tokenizer as stored in GGUF metadata.

    model: "gpt2" (byte-level BPE) or "llama" (SentencePiece). pre: the pre-tokenizer name
    (`tokenizer.ggml.pre`, e.g. "llama-bpe"; None for SentencePiece). tokens/token_type (and scores,
    merges) are indexed by token id. merges are "left right" strings in priority order.
    """

    model: str
    pre: str | None
    tokens: list[str]
    token_type: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    add_bos: bool
    add_eos: bool = False
    unk_id: int | None = None
    pad_id: int | None = None
    add_space_prefix: bool | None = None  # SentencePiece only; llama.cpp's default is True

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if len(self.token_type) != n:
            raise ValueError(f"token_type has {len(self.token_type)} entries for {n} tokens")
        if self.scores is not None and len(self.scores) != n:
            raise ValueError(f"scores has {len(self.scores)} entries for {n} tokens")
        if len(set(self.tokens)) != n:
            raise ValueError("token strings must be unique (llama.cpp asserts it)")
        for name in ("bos_id", "eos_id", "eot_id", "unk_id", "pad_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < n:
                raise ValueError(f"{name}={v} outside the vocabulary (0..{n - 1})")
        if self.model == "gpt2" and not self.merges:
            raise ValueError("a gpt2 (BPE) vocabulary needs merges: llama.cpp refuses to load without them")

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_id(self, text: str) -> int:
        return self.tokens.index(text)

    def gguf_metadata(self) -> list[tuple[str, object, GGUFValueType]]:
        """(key, value, GGUF value type) for every `tokenizer.ggml.*` key llama.cpp reads.

        Arrays carry GGUFValueType.ARRAY; their element types are STRING (tokens, merges), INT32
        (token_type) and FLOAT32 (scores) -- see :data:`ARRAY_ELEMENT_TYPES` and :meth:`add_to_writer`.
        Token ids are UINT32 as llama.cpp reads them.
        """
        K = gguf.Keys.Tokenizer
        out: list[tuple[str, object, GGUFValueType]] = [(K.MODEL, self.model, GGUFValueType.STRING)]
        if self.pre is not None:
            out.append((K.PRE, self.pre, GGUFValueType.STRING))
        out.append((K.LIST, list(self.tokens), GGUFValueType.ARRAY))
        out.append((K.TOKEN_TYPE, [int(t) for t in self.token_type], GGUFValueType.ARRAY))
        if self.scores is not None:
            out.append((K.SCORES, [float(s) for s in self.scores], GGUFValueType.ARRAY))
        if self.merges:
            out.append((K.MERGES, list(self.merges), GGUFValueType.ARRAY))
        for key, v in (
            (K.BOS_ID, self.bos_id),
            (K.EOS_ID, self.eos_id),
            (K.EOT_ID, self.eot_id),
            (K.UNK_ID, self.unk_id),
            (K.PAD_ID, self.pad_id),
        ):
            if v is not None:
                out.append((key, int(v), GGUFValueType.UINT32))
        out.append((K.ADD_BOS, bool(self.add_bos), GGUFValueType.BOOL))
        out.append((K.ADD_EOS, bool(self.add_eos), GGUFValueType.BOOL))
        if self.add_space_prefix is not None:
            out.append((K.ADD_PREFIX, bool(self.add_space_prefix), GGUFValueType.BOOL))
        return out

    def metadata_dict(self) -> dict[str, object]:
        """The metadata as a plain key -> value dict (what :class:`bitnet_ref.tokenizer.Tokenizer` reads)."""
        return {k: v for k, v, _ in self.gguf_metadata()}

    def add_to_writer(self, writer: gguf.GGUFWriter) -> None:
        """Add every key of :meth:`gguf_metadata` to a GGUFWriter with explicit array element types."""
        for key, value, vtype in self.gguf_metadata():
            sub = ARRAY_ELEMENT_TYPES.get(key) if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(key, value, vtype, sub_type=sub)


ARRAY_ELEMENT_TYPES: dict[str, GGUFValueType] = {
    gguf.Keys.Tokenizer.LIST: GGUFValueType.STRING,
    gguf.Keys.Tokenizer.MERGES: GGUFValueType.STRING,
    gguf.Keys.Tokenizer.TOKEN_TYPE: GGUFValueType.INT32,
    gguf.Keys.Tokenizer.SCORES: GGUFValueType.FLOAT32,
}


# ----------------------------------------------------------------------------------------------------
# Llama 3


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens of Llama 3 in id order (ids 128000..128255)."""
    named = list(LLAMA3_NAMED_SPECIALS)
    n_reserved = LLAMA3_NUM_SPECIAL_TOKENS - len(named)
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(n_reserved)]


def llama3_tokenizer_model_path() -> Path:
    """Path of `llama_models/llama3/tokenizer.model` (raises ImportError naming the package if absent)."""
    try:
        import llama_models
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the Llama 3 vocabulary needs the 'llama-models' package "
            "(pip install 'llama-models==0.3.0' or the project's [llama3] extra)"
        ) from e
    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.is_file():  # pragma: no cover
        raise FileNotFoundError(f"{path} not found in the installed llama-models package")
    return path


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one `base64(token) rank` per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps or duplicates")
    return ranks


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges equivalent to tiktoken's rank-based merging.

    For every token of two or more bytes, every split into two tokens that are themselves in the
    vocabulary is a merge. Merges are ordered by the merged token's rank, then by the ranks of the
    left and right parts.
    """
    merges: list[tuple[bytes, bytes]] = []
    for token in sorted(ranks, key=ranks.__getitem__):
        if len(token) < 2:
            continue
        local = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            rl = ranks.get(left)
            if rl is None:
                continue
            rr = ranks.get(right)
            if rr is None:
                continue
            local.append((rl, rr, left, right))
        local.sort()
        merges.extend((left, right) for _, _, left, right in local)
    return merges


@functools.lru_cache(maxsize=1)
def llama3_vocab() -> VocabSpec:
    """The real Llama 3 vocabulary (128256 tokens) as a `gpt2` / `llama-bpe` VocabSpec.

    Reads `llama_models/llama3/tokenizer.model` from the llama-models package. Building it takes 1-2 s
    (measured 1.1-1.8 s on a 2-core machine: reading 128000 ranks and deriving 280147 merges); the
    result is cached for the process, so treat it as read-only.
    """
    ranks = load_tiktoken_ranks(llama3_tokenizer_model_path())
    if len(ranks) != LLAMA3_NUM_BASE_TOKENS:
        raise ValueError(f"expected {LLAMA3_NUM_BASE_TOKENS} BPE ranks, found {len(ranks)}")
    by_rank = sorted(ranks, key=ranks.__getitem__)
    tokens = [token_bytes_to_str(b) for b in by_rank]
    merges = [f"{token_bytes_to_str(a)} {token_bytes_to_str(b)}" for a, b in merges_from_ranks(ranks)]
    specials = llama3_special_tokens()
    tokens += specials
    token_type = [TOKEN_NORMAL] * LLAMA3_NUM_BASE_TOKENS + [TOKEN_CONTROL] * len(specials)
    base = LLAMA3_NUM_BASE_TOKENS
    return VocabSpec(
        model="gpt2",
        pre="llama-bpe",
        tokens=tokens,
        token_type=token_type,
        scores=None,
        merges=merges,
        bos_id=base + specials.index("<|begin_of_text|>"),
        eos_id=base + specials.index("<|end_of_text|>"),
        eot_id=base + specials.index("<|eot_id|>"),
        add_bos=True,
    )


# ----------------------------------------------------------------------------------------------------
# Tiny vocabularies for CI models

# Training text for the tiny vocabularies: a little English and a little code. Changing it changes
# every tiny model's vocabulary, so treat it as frozen.
TINY_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog did not mind; it was a very lazy dog.
Once upon a time there was a little model that wanted to learn how to speak. Every day it read the
same small book, and every day it got a little better at guessing the next word in the story.
She said: "It is not the size of the model that matters, it is the quality of the tokens."
In the beginning the weights were random, but training made them useful. Ternary weights are -1, 0
and +1; the scale of each tensor is the mean of the absolute values of its weights.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 42 100 256 1024 2048 4096 3.14159 2.71828 1e-5 500000.
Questions? Answers! Lists, commas, and semicolons; colons: quotes 'single' and "double".
There are many ways to say the same thing, and there is more than one way to write a program.
When the test passes, the reference and the system under test agree on every token and every logit.

def forward(self, x, positions):
    h = self.norm(x) * self.weight
    for i, layer in enumerate(self.layers):
        h = layer(h, positions)
    return self.output(h)

class Tokenizer:
    def __init__(self, vocab, merges):
        self.vocab = dict(vocab)
        self.merges = list(merges)

    def encode(self, text: str) -> list[int]:
        return [self.vocab[t] for t in text.split() if t in self.vocab]

for (int i = 0; i < n; i++) {
    float sum = 0.0f;
    for (int j = 0; j < k; j++) {
        sum += a[i * k + j] * b[j];
    }
    out[i] = sum;
}

if __name__ == "__main__":
    import sys
    print("hello, world", file=sys.stderr)
    return 0

Activation quantization scales each row so that its largest absolute value becomes 127, rounds to
the nearest integer, and clamps the result. The model reads the prompt, computes the logits for
every position, and then generates new tokens one at a time until it reaches the end of the text.
Weather report: sunny in the morning, cloudy in the afternoon, with a chance of rain at night.
"""

TINY_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")


def _pretokenize_llama3(text: str) -> list[str]:
    import regex

    return regex.findall(LLAMA3_SPLIT_PATTERN, text)


def _learn_bpe(words: Counter, n_merges: int) -> list[tuple[bytes, bytes]]:
    """Deterministic BPE training on byte sequences.

    words: Counter of symbol tuples (each symbol a bytes object). Each step merges the most frequent
    adjacent pair (counted over word frequency); ties go to the pair that sorts first by
    (left, right). Stops early when no word has two symbols left.
    """
    seqs = [(list(w), c) for w, c in sorted(words.items())]
    merges: list[tuple[bytes, bytes]] = []
    for _ in range(n_merges):
        counts: Counter = Counter()
        for syms, c in seqs:
            for a, b in itertools.pairwise(syms):
                counts[(a, b)] += c
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        a, b = best
        for syms, _c in seqs:
            i = 0
            while i < len(syms) - 1:
                if syms[i] == a and syms[i + 1] == b:
                    syms[i : i + 2] = [a + b]
                i += 1
    return merges


@functools.lru_cache(maxsize=8)
def tiny_vocab(size: int = 512) -> VocabSpec:
    """A small byte-level BPE vocabulary (`gpt2` model, `llama-bpe` pre-tokenizer) of exactly `size` tokens.

    Ids 0..255 are the 256 byte tokens (in byte order), then the learned merges' tokens in the order
    they were learned, then <|begin_of_text|> (bos), <|end_of_text|> (eos), <|eot_id|> (eot) as
    control tokens. Merges are learned from :data:`TINY_TRAINING_TEXT` split with the Llama 3
    pattern; no randomness, so the output is the same every time. Takes ~0.1 s for size 512.
    """
    n_learned = size - 256 - len(TINY_SPECIALS)
    if n_learned < 1:
        raise ValueError(f"size must be at least {256 + len(TINY_SPECIALS) + 1}")
    words = Counter(
        tuple(bytes([x]) for x in w.encode("utf-8")) for w in _pretokenize_llama3(TINY_TRAINING_TEXT)
    )
    token_bytes: list[bytes] = [bytes([b]) for b in range(256)]
    seen = set(token_bytes)
    merges: list[tuple[bytes, bytes]] = []
    # Learn until `n_learned` new tokens exist (a merge may recreate an existing token's bytes).
    learned = _learn_bpe(words, n_learned * 2)
    for a, b in learned:
        if len(token_bytes) - 256 >= n_learned:
            break
        merges.append((a, b))
        if a + b not in seen:
            seen.add(a + b)
            token_bytes.append(a + b)
    if len(token_bytes) - 256 < n_learned:
        raise ValueError(
            f"the built-in training text yields only {len(token_bytes) - 256} merges; size {size} too large"
        )
    tokens = [token_bytes_to_str(b) for b in token_bytes] + list(TINY_SPECIALS)
    token_type = [TOKEN_NORMAL] * len(token_bytes) + [TOKEN_CONTROL] * len(TINY_SPECIALS)
    base = len(token_bytes)
    return VocabSpec(
        model="gpt2",
        pre="llama-bpe",
        tokens=tokens,
        token_type=token_type,
        scores=None,
        merges=[f"{token_bytes_to_str(a)} {token_bytes_to_str(b)}" for a, b in merges],
        bos_id=base,
        eos_id=base + 1,
        eot_id=base + 2,
        add_bos=True,
    )


SPM_SPACE = "\u2581"  # ▁


@functools.lru_cache(maxsize=8)
def tiny_spm_vocab(size: int = 512) -> VocabSpec:
    """A small SentencePiece-style vocabulary (`llama` model) of exactly `size` tokens.

    Ids: 0 <unk> (unknown), 1 <s> (bos, control), 2 </s> (eos, control), 3..258 byte-fallback tokens
    <0x00>..<0xFF> (type byte), then every character of the training text (with spaces written as ▁),
    then pieces learned by deterministic BPE over characters. Scores: 0 for the special and byte
    tokens, and a strictly decreasing negative score for characters and pieces in id order, so
    llama.cpp's highest-score-first merging never meets a tie. add_space_prefix is True.
    """
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    text = TINY_TRAINING_TEXT.replace("\n", " ")
    # SentencePiece-style words: a ▁ starts each word.
    words = Counter()
    for w in text.split(" "):
        if w:
            words[tuple(SPM_SPACE + w)] += 1
    chars = sorted({c for w in words for c in w})
    n_learned = size - len(specials) - len(byte_tokens) - len(chars)
    if n_learned < 1:
        raise ValueError(f"size must be at least {len(specials) + len(byte_tokens) + len(chars) + 1}")
    # reuse the byte-pair learner on str symbols (str and bytes both concatenate and sort)
    pieces: list[str] = []
    seen = set(chars)
    for a, b in _learn_bpe(words, n_learned * 2):
        if len(pieces) >= n_learned:
            break
        if a + b not in seen:
            seen.add(a + b)
            pieces.append(a + b)
    if len(pieces) < n_learned:
        raise ValueError(
            f"the built-in training text yields only {len(pieces)} pieces; size {size} too large"
        )
    tokens = specials + byte_tokens + chars + pieces
    token_type = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256
    token_type += [TOKEN_NORMAL] * (len(chars) + len(pieces))
    n_fixed = len(specials) + len(byte_tokens)
    # Pieces learned earlier score higher; characters below all pieces (they are never merge results).
    scores = [0.0] * n_fixed
    scores += [-float(len(pieces) + 1 + i) for i in range(len(chars))]
    scores += [-float(i) for i in range(len(pieces))]
    return VocabSpec(
        model="llama",
        pre=None,
        tokens=tokens,
        token_type=token_type,
        scores=scores,
        merges=None,
        bos_id=1,
        eos_id=2,
        eot_id=None,
        unk_id=0,
        add_bos=True,
        add_space_prefix=True,
    )
