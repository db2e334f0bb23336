"""Synthetic BitNet b1.58 models: presets x architectures x weight formats x tokenizers.

The same arguments give byte-identical files: every tensor draws from its own generator seeded by
(seed, tensor name, chunk), so the order of writing and the layer count do not change other tensors.

Numerics are chosen to look like a trained model's, so that cross-validation has something to
measure: latent projection weights are Gaussian with variance 1/K and are absmean-quantized to
ternary (scales rounded to values float16 holds exactly, so every format stores the same model);
norm gains vary around 1; the output norm is set so that logits have a standard deviation of
about TARGET_LOGIT_STD. Perplexities stay finite (bitnet.cpp's own dummy generator gives ~1e51).

Large files are written streaming: one tensor (the embedding: one chunk of rows) at a time.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .config import PROJECTIONS, ModelConfig
from .errors import FormatError
from .formats import F16, F32, I2S_FLAVOUR_KEY, get_format
from .formats.base import absmean_quantize
from .gguf import TensorSpec, write_gguf

TARGET_LOGIT_STD = 4.0
EMBED_STD = 0.05
EMBED_CHUNK_ROWS = 8192

FORMAT_NAMES = ("f32", "f16", "tq1_0", "tq2_0", "i2_s", "tl1", "tl2")
FILE_TYPE = {"f32": 0, "f16": 1, "tq1_0": 36, "tq2_0": 37, "tl1": 38, "tl2": 39, "i2_s": 40}
ARCHS = ("bitnet", "bitnet-b1.58")


@dataclass(frozen=True)
class Preset:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    context: int
    rope_theta: float
    tokenizer: str  # default tokenizer
    rms_eps: float = 1e-5


PRESETS = {
    # CI-sized: every dimension a multiple of 256 so that all formats but TL1/TL2 can hold it
    "tiny": Preset(hidden=256, ffn=512, layers=2, heads=4, kv_heads=2, context=512,
                   rope_theta=10000.0, tokenizer="tiny"),
    # the bitnet_b1_58-large shapes that bitnet.cpp's TL2 code generator ships kernels for:
    # 1536x1536 (q, k, v, o), 4096x1536 (gate, up), 1536x4096 (down)
    "large-shapes": Preset(hidden=1536, ffn=4096, layers=2, heads=16, kv_heads=16, context=2048,
                           rope_theta=10000.0, tokenizer="tiny"),
    # the real microsoft/bitnet-b1.58-2B-4T shape (full size: ~1.2 GB as I2_S)
    "2b-4t": Preset(hidden=2560, ffn=6912, layers=30, heads=20, kv_heads=5, context=4096,
                    rope_theta=500000.0, tokenizer="llama3"),
}
TOKENIZERS = ("tiny", "llama3")


@dataclass(frozen=True)
class SynthSpec:
    preset: str = "tiny"
    arch: str = "bitnet"
    format: str = "tq2_0"
    tokenizer: str | None = None  # None: the preset's default
    layers: int | None = None  # None: the preset's default
    seed: int = 0
    # token ids whose embedding rows are all zero: their first activation row is all zero, the case
    # where an activation quantizer divides by its floor (bitnet.cpp's 1e-5) or by nothing
    zero_tokens: tuple[int, ...] = ()

    def resolved(self) -> SynthSpec:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; synth makes: {', '.join(ARCHS)}")
        if self.format not in FORMAT_NAMES:
            raise ValueError(f"unknown format {self.format!r}; synth writes: {', '.join(FORMAT_NAMES)}")
        p = PRESETS[self.preset]
        tok = self.tokenizer or p.tokenizer
        if tok not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {tok!r}; known: {', '.join(TOKENIZERS)}")
        layers = p.layers if self.layers is None else self.layers
        if layers < 1:
            raise ValueError(f"--layers must be at least 1, got {layers}")
        return replace(self, tokenizer=tok, layers=layers, zero_tokens=tuple(sorted(set(self.zero_tokens))))

    def filename(self) -> str:
        s = self.resolved()
        zero = "-z" + "_".join(map(str, s.zero_tokens)) if s.zero_tokens else ""
        return f"synth-{s.preset}-{s.arch}-{s.format}-{s.tokenizer}-L{s.layers}-s{s.seed}{zero}.gguf"


def _vocab(name: str):
    from . import vocab

    return vocab.llama3_vocab() if name == "llama3" else vocab.tiny_vocab()


def _rng(seed: int, name: str, chunk: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), chunk])


def config_for(spec: SynthSpec, vocab_size: int) -> ModelConfig:
    s = spec.resolved()
    p = PRESETS[s.preset]
    return ModelConfig(arch=s.arch, hidden=p.hidden, ffn=p.ffn, layers=s.layers, heads=p.heads,
                       kv_heads=p.kv_heads, vocab=vocab_size, context=p.context, rms_eps=p.rms_eps,
                       rope_theta=p.rope_theta)


def ternary_weights(seed: int, name: str, shape: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Absmean-quantized Gaussian(0, 1/K) weights: int8 values and a float16-exact scale."""
    latent = _rng(seed, name).standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[1]))
    values, scale = absmean_quantize(latent)
    return values, float(np.float16(scale))


