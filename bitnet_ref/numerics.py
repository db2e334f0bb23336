"""Numerics profiles: the same model computed the way each reference computes it.

A profile names what moves logits between engines: whether activations are quantized before ternary
matrix products (and for which weight formats), the KV-cache precision, the lm_head precision, the
float width of the rest of the math, and how RoPE angles are formed. Adding a profile is one entry in
PROFILES.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import model_error

ACTIVATIONS = ("none", "i8_s", "q8_k")
PRECISIONS = ("f32", "f16")


@dataclass(frozen=True)
class Profile:
    name: str
    activations: str = "none"  # "none" | "i8_s" | "q8_k"
    kv_cache: str = "f32"  # "f32" | "f16": K and V are rounded to this precision when cached
    lm_head: str = "f32"  # "f32" | "f16": f16 rounds the final normed activations before the lm_head
    # weight formats whose products use the quantized activations (others multiply float activations)
    quantized_formats: tuple[str, ...] = ()
    # ggml's CPU matmul converts activations to f16 for F16-stored weights (its vec_dot type for F16)
    f16_acts_for_f16_weights: bool = False
    math: str = "float64"  # "float64" | "float32": the dtype of everything between the products
    # "exact": angles p*base^(-2i/d) in float64; "ggml": float32 running product, libm cosf/sinf
    rope: str = "exact"
    # emulate ggml's x86 CPU kernels in float32, in their order, up to every activation quantization point
    # (rms_norm, the TQ1_0/TQ2_0 x Q8_K dot products' lanes and FMA, the FMA-contracted RoPE rotation,
    # residual adds, soft_max, SwiGLU);
    # needs math="float32". Float sums (attention, F32/F16 products) are taken in float64 and rounded once.
    ggml_cpu: bool = False
    # bitnet.cpp's I2_S kernel adds its maddubs products in int16 lanes over 4096 values before widening:
    # True wraps those lane sums modulo 2^16 as the hardware does (only extreme activations reach it);
    # False takes the integer dot product exactly. Only read by ggml_cpu profiles with i8_s activations.
    i2s_int16_wrap: bool = False

    def __post_init__(self):
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"profile {self.name}: activations {self.activations!r} not in {ACTIVATIONS}")
        for field in ("kv_cache", "lm_head"):
            if getattr(self, field) not in PRECISIONS:
                raise ValueError(f"profile {self.name}: {field} must be one of {PRECISIONS}")
        if self.math not in ("float64", "float32") or self.rope not in ("exact", "ggml"):
            raise ValueError(f"profile {self.name}: bad math {self.math!r} or rope {self.rope!r}")
        if self.ggml_cpu and self.math != "float32":
            raise ValueError(f"profile {self.name}: ggml_cpu emulation needs math='float32'")

    def quantizes(self, fmt_name: str) -> bool:
        return self.activations != "none" and fmt_name in self.quantized_formats


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        # the mathematical definition: float64 everywhere, no activation quantization
        Profile("exact"),
        # mainline llama.cpp on CPU with flash attention off and an F32 KV cache (the comparison setting):
        # Q8_K activations for TQ1_0/TQ2_0 products, f16 activations for F16 weights (incl. a F16
        # token_embd used as lm_head), ggml's float32 RoPE angle recurrence, and ggml's float32 kernels
        # emulated up to each Q8_K quantization point (a float64 pass flips Q8_K roundings)
        Profile("llama-cpp", activations="q8_k", kv_cache="f32", lm_head="f32",
                quantized_formats=("tq1_0", "tq2_0"), f16_acts_for_f16_weights=True, math="float32",
                rope="ggml", ggml_cpu=True),
        # bitnet.cpp (its 2024 ggml fork, x86, flash attention off): quantize_row_i8_s per-token activations
        # and the I2_S kernel's ((float)raw - act_sum) / act_scale * w_scale; an f16 KV cache (q rounded to
        # f16 for K·Q); the F16 token_embd lm_head through llamafile's tinyBLAS on float32 activations (that
        # sgemm takes F32 B for F16 A: nothing is rounded to f16); ggml's float32 kernels as in llama-cpp.
        # TL1/TL2 products are computed as I2_S ones (their LUT kernels are not emulated).
        Profile("bitnet-cpp", activations="i8_s", kv_cache="f16", lm_head="f32",
                quantized_formats=("i2_s", "i2_s_arm", "tl1", "tl2"), f16_acts_for_f16_weights=False,
                math="float32", rope="ggml", ggml_cpu=True),
    )
}


def get_profile(profile: str | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise model_error("unknown-profile", f"numerics profile {profile!r} is unknown",
                          f"use one of: {', '.join(PROFILES)}")
    return PROFILES[profile]


__all__ = ["PROFILES", "Profile", "get_profile"]
