"""Validation of a parsed GGUF model: a list of findings, each with a stable code, a severity, a
location and a hint. Errors mean a reference would refuse the file or compute garbage; warnings mean
it loads but something is degraded or ambiguous.

Finding codes (stable; tools match on them):
  bad-alignment, tensor-misaligned, tensor-out-of-bounds, tensor-overlap, tensor-gap, unknown-type,
  tensor-shape-not-blockable, duplicate-tensor, duplicate-key, missing-metadata, bad-metadata,
  metadata-not-integer (a float where an integer belongs), metadata-not-finite (NaN or infinity),
  unsupported-architecture, missing-tensor, tensor-shape-mismatch, unused-tensor, non-finite-scale,
  non-finite-norm, missing-tokenizer, tokenizer-size-mismatch, tokenizer-inconsistent, missing-merges,
  missing-pre-tokenizer, special-token-out-of-range, i2s-flavour-unknown, type-39-is-mxfp4,
  tl-shape-without-kernels
Reader codes (the file cannot be parsed; raised, not listed): bad-magic, unsupported-version,
  truncated-header, truncated-metadata, truncated-tensor-directory, bad-string-length,
  bad-string-encoding, bad-array-length, bad-count, bad-dimensions, unknown-value-type.
"""

from __future__ import annotations

import numpy as np

from ..config import ARCHITECTURES, REQUIRED_KEYS, ModelConfig
from ..errors import ERROR, INFO, WARNING, Finding, FormatError, ModelError
from ..formats import I2S_FLAVOUR_KEY
from .reader import GGUFFile, TensorInfo, open_gguf
from .types import I2_S, TL1, TL2, block_size, is_known, tensor_nbytes

NORM_SUFFIXES = ("_norm.weight",)


class _Findings(list):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def add(self, code, severity, message, hint, **where):
        self.append(Finding(code=code, severity=severity, message=message, hint=hint, path=self.path, **where))


def validate_file(path) -> list[Finding]:
    """Findings for the file at `path`; a file that cannot be parsed gives its one reader finding."""
    try:
        gf = open_gguf(path)
    except ModelError as e:
        return [e.finding]
    with gf:
        return validate(gf)


def validate(gf: GGUFFile) -> list[Finding]:
    out = _Findings(gf.path)
    _check_layout(gf, out)
    cfg = _check_metadata(gf, out)
    if cfg is not None:
        _check_tensors(gf, cfg, out)
    _check_tokenizer(gf, out)
    _check_values(gf, out)
    return list(out)


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == ERROR]