def _norm_gain(seed: int, name: str, n: int, centre: float = 1.0) -> np.ndarray:
    return (centre * _rng(seed, name).uniform(0.8, 1.2, n)).astype(np.float32)


def _tensors(spec: SynthSpec, cfg: ModelConfig) -> list[TensorSpec]:
    fmt = get_format(spec.format)
    emb_fmt = F32 if spec.format == "f32" else F16
    seed = spec.seed
    shapes = cfg.tensor_shapes()
    for name, shape in shapes.items():
        if len(shape) == 2 and name != "token_embd.weight":
            fmt.check_shape(shape)

    def embedding_chunks():
        for c, start in enumerate(range(0, cfg.vocab, EMBED_CHUNK_ROWS)):
            rows = min(EMBED_CHUNK_ROWS, cfg.vocab - start)
            e = _rng(seed, "token_embd.weight", c).standard_normal((rows, cfg.hidden), dtype=np.float32)
            for t in spec.zero_tokens:
                if start <= t < start + rows:
                    e[t - start] = 0
            yield emb_fmt.encode(e * np.float32(EMBED_STD))

    def projection(name, shape):
        def chunks():
            values, scale = ternary_weights(seed, name, shape)
            yield fmt.pack(values, scale)
        return chunks

    def vector(values):
        return lambda: [values]

    # logits = rms(x) * g . E^T has std ~ g * EMBED_STD * sqrt(hidden); pick g for the target
    out_gain = TARGET_LOGIT_STD / (EMBED_STD * np.sqrt(cfg.hidden))
    specs = [TensorSpec("token_embd.weight", shapes["token_embd.weight"], emb_fmt.type_id, embedding_chunks)]
    for name, shape in shapes.items():
        if name == "token_embd.weight":
            continue
        if len(shape) == 1:
            centre = out_gain if name == "output_norm.weight" else 1.0
            specs.append(TensorSpec(name, shape, F32.type_id, vector(_norm_gain(seed, name, shape[0], centre))))
        else:
            assert name.split(".")[2] in PROJECTIONS
            specs.append(TensorSpec(name, shape, fmt.type_id, projection(name, shape)))
    return specs


def synthesize(spec: SynthSpec, out: str | Path) -> Path:
    """Write the model `spec` describes to `out` (a directory: the spec's file name is used)."""
    spec = spec.resolved()
    out = Path(out)
    if spec.zero_tokens and max(spec.zero_tokens) >= len(_vocab(spec.tokenizer).tokens):
        raise ValueError(f"zero_tokens {spec.zero_tokens}: ids must be inside the vocabulary")
    path = out / spec.filename() if out.is_dir() or out.suffix != ".gguf" else out
    vocab = _vocab(spec.tokenizer)
    cfg = config_for(spec, len(vocab.tokens))
    try:
        tensors = _tensors(spec, cfg)
    except FormatError as e:
        raise FormatError(f"preset {spec.preset!r} cannot be stored as {spec.format}: {e}") from None
    metadata = [(k, v, None) for k, v in cfg.metadata().items()]
    metadata += [
        ("general.name", f"bitnet-crossval synthetic {spec.preset} {spec.arch} {spec.format}", None),
        ("general.file_type", FILE_TYPE[spec.format], None),
        ("general.quantization_version", 2, None),
        ("bitnet_crossval.synth.preset", spec.preset, None),
        ("bitnet_crossval.synth.seed", spec.seed, None),
    ]
    if spec.format == "i2_s":
        metadata.append((I2S_FLAVOUR_KEY, get_format("i2_s").block, None))
    metadata += vocab.gguf_metadata()
    return write_gguf(path, metadata, tensors)
