"""Planted bugs and legitimate numerical variants of bitnet_ref, for the harness's mutation self-test.

Each variant takes a loaded `PythonEngine` and changes a few lines of what it computes. Bugs are mistakes
an independent engine could plausibly make; legitimate variants compute the same model with other,
correct numerics. `tests/mutant_engine.py` serves a variant over the JSON-lines protocol, and
tests/test_mutation.py checks that the ladder fails every bug and passes every legitimate variant in
`independent` mode.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

import bitnet_ref.model as bm
from bitnet_ref.formats.i2s import I2S_ARM, I2S_X86
from bitnet_ref.numerics import PROFILES


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "bug" | "legit"
    what: str
    apply: Callable  # (engine) -> None
    profile: str = "exact"  # the bitnet_ref profile the variant starts from ("emulation": the reference's)
    formats: tuple[str, ...] = ("i2_s", "tq2_0")
    env: tuple[tuple[str, str], ...] = ()  # environment of the engine process


# -- bugs ------------------------------------------------------------------------------------------------
def swap_activation(eng) -> None:
    m = eng.model
    silu = m.cfg.activation == "silu"
    m._ffn_act = (lambda g, u: np.square(np.maximum(g, 0)) * u) if silu else (lambda g, u: g / (1.0 + np.exp(-g)) * u)


def skip_sub_norm(eng) -> None:
    """layer 0's ffn_sub_norm is not applied (the activations go to ffn_down un-normalized)."""
    m = eng.model
    gain = m.layers[0].norms["ffn_sub_norm"]
    norm = m._norm
    m._norm = lambda x, g: x if g is gain else norm(x, g)