# -- container layout ---------------------------------------------------------------------------------
def _check_layout(gf: GGUFFile, out: _Findings) -> None:
    for key, at in gf.duplicate_keys:
        out.add("duplicate-key", WARNING, f"metadata key {key!r} appears more than once; the last value is used",
                "rewrite the file with each key once", offset=at, key=key)
    a = gf.alignment
    if a <= 0 or a & (a - 1):
        out.add("bad-alignment", ERROR, f"general.alignment = {a} is not a positive power of two",
                "set general.alignment to 32 (the default) and rewrite the file", key="general.alignment")
        a = 0
    seen = set()
    spans = []
    for t in gf.tensors:
        if t.name in seen:
            out.add("duplicate-tensor", ERROR, f"tensor name {t.name!r} appears more than once",
                    "the converter wrote a tensor twice: rewrite the file", offset=t.info_offset, tensor=t.name)
        seen.add(t.name)
        if not is_known(t.type_id):
            why = " (I8_S is bitnet.cpp's activation scratch type, never stored)" if t.type_id == 37 else ""
            out.add("unknown-type", ERROR, f"tensor {t.name!r} has type id {t.type_id}{why}",
                    "the file was written for an engine this tool does not know", offset=t.info_offset,
                    tensor=t.name)
            continue
        if a and t.offset % a:
            out.add("tensor-misaligned", ERROR,
                    f"tensor {t.name!r} starts at data offset {t.offset}, not a multiple of the alignment {a}",
                    "the writer ignored general.alignment: rewrite the file with a conforming tool",
                    offset=t.data_start, tensor=t.name)
        n = t.nbytes
        if n is None:
            out.add("tensor-shape-not-blockable", ERROR,
                    f"tensor {t.name!r} of type {t.type_name} has shape {t.shape}, which that type cannot hold"
                    + _block_note(t.type_id),
                    "store this tensor in a type whose block divides the row length", offset=t.info_offset,
                    tensor=t.name)
            continue
        if t.data_start + n > gf.file_size:
            out.add("tensor-out-of-bounds", ERROR,
                    f"tensor {t.name!r} ({t.type_name}, {n} bytes) ends at byte {t.data_start + n}, past the end "
                    f"of the file ({gf.file_size} bytes)",
                    "the file is truncated: download or write it again", offset=t.data_start, tensor=t.name)
        spans.append((t.data_start, t.data_start + n, t))
    spans.sort(key=lambda s: s[0])
    for (s0, e0, t0), (s1, _e1, t1) in zip(spans, spans[1:]):
        if s1 < e0:
            out.add("tensor-overlap", ERROR,
                    f"tensor {t1.name!r} starts at byte {s1}, inside tensor {t0.name!r} (bytes {s0}..{e0})",
                    "a tensor's byte size or offset is wrong: the type or shape does not match the data",
                    offset=s1, tensor=t1.name)
        elif a and s1 - e0 >= a:
            _check_gap(t0, s1 - s0, out)


def _block_note(type_id: int) -> str:
    bs = block_size(type_id)
    if bs:
        return f" (rows must be a multiple of {bs[0]} values)"
    if type_id == TL2:
        return " (TL2 needs a 2-D tensor with K >= 256)"
    return ""


def _check_gap(t: TensorInfo, span: int, out: _Findings) -> None:
    """More room before the next tensor than the size rule gives: the type id may mean something else."""
    if t.type_id == TL2 and tensor_nbytes(39, t.ne) is not None:
        mxfp4 = t.n_elements // 32 * 17
        if span >= mxfp4 > tensor_nbytes(TL2, t.ne):
            out.add("type-39-is-mxfp4", ERROR,
                    f"tensor {t.name!r} has type id 39 and {span} bytes of room, which fits mainline's MXFP4 "
                    f"({mxfp4} bytes), not bitnet.cpp's TL2 ({tensor_nbytes(TL2, t.ne)} bytes)",
                    "type id 39 means MXFP4 in mainline ggml and TL2 in bitnet.cpp: this file is a mainline "
                    "MXFP4 model, not a BitNet one", offset=t.data_start, tensor=t.name)
            return
    out.add("tensor-gap", WARNING,
            f"tensor {t.name!r} ({t.type_name}) has {span} bytes of room before the next tensor, more than its "
            f"size rule gives ({t.nbytes} bytes, padded)",
            "the type id or shape may not be what the writer meant: check the converter",
            offset=t.data_start, tensor=t.name)


# -- metadata and tensors against the architecture ---------------------------------------------------
def _plain(gf: GGUFFile) -> dict:
    return {k: mv.value for k, mv in gf.metadata.items()}


def _check_metadata(gf: GGUFFile, out: _Findings) -> ModelConfig | None:
    arch = gf.architecture
    if arch is None:
        out.add("missing-metadata", ERROR, "general.architecture is missing",
                "the file is not a model GGUF, or its converter is broken", key="general.architecture")
        return None
    if arch not in ARCHITECTURES:
        out.add("unsupported-architecture", ERROR,
                f"architecture {arch!r} is not a BitNet architecture ({', '.join(ARCHITECTURES)})",
                "bitnet-crossval checks BitNet b1.58 models", key="general.architecture")
        return None
    if arch == "bitnet-25":
        out.add("unsupported-architecture", WARNING,
                "architecture 'bitnet-25' is the old name of 'bitnet-b1.58'; current bitnet.cpp may refuse it",
                "pin the model revision, or rename the architecture keys", key="general.architecture")
    missing = [f"{arch}.{k}" for k in REQUIRED_KEYS if f"{arch}.{k}" not in gf.metadata]
    for key in missing:
        out.add("missing-metadata", ERROR, f"{key} is missing (the references require it)",
                "add the key with the converter", key=key)
    if missing:
        return None
    try:
        return ModelConfig.from_metadata(_plain(gf), gf.path)
    except ModelError as e:
        out.append(e.finding)
        return None


