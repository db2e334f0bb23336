"""Model hyper-parameters from GGUF metadata, and the tensor shapes they imply."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import model_error

# architecture -> FFN activation (FORMATS.md): mainline's `bitnet` is SiLU-gated; bitnet.cpp's 2B-4T
# names (`bitnet-b1.58`, formerly `bitnet-25`) are ReLU^2-gated.
ARCHITECTURES = {"bitnet": "silu", "bitnet-b1.58": "relu2", "bitnet-25": "relu2"}

# keys every reference requires, without the "<arch>." prefix
REQUIRED_KEYS = (
    "context_length",
    "embedding_length",
    "block_count",
    "attention.layer_norm_rms_epsilon",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
)
# Upper bounds far above any real model (2B-4T: 30 layers, hidden 2560, ffn 6912, context 4096): a value past
# one is corruption, and taking it at face value would build billions of tensor names.
LIMITS = {"context_length": 1 << 24, "embedding_length": 1 << 17, "block_count": 4096,
          "feed_forward_length": 1 << 20, "attention.head_count": 4096, "attention.head_count_kv": 4096}
# the required keys that are real numbers; the others are integers
FLOAT_KEYS = ("attention.layer_norm_rms_epsilon",)
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_sub_norm",
                 "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "ffn_sub_norm")
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    context: int
    rms_eps: float
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def activation(self) -> str:
        return ARCHITECTURES[self.arch]

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """numpy-order shapes of every tensor the architecture uses (output tied to token_embd)."""
        kv = self.kv_heads * self.head_dim
        shapes = {"token_embd.weight": (self.vocab, self.hidden), "output_norm.weight": (self.hidden,)}
        per_layer = {
            "attn_norm": (self.hidden,), "attn_q": (self.hidden, self.hidden), "attn_k": (kv, self.hidden),
            "attn_v": (kv, self.hidden), "attn_output": (self.hidden, self.hidden),
            "attn_sub_norm": (self.hidden,), "ffn_norm": (self.hidden,), "ffn_gate": (self.ffn, self.hidden),
            "ffn_up": (self.ffn, self.hidden), "ffn_down": (self.hidden, self.ffn),
            "ffn_sub_norm": (self.ffn,),
        }
        for i in range(self.layers):
            for name, shape in per_layer.items():
                shapes[f"blk.{i}.{name}.weight"] = shape
        return shapes

    def n_params(self) -> int:
        total = 0
        for shape in self.tensor_shapes().values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def metadata(self) -> dict[str, object]:
        """The hyper-parameter keys as written into GGUF (values typed as the references read them)."""
        a = self.arch
        return {
            "general.architecture": a,
            f"{a}.vocab_size": self.vocab,
            f"{a}.context_length": self.context,
            f"{a}.embedding_length": self.hidden,
            f"{a}.block_count": self.layers,
            f"{a}.feed_forward_length": self.ffn,
            f"{a}.attention.head_count": self.heads,
            f"{a}.attention.head_count_kv": self.kv_heads,
            f"{a}.attention.layer_norm_rms_epsilon": float(self.rms_eps),
            f"{a}.rope.freq_base": float(self.rope_theta),
            f"{a}.rope.dimension_count": self.head_dim,
        }

    @classmethod
    def from_metadata(cls, meta: dict, path: str | None = None) -> ModelConfig:
        """`meta` maps keys to plain values. Raises ModelError naming the first missing or bad key."""
        arch = meta.get("general.architecture")
        if arch is None:
            raise model_error("missing-metadata", "general.architecture is missing",
                              "the file is not a model GGUF, or its converter is broken",
                              path=path, key="general.architecture")
        if arch not in ARCHITECTURES:
            raise model_error("unsupported-architecture",
                              f"architecture {arch!r} is not a BitNet architecture "
                              f"({', '.join(ARCHITECTURES)})",
                              "use a BitNet b1.58 model", path=path, key="general.architecture")
        values = {}
        for k in REQUIRED_KEYS:
            key = f"{arch}.{k}"
            v = meta.get(key)
            if v is None:
                raise model_error("missing-metadata", f"{key} is missing (the references require it)",
                                  "add the key with the converter (see FORMATS.md's required list)",
                                  path=path, key=key)
            values[k] = _check_number(key, v, path, integer=k not in FLOAT_KEYS, limit=LIMITS.get(k))
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab_key = f"{arch}.vocab_size"
        if meta.get(vocab_key) is not None:
            vocab = _check_number(vocab_key, meta[vocab_key], path, integer=True, limit=1 << 24)
        else:
            vocab = len(tokens) if isinstance(tokens, list) else 0
        rope_key = f"{arch}.rope.freq_base"
        rope_theta = 10000.0
        if meta.get(rope_key) is not None:
            rope_theta = float(_check_number(rope_key, meta[rope_key], path, integer=False, limit=None))
        heads = values["attention.head_count"]
        kv_heads = values["attention.head_count_kv"]
        hidden = values["embedding_length"]
        if hidden % heads or heads % kv_heads:
            raise model_error(
                "bad-metadata",
                f"embedding_length {hidden}, head_count {heads}, head_count_kv {kv_heads}: the hidden size "
                f"must divide by the heads and the heads by the KV heads",
                "fix the hyper-parameters", path=path, key=f"{arch}.attention.head_count",
            )
        return cls(
            arch=arch, hidden=hidden, ffn=values["feed_forward_length"],
            layers=values["block_count"], heads=heads, kv_heads=kv_heads, vocab=vocab,
            context=values["context_length"],
            rms_eps=float(values["attention.layer_norm_rms_epsilon"]),
            rope_theta=rope_theta,
        )


def _check_number(key: str, v, path: str | None, integer: bool, limit: int | None):
    """`v` as a positive int (integer=True) or a positive finite number; ModelError otherwise. A float
    where an integer belongs is refused rather than truncated: int(0.5) == 0 would pass a `> 0` check and
    divide by zero later (a single flipped bit does it)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise model_error("bad-metadata", f"{key} = {v!r} is not a number",
                          "fix the converter that wrote this file", path=path, key=key)
    if isinstance(v, float) and not math.isfinite(v):
        raise model_error("metadata-not-finite", f"{key} = {v!r} is not a finite number",
                          "the value is corrupt (NaN or infinity): the file is damaged or its converter is broken",
                          path=path, key=key)
    if integer and not isinstance(v, int):
        raise model_error("metadata-not-integer", f"{key} = {v!r} is a float; it must be an integer",
                          "write the key as an integer type (the references read it as uint32): the file is "
                          "damaged or its converter is broken", path=path, key=key)
    if v <= 0:
        raise model_error("bad-metadata", f"{key} = {v!r} is not a positive number",
                          "fix the converter that wrote this file", path=path, key=key)
    if limit is not None and v > limit:
        raise model_error("bad-metadata", f"{key} = {v!r} is implausibly large (limit {limit})",
                          "the value is corrupt: the file is damaged or its converter is broken",
                          path=path, key=key)
    return v