def rope_normal_pairing(eng) -> None:
    """pairs (2i, 2i+1) instead of the NeoX pairs (i, i + d/2)."""
    def rope(x, cos, sin):
        x0, x1 = x[..., 0::2], x[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x0 * c - x1 * s, x0 * s + x1 * c
        return out
    eng.model._rope = rope


def rope_base_off(eng) -> None:
    m = eng.model
    m.cfg = dataclasses.replace(m.cfg, rope_theta=m.cfg.rope_theta * 1.1)


def kv_position_off_by_one(eng) -> None:
    """after the prompt, the KV position is one too small: the first generated token is evaluated at
    position n_past - 1, its K/V overwrite the last prompt token's slot (which is lost), and every later
    token follows one position early."""
    m = eng.model
    forward = m.forward

    def shifted(ids, state, last_only=False):
        if state.pos > 0 and not getattr(state, "shifted", False):
            state.pos -= 1
            state.shifted = True
        return forward(ids, state, last_only)
    m.forward = shifted


def i2s_other_flavour(eng) -> None:
    """x86 I2_S bytes (128-value blocks) decoded as the ARM flavour (64-value blocks)."""
    m = eng.model
    for layer in m.layers:
        for lin in layer.proj.values():
            if lin.fmt == "i2_s":
                data = m._gf.tensor_bytes(m._gf.tensor(lin.name))
                lin.values = np.ascontiguousarray(I2S_ARM.unpack(data, lin.ternary_values().shape).values)


def tq2_scale_offset(eng) -> None:
    """each TQ2_0 block's fp16 scale read from bytes 0..1 of the block instead of 64..65."""
    m = eng.model
    for layer in m.layers:
        for lin in layer.proj.values():
            if lin.fmt == "tq2_0":
                data = m._gf.tensor_bytes(m._gf.tensor(lin.name))
                rows, k = lin.ternary_values().shape
                lin.scale = data.reshape(-1, 66)[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(rows, -1)


def clamp_126(eng) -> None:
    """int8 activations clamped to [-126, 126] instead of [-127, 127] (the emulation profiles' quantizers)."""
    i8, q8 = bm.quantize_i8_s, bm.quantize_q8_k_blocks

    def i8_s(x):
        q, s = i8(x)
        return np.clip(q, -126, 126).astype(np.int8), s

    def q8_k(x):
        q, d = q8(x)
        return np.clip(q, -126, 126).astype(np.int8), d
    bm.quantize_i8_s, bm.quantize_q8_k_blocks = i8_s, q8_k


def attention_scale_1_over_d(eng) -> None:
    m = eng.model
    attention, d = m._attention, m.cfg.head_dim
    m._attention = lambda q, k, v, pos: attention(q / np.sqrt(d), k, v, pos)  # 1/sqrt(d) twice: 1/d


def no_bos(eng) -> None:
    tokenize = eng.tokenize
    eng.tokenize = lambda text, add_bos=True: tokenize(text, False)


def lm_head_next_row(eng) -> None:
    """the logit of token i computed from embedding row i + 1 (the last from row 0)."""
    m = eng.model
    head = m._lm_head
    m._lm_head = lambda h: np.roll(head(h), -1, axis=1)


# -- legitimate variants -----------------------------------------------------------------------------------
def _bf16(a: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    r = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return r.astype(np.uint32).view(np.float32)


def bf16_embedding(eng) -> None:
    """token_embd rounded to bf16 (round to nearest even), for the lookup and the tied lm_head."""
    m = eng.model
    embed, rows = m.embed, m._embedding_rows
    m.embed = lambda ids: _bf16(embed(ids)).astype(m.dtype)
    m._embedding_rows = lambda start, stop: _bf16(rows(start, stop))


def f16_kv_cache(eng) -> None:
    m = eng.model
    m.profile = dataclasses.replace(m.profile, kv_cache="f16")


def _float32_products(eng, how: str) -> None:
    """float32 math, float activations, each product summed over K in the given order."""
    m = eng.model
    m.profile = dataclasses.replace(PROFILES["exact"], math="float32")
    m.dtype = np.dtype(np.float32)
    weights: dict[str, np.ndarray] = {}

    def dense(lin) -> np.ndarray:
        if lin.name not in weights:
            if lin.ternary:
                v = lin.ternary_values()
                weights[lin.name] = (v.astype(np.float32) * np.repeat(lin.scale.astype(np.float32),
                                                                      v.shape[1] // lin.scale.shape[1], axis=1))
            else:
                weights[lin.name] = lin.weight.astype(np.float32)
        return weights[lin.name]

    def mm(x, lin):
        x, w = np.asarray(x, np.float32), dense(lin)
        if how == "float64 accumulation":
            out = (x.astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32)
        else:
            out = np.empty((x.shape[0], w.shape[0]), np.float32)
            for t in range(0, x.shape[0], 8):
                prod = x[t:t + 8, None, :] * w[None]  # float32 products (tokens, rows, K)
                if how == "reversed":  # one sequential sum from the last index down
                    out[t:t + 8] = np.cumsum(prod[..., ::-1], axis=-1)[..., -1]
                else:  # numpy's pairwise summation over a contiguous axis
                    out[t:t + 8] = np.add.reduce(prod, axis=-1)
        return out * np.float32(lin.out_scale) if lin.out_scale is not None else out
    m._mm = mm


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("silu-relu2-swapped", "bug", "SiLU and ReLU² swapped", swap_activation),
    Variant("sub-norm-skipped", "bug", "layer 0's ffn_sub_norm skipped", skip_sub_norm),
    Variant("rope-normal-pairing", "bug", "RoPE pairs (2i, 2i+1) instead of NeoX (i, i+d/2)", rope_normal_pairing),
    Variant("rope-base-off-10pct", "bug", "RoPE base 10% too large", rope_base_off),
    Variant("kv-position-off-by-one", "bug", "KV position one short after the prompt", kv_position_off_by_one),
    Variant("i2s-other-flavour", "bug", "I2_S read with 64-value (ARM) blocks", i2s_other_flavour,
            formats=("i2_s",)),
    Variant("tq2-scale-offset", "bug", "TQ2_0 block scale read from offset 0", tq2_scale_offset, formats=("tq2_0",)),
    Variant("int8-clamp-126", "bug", "int8 activations clamped at ±126", clamp_126, profile="emulation",
            env=(("BITNET_KERNELS", "0"),)),
    Variant("attention-scale-1-over-d", "bug", "attention scale 1/d instead of 1/√d", attention_scale_1_over_d),
    Variant("bos-not-added", "bug", "BOS not added", no_bos),
    Variant("lm-head-row-plus-one", "bug", "lm_head reads embedding row i+1", lm_head_next_row),
    Variant("float-activations", "legit", "float activations (the exact profile)", lambda eng: None),
    Variant("bf16-embedding", "legit", "token_embd rounded to bf16", bf16_embedding),
    Variant("f16-kv-cache", "legit", "f16 KV cache", f16_kv_cache),
    Variant("reversed-summation", "legit", "float32, products summed in reverse order",
            lambda eng: _float32_products(eng, "reversed")),
    Variant("pairwise-summation", "legit", "float32, products summed pairwise",
            lambda eng: _float32_products(eng, "pairwise")),
    Variant("float64-accumulation", "legit", "float32 math, products accumulated in float64",
            lambda eng: _float32_products(eng, "float64 accumulation")),
)}

EMULATION = {"i2_s": "bitnet-cpp", "tq2_0": "llama-cpp"}  # the reference's profile per format


def profile_for(variant: Variant, fmt: str) -> str:
    return EMULATION[fmt] if variant.profile == "emulation" else variant.profile


def open_variant(name: str, model, fmt: str):
    """A bitnet_ref engine on `model` with variant `name` applied."""
    from harness.engines.python_engine import PythonEngine

    v = VARIANTS[name]
    eng = PythonEngine(model, profile_for(v, fmt))
    v.apply(eng)
    eng.receipt.engine = f"mutant:{name}"
    return eng


__all__ = ["EMULATION", "VARIANTS", "Variant", "open_variant", "profile_for", "I2S_X86"]