def _check_tensors(gf: GGUFFile, cfg: ModelConfig, out: _Findings) -> None:
    expected = cfg.tensor_shapes()
    for name, shape in expected.items():
        if not gf.has_tensor(name):
            out.add("missing-tensor", ERROR, f"tensor {name!r} (shape {shape}) is missing",
                    "the converter skipped a tensor: reconvert the model", tensor=name)
            continue
        t = gf.tensor(name)
        if t.shape != shape:
            out.add("tensor-shape-mismatch", ERROR,
                    f"tensor {name!r} has shape {t.shape}; the hyper-parameters (hidden {cfg.hidden}, ffn "
                    f"{cfg.ffn}, heads {cfg.heads}/{cfg.kv_heads}, head_dim {cfg.head_dim}, vocab {cfg.vocab}) "
                    f"give {shape}",
                    "the metadata and the weights disagree: check the converter's hyper-parameters",
                    offset=t.info_offset, tensor=name)
        if t.type_id in (TL1, TL2) and len(shape) == 2:
            _check_tl_shape(t, out)
    for t in gf.tensors:
        if t.name in expected:
            continue
        if t.name.endswith(".scale") and t.ne == (1,):
            continue
        note = " (the references use the tied token_embd instead)" if t.name == "output.weight" else ""
        out.add("unused-tensor", INFO, f"tensor {t.name!r} is not used by the {cfg.arch} graph{note}",
                "nothing to do unless you expected it to be used", tensor=t.name)


def _check_tl_shape(t: TensorInfo, out: _Findings) -> None:
    from ..formats import get_format

    try:
        get_format(t.type_id).check_shape(t.shape)
    except FormatError as e:
        out.add("tl-shape-without-kernels", WARNING, f"tensor {t.name!r}: {e}",
                "bitnet.cpp runs TL1/TL2 only for the shapes its code generator was run with: generate "
                "kernels for this shape or use I2_S", tensor=t.name)


# -- tokenizer ------------------------------------------------------------------------------------------
def _check_tokenizer(gf: GGUFFile, out: _Findings) -> None:
    model = gf.get("tokenizer.ggml.model")
    if model is None:
        out.add("missing-tokenizer", ERROR, "tokenizer.ggml.model is missing (the references require it)",
                "add the tokenizer metadata with the converter", key="tokenizer.ggml.model")
        return
    tokens = gf.get("tokenizer.ggml.tokens")
    if model == "none":
        return
    if not isinstance(tokens, list) or not tokens:
        out.add("missing-tokenizer", ERROR, "tokenizer.ggml.tokens is missing or empty",
                "add the vocabulary with the converter", key="tokenizer.ggml.tokens")
        return
    n = len(tokens)
    if gf.has_tensor("token_embd.weight"):
        rows = gf.tensor("token_embd.weight").shape[-2:][0]
        if rows != n:
            out.add("tokenizer-size-mismatch", ERROR,
                    f"the tokenizer has {n} tokens but token_embd has {rows} rows",
                    "the vocabulary and the embedding must have one row per token", key="tokenizer.ggml.tokens")
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        arr = gf.get(key)
        if arr is not None and not isinstance(arr, (list, tuple, np.ndarray)):
            out.add("tokenizer-inconsistent", ERROR, f"{key} is a {type(arr).__name__}, not an array",
                    "rewrite the tokenizer metadata with one entry per token", key=key)
        elif arr is not None and len(arr) != n:
            out.add("tokenizer-inconsistent", ERROR, f"{key} has {len(arr)} entries for {n} tokens",
                    "rewrite the tokenizer metadata with one entry per token", key=key)
    if model == "gpt2":
        merges = gf.get("tokenizer.ggml.merges")
        if not merges:
            out.add("missing-merges", ERROR, "a gpt2 (BPE) tokenizer without tokenizer.ggml.merges",
                    "add the BPE merges with the converter", key="tokenizer.ggml.merges")
        if gf.get("tokenizer.ggml.pre") is None:
            out.add("missing-pre-tokenizer", WARNING,
                    "tokenizer.ggml.pre is missing: llama.cpp falls back to 'default' and tokenizes differently",
                    "set tokenizer.ggml.pre (e.g. 'llama-bpe' for Llama 3 vocabularies)",
                    key="tokenizer.ggml.pre")
    elif model == "llama" and gf.get("tokenizer.ggml.scores") is None:
        out.add("tokenizer-inconsistent", ERROR, "a llama (SentencePiece) tokenizer without scores",
                "add tokenizer.ggml.scores", key="tokenizer.ggml.scores")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        v = gf.get(key)
        if v is not None and not (isinstance(v, int) and 0 <= v < n):
            out.add("special-token-out-of-range", ERROR, f"{key} = {v!r} is outside the vocabulary (0..{n - 1})",
                    "fix the special token id", key=key)


