"""The engine's tokenizer, built from GGUF `tokenizer.ggml.*` metadata on Hugging Face `tokenizers`.

Supported, matching mainline llama.cpp's behaviour:

- `gpt2` (byte-level BPE) with pre-tokenizer `llama-bpe` (also `llama3`, `llama-v3`): the Llama 3 split
  pattern and whole-word lookup before merging (`ignore_merges`); `default` (also used, with a
  warning, when `tokenizer.ggml.pre` is missing) and `gpt-2`.
- `llama` (SentencePiece-style): scored pieces merged highest score first, spaces written as U+2581,
  a space prefix (`tokenizer.ggml.add_space_prefix`, default on) before the text and after each
  special token, byte fallback to <0xXX> tokens.

Special tokens: control (type 3) and unknown (type 2) tokens are matched in the text only with
`parse_special=True`; user-defined (type 4) tokens always (as llama.cpp does). `decode` leaves control
tokens out unless `special=True`. For SentencePiece with a space prefix, `decode` drops the one
leading space the encoder added, so that decode(encode(text)) == text.

Environment:
- `BITNET_TOKENIZER=/path/tokenizer.json`: use that Hugging Face tokenizer instead of the metadata
  (bos/eos/eot ids and add_bos still come from the metadata when present).
- `BITNET_STRICT_TOKENIZERS=1`: a missing or unsupported tokenizer is an error; otherwise a missing
  `tokenizer.ggml.pre` falls back to "default" with a warning, and :func:`load_tokenizer` returns None
  (with a warning) for a model whose tokenizer cannot be built.

Errors are :class:`bitnet_ref.errors.ModelError` naming the metadata key.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence

from bitnet_ref.errors import ModelError, model_error

K_MODEL = "tokenizer.ggml.model"
K_PRE = "tokenizer.ggml.pre"
K_TOKENS = "tokenizer.ggml.tokens"
K_TOKEN_TYPE = "tokenizer.ggml.token_type"
K_SCORES = "tokenizer.ggml.scores"
K_MERGES = "tokenizer.ggml.merges"
K_BOS = "tokenizer.ggml.bos_token_id"
K_EOS = "tokenizer.ggml.eos_token_id"
K_EOT = "tokenizer.ggml.eot_token_id"
K_UNK = "tokenizer.ggml.unknown_token_id"
K_ADD_BOS = "tokenizer.ggml.add_bos_token"
K_ADD_EOS = "tokenizer.ggml.add_eos_token"
K_ADD_PREFIX = "tokenizer.ggml.add_space_prefix"

ENV_TOKENIZER = "BITNET_TOKENIZER"
ENV_STRICT = "BITNET_STRICT_TOKENIZERS"

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes, as mainline llama.cpp applies them: each regex in turn splits the pieces the
# previous one produced, keeping matches and the text between them.
_LLAMA3_REGEX = (
    # The Llama 3 pattern with llama.cpp's ASCII-only case-insensitive contractions.
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_GPT2_REGEX = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    # name: (regexes, ignore_merges)
    "llama-bpe": ((_LLAMA3_REGEX,), True),
    "llama3": ((_LLAMA3_REGEX,), True),
    "llama-v3": ((_LLAMA3_REGEX,), True),
    "default": (("[\\p{P}\\$\\+<=>\\^~\\|]+", _GPT2_REGEX, "\\p{N}+", "[0-9][0-9][0-9]"), False),
    "gpt-2": ((_GPT2_REGEX,), False),
}
SUPPORTED_PRE = tuple(_PRE_TOKENIZERS)
SUPPORTED_MODELS = ("gpt2", "llama")
SPM_SPACE = "\u2581"


def strict_mode() -> bool:
    return os.environ.get(ENV_STRICT, "").strip().lower() not in ("", "0", "false", "no", "off")


def _plain(v):
    """Metadata values as plain Python: numpy arrays -> lists, numpy scalars -> Python, bytes -> str."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8")
    if isinstance(v, (list, tuple)):
        return [x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else x for x in v]
    return v


def _missing(key: str, what: str, hint: str) -> ModelError:
    return model_error("tokenizer-missing-key", f"{what}: metadata key {key!r} is missing", hint, key=key)


def _bad(key: str, message: str, hint: str) -> ModelError:
    return model_error("tokenizer-bad-value", message, hint, key=key)


def _get_list(meta: Mapping, key: str, n: int | None, kind: type | tuple, required: bool, hint: str):
    if key not in meta or meta[key] is None:
        if required:
            raise _missing(key, "cannot build the tokenizer", hint)
        return None
    v = _plain(meta[key])
    if not isinstance(v, list):
        raise _bad(key, f"{key!r} must be an array, found {type(v).__name__}", hint)
    if n is not None and len(v) < n:
        raise _bad(key, f"{key!r} has {len(v)} entries for {n} tokens", hint)
    if v and not all(isinstance(x, kind) and not isinstance(x, bool) for x in v):
        raise _bad(key, f"{key!r} must hold {getattr(kind, '__name__', kind)} values", hint)
    return v