# -- values: scales and norms (reads only norms and scale bytes, never whole weight tensors) -------------
def _check_values(gf: GGUFFile, out: _Findings) -> None:
    from ..formats import TQ1_0, TQ2_0

    has_i2s = False
    for t in gf.tensors:
        n = t.nbytes
        if n is None or t.data_start + n > gf.file_size:
            continue
        data = gf.data[t.data_start : t.data_start + n]
        if t.name.endswith(NORM_SUFFIXES) and t.type_id in (0, 1):
            vals = data.view(np.float32 if t.type_id == 0 else np.float16)
            bad = ~np.isfinite(vals)
            if bad.any():
                out.add("non-finite-norm", ERROR,
                        f"norm weight {t.name!r} has {int(bad.sum())} non-finite values (first at index "
                        f"{int(np.argmax(bad))})", "the model is damaged: reconvert it",
                        offset=t.data_start, tensor=t.name)
        elif t.type_id in (I2_S, TL1, TL2):
            has_i2s |= t.type_id == I2_S
            at = t.data_start + (n - 32 if t.type_id == TL2 else t.n_elements // 4)
            scale = gf.data[at : at + 4].view(np.float32)[0]
            if not np.isfinite(scale):
                out.add("non-finite-scale", ERROR, f"tensor {t.name!r} has a non-finite scale ({scale})",
                        "the model is damaged: reconvert it", offset=at, tensor=t.name)
        elif t.type_id in (TQ1_0.type_id, TQ2_0.type_id):
            fmt = TQ1_0 if t.type_id == TQ1_0.type_id else TQ2_0
            d = data.reshape(-1, fmt._block_bytes)[:, -2:].copy().view(np.float16)
            bad = ~np.isfinite(d)
            if bad.any():
                blk = int(np.argmax(bad))
                out.add("non-finite-scale", ERROR,
                        f"tensor {t.name!r} has {int(bad.sum())} blocks with a non-finite scale (first: block {blk})",
                        "the model is damaged: reconvert it", offset=t.data_start + blk * fmt._block_bytes,
                        tensor=t.name)
    if has_i2s and gf.get(I2S_FLAVOUR_KEY) is None:
        out.add("i2s-flavour-unknown", WARNING,
                "the file has I2_S tensors, and their bytes read the same size on x86 (128-value blocks) "
                "and ARM (64-value blocks) builds: nothing in the file says which one wrote it",
                f"this tool reads the x86 flavour unless told otherwise (BITNET_I2S_FLAVOUR=arm, or the "
                f"{I2S_FLAVOUR_KEY} key); if logits disagree, try the other flavour", key=I2S_FLAVOUR_KEY)