def _get_id(meta: Mapping, key: str, n: int) -> int | None:
    if key not in meta or meta[key] is None:
        return None
    v = _plain(meta[key])
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(key, f"{key!r} must be an integer token id, found {v!r}", "rewrite the metadata")
    if not 0 <= v < n:
        # llama.cpp warns and ignores an out-of-range id; an engine should not guess.
        raise _bad(key, f"{key!r} = {v} is outside the vocabulary (0..{n - 1})", "rewrite the metadata")
    return v


def _get_bool(meta: Mapping, key: str, default: bool) -> bool:
    if key not in meta or meta[key] is None:
        return default
    v = _plain(meta[key])
    if not isinstance(v, (bool, int)):
        raise _bad(key, f"{key!r} must be a boolean, found {v!r}", "rewrite the metadata")
    return bool(v)


class Tokenizer:
    """Text <-> token ids for one model. Build with :meth:`from_metadata` (or :func:`load_tokenizer`)."""

    def __init__(
        self,
        hf,
        *,
        model: str,
        pre: str | None,
        bos_id: int | None,
        eos_id: int | None,
        eot_id: int | None,
        add_bos: bool,
        add_eos: bool = False,
        source: str = "gguf",
        raw_tokens: Mapping[int, tuple[str, bool]] | None = None,
        strip_space_prefix: bool = False,
    ):
        self._hf = hf
        self._lock = threading.Lock()
        self.model = model
        self.pre = pre
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eot_id = eot_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.source = source
        # id -> (text, is_control) for control/unknown/user-defined tokens of GGUF-built tokenizers:
        # decode emits their text as is (not through the byte-level or ▁ decoder), as llama.cpp does.
        self._raw_tokens = dict(raw_tokens or {})
        self._strip_space_prefix = strip_space_prefix

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, meta: Mapping[str, object]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes. `meta` maps metadata keys to Python values.

        With BITNET_TOKENIZER set, the tokenizer.json it names is used instead (see module docstring).
        """
        path = os.environ.get(ENV_TOKENIZER, "").strip()
        if path:
            return cls.from_tokenizer_json(path, meta)
        model = meta.get(K_MODEL)
        if model is None:
            raise _missing(
                K_MODEL,
                "the model file has no tokenizer",
                f"set {ENV_TOKENIZER}=/path/to/tokenizer.json to use an external tokenizer",
            )
        model = _plain(model)
        if model == "gpt2":
            return cls._build_bpe(meta)
        if model == "llama":
            return cls._build_spm(meta)
        raise model_error(
            "tokenizer-unsupported",
            f"tokenizer model {model!r} is not supported (supported: {', '.join(SUPPORTED_MODELS)})",
            f"set {ENV_TOKENIZER}=/path/to/tokenizer.json to use an external tokenizer",
            key=K_MODEL,
        )

    @classmethod
    def from_tokenizer_json(
        cls, path: str | os.PathLike, meta: Mapping[str, object] | None = None
    ) -> Tokenizer:
        """A Hugging Face tokenizer.json; special ids and add_bos from `meta` when given."""
        from tokenizers import Tokenizer as HFTokenizer

        meta = meta or {}
        if not os.path.isfile(path):
            raise model_error(
                "tokenizer-file-missing",
                f"tokenizer file {os.fspath(path)!r} (from {ENV_TOKENIZER}) does not exist",
                f"point {ENV_TOKENIZER} at a Hugging Face tokenizer.json, or unset it",
                path=os.fspath(path),
            )
        try:
            hf = HFTokenizer.from_file(os.fspath(path))
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise model_error(
                "tokenizer-bad-file",
                f"cannot read tokenizer file {os.fspath(path)!r}: {e}",
                "the file must be a Hugging Face tokenizer.json",
                path=os.fspath(path),
            ) from e
        n = hf.get_vocab_size(with_added_tokens=True)
        return cls(
            hf,
            model=_plain(meta.get(K_MODEL, "external")),
            pre=_plain(meta.get(K_PRE)),
            bos_id=_get_id(meta, K_BOS, n),
            eos_id=_get_id(meta, K_EOS, n),
            eot_id=_get_id(meta, K_EOT, n),
            add_bos=_get_bool(meta, K_ADD_BOS, False),
            add_eos=_get_bool(meta, K_ADD_EOS, False),
            source=os.fspath(path),
        )

    @staticmethod
    def _common(meta: Mapping, hint: str):
        tokens = _get_list(meta, K_TOKENS, None, str, True, hint)
        if not tokens:
            raise _bad(K_TOKENS, f"{K_TOKENS!r} is empty", hint)
        n = len(tokens)
        types = _get_list(meta, K_TOKEN_TYPE, n, int, False, hint)
        if types is None:
            types = [TOKEN_NORMAL] * n
        if len(set(tokens)) != n:
            raise _bad(K_TOKENS, f"{K_TOKENS!r} holds duplicate token strings", hint)
        return tokens, types[:n]

    @staticmethod
    def _raw_token_map(tokens: Sequence[str], types: Sequence[int]) -> dict[int, tuple[str, bool]]:
        return {
            i: (t, ty != TOKEN_USER_DEFINED)
            for i, (t, ty) in enumerate(zip(tokens, types))
            if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED)
        }

    @staticmethod
    def _add_special_tokens(hf, tokens: Sequence[str], types: Sequence[int]) -> None:
        from tokenizers import AddedToken

        control = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN)
        ]
        user = [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == TOKEN_USER_DEFINED
        ]
        if control:
            hf.add_special_tokens(control)
        if user:
            hf.add_tokens(user)

    @classmethod
    def _build_bpe(cls, meta: Mapping) -> Tokenizer:
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        hint = "regenerate the GGUF file with a complete tokenizer, or set BITNET_TOKENIZER"
        tokens, types = cls._common(meta, hint)
        n = len(tokens)
        merges_raw = _get_list(
            meta, K_MERGES, None, str, True, hint + " (llama.cpp requires merges for gpt2)"
        )
        merges = []
        vocab = {t: i for i, t in enumerate(tokens)}
        for i, m in enumerate(merges_raw):
            pos = m.find(" ", 1)  # the split point llama.cpp uses
            if pos < 0:
                raise _bad(K_MERGES, f"merge {i} ({m!r}) has no space separating its two parts", hint)
            a, b = m[:pos], m[pos + 1 :]
            if a not in vocab or b not in vocab or a + b not in vocab:
                raise _bad(K_MERGES, f"merge {i} ({m!r}) names tokens that are not in the vocabulary", hint)
            merges.append((a, b))

        pre = meta.get(K_PRE)
        if pre is None:
            if strict_mode():
                raise _missing(
                    K_PRE,
                    f"{ENV_STRICT} is set and the pre-tokenizer type is missing",
                    "regenerate the GGUF with tokenizer.ggml.pre (e.g. 'llama-bpe'), or unset strict mode",
                )
            warnings.warn(
                f"GGUF has no {K_PRE!r}; using 'default' like llama.cpp (tokenization will be degraded)",
                stacklevel=3,
            )
            pre = "default"
        pre = _plain(pre)
        if pre not in _PRE_TOKENIZERS:
            raise model_error(
                "tokenizer-unsupported",
                f"pre-tokenizer {pre!r} is not supported (supported: {', '.join(SUPPORTED_PRE)})",
                "set BITNET_TOKENIZER=/path/to/tokenizer.json to use an external tokenizer",
                key=K_PRE,
            )
        regexes, ignore_merges = _PRE_TOKENIZERS[pre]

        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        hf.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
        hf.decoder = decoders.ByteLevel()
        cls._add_special_tokens(hf, tokens, types)
        return cls(
            hf,
            model="gpt2",
            pre=pre,
            bos_id=_get_id(meta, K_BOS, n),
            eos_id=_get_id(meta, K_EOS, n),
            eot_id=_get_id(meta, K_EOT, n),
            # llama.cpp's defaults when the key is absent: on for the Llama 3 pre-tokenizers
            add_bos=_get_bool(meta, K_ADD_BOS, ignore_merges),
            add_eos=_get_bool(meta, K_ADD_EOS, False),
            raw_tokens=cls._raw_token_map(tokens, types),
        )

    @classmethod
    def _build_spm(cls, meta: Mapping) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, normalizers

        hint = "regenerate the GGUF file with a complete tokenizer, or set BITNET_TOKENIZER"
        tokens, types = cls._common(meta, hint)
        n = len(tokens)
        scores = _get_list(meta, K_SCORES, n, (int, float), False, hint)
        if scores is None:
            if strict_mode():
                raise _missing(
                    K_SCORES, f"{ENV_STRICT} is set and the SentencePiece scores are missing", hint
                )
            warnings.warn(f"GGUF has no {K_SCORES!r}; all pieces score 0 (merge order by id)", stacklevel=3)
            scores = [0.0] * n
        scores = [float(s) for s in scores[:n]]
        vocab = {t: i for i, t in enumerate(tokens)}
        normal = {t for t, ty in zip(tokens, types) if ty in (TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_USER_DEFINED)}
        # A SentencePiece vocabulary merges, highest score first (ties: leftmost), any two adjacent
        # pieces whose concatenation is a piece: as BPE merges, every split of a piece into two pieces,
        # ordered by the merged piece's score.
        merges_scored = []
        for t, i in vocab.items():
            if t not in normal or len(t) < 2:
                continue
            for k in range(1, len(t)):
                a, b = t[:k], t[k:]
                if a in normal and b in normal:
                    merges_scored.append((-scores[i], i, vocab[a], vocab[b], a, b))
        merges_scored.sort()
        merges = [(a, b) for *_, a, b in merges_scored]
        unk_id = _get_id(meta, K_UNK, n)
        if unk_id is None:
            unk_id = 0 if n > 0 and types[0] == TOKEN_UNKNOWN else None
        byte_fallback = all(f"<0x{b:02X}>" in vocab for b in range(256))
        model = models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=tokens[unk_id] if unk_id is not None else None,
            byte_fallback=byte_fallback,
            fuse_unk=True,
        )
        hf = HFTokenizer(model)
        add_prefix = _get_bool(meta, K_ADD_PREFIX, True)
        norm = [normalizers.Replace(" ", SPM_SPACE)]
        if add_prefix:
            norm.insert(0, normalizers.Prepend(SPM_SPACE))
        hf.normalizer = normalizers.Sequence(norm)
        # (the space prefix is stripped in decode(), once, at the start of the text)
        hf.decoder = decoders.Sequence(
            [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        cls._add_special_tokens(hf, tokens, types)
        return cls(
            hf,
            model="llama",
            pre=None,
            bos_id=_get_id(meta, K_BOS, n) if K_BOS in meta else (1 if n > 1 else None),
            eos_id=_get_id(meta, K_EOS, n) if K_EOS in meta else (2 if n > 2 else None),
            eot_id=_get_id(meta, K_EOT, n),
            add_bos=_get_bool(meta, K_ADD_BOS, True),
            add_eos=_get_bool(meta, K_ADD_EOS, False),
            raw_tokens=cls._raw_token_map(tokens, types),
            strip_space_prefix=add_prefix,
        )

    # -- use ----------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(
        self, text: str, add_bos: bool | None = None, parse_special: bool = False, add_eos: bool | None = None
    ) -> list[int]:
        """Token ids of `text`.

        add_bos/add_eos: None takes `tokenizer.ggml.add_bos_token` / `add_eos_token`. parse_special:
        whether control-token text such as "<|eot_id|>" becomes that token (user-defined tokens always
        do), as llama.cpp's `parse_special`.
        """
        with self._lock:
            self._hf.encode_special_tokens = not parse_special
            ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos
        if add_eos is None:
            add_eos = self.add_eos
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of token ids, like concatenating llama.cpp's token_to_piece.

        Control tokens are left out unless `special`; user-defined tokens give their text as stored.
        For SentencePiece with a space prefix, the one leading space of the text is dropped, so that
        decode(encode(text)) == text. Bytes that do not form valid UTF-8 become U+FFFD.
        """
        ids = [int(i) for i in ids]
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} outside the vocabulary (0..{n - 1})")
        if not self._raw_tokens:  # an external tokenizer.json: its own decoder decides
            return self._hf.decode(ids, skip_special_tokens=not special)
        parts: list[str] = []
        run: list[int] = []
        first_is_text = None
        for i in [*ids, None]:
            raw = self._raw_tokens.get(i) if i is not None else None
            if i is not None and raw is None:
                run.append(i)
                continue
            if run:
                parts.append(self._hf.decode(run, skip_special_tokens=False))
                first_is_text = True if first_is_text is None else first_is_text
                run = []
            if raw is not None and (special or not raw[1]):
                parts.append(raw[0])
                first_is_text = False if first_is_text is None else first_is_text
        text = "".join(parts)
        if self._strip_space_prefix and first_is_text and text.startswith(" "):
            text = text[1:]
        return text

    def token_to_piece(self, token_id: int) -> str:
        """The stored string of one token (byte-level or ▁-escaped form, as in the GGUF)."""
        piece = self._hf.id_to_token(int(token_id))
        if piece is None:
            raise ValueError(f"token id {token_id} outside the vocabulary")
        return piece

    def token_id(self, piece: str) -> int | None:
        return self._hf.token_to_id(piece)


def load_tokenizer(meta: Mapping[str, object]) -> Tokenizer | None:
    """:meth:`Tokenizer.from_metadata`, except that without BITNET_STRICT_TOKENIZERS a model whose
    tokenizer is missing or unsupported gives None and a warning (the engine can still run on ids)."""
    try:
        return Tokenizer.from_metadata(meta)
    except ModelError as e:
        if strict_mode() or e.code not in ("tokenizer-missing-key", "tokenizer-unsupported"):
            raise
        warnings.warn(f"no tokenizer: {e}", stacklevel=2)
        return None
