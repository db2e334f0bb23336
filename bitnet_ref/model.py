"""The BitNet b1.58 forward pass in numpy, with the numerics of a chosen profile (see numerics.py).

Per layer (mainline llama.cpp's `bitnet` graph, which bitnet.cpp shares):
    h = rms(x) * attn_norm;  q, k, v = Wq h, Wk h, Wv h;  NeoX RoPE on q, k
    a = causal GQA attention (scale 1/sqrt(head_dim));  o = rms(a) * attn_sub_norm;  x += Wo o
    h = rms(x) * ffn_norm;  f = act(Wg h) * (Wu h);  f = rms(f) * ffn_sub_norm;  x += Wd f
and logits = (rms(x) * output_norm) . token_embd^T. Every projection's output is multiplied by its
optional `blk.N.<name>.scale` tensor (shape {1}) when the file has one, as mainline does.

Ternary weights stay int8 values with their scales; the embedding is decoded per lookup (and per
chunk of rows for the lm_head), straight from the memory-mapped file. Where the native kernels
(bitnet_ref.kernels) compute a profile's integer products (I2_S x i8_s for bitnet-cpp, TQ1_0/TQ2_0 x Q8_K
for llama-cpp), the weights stay packed in the mapped file and are never unpacked: the kernels return the
same exact integer sums, and the float32 epilogues below are shared, so both paths give the same bits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import device as _device
from . import kernels
from .config import LAYER_TENSORS, PROJECTIONS, ModelConfig
from .errors import FormatError, model_error
from .exact_sum import lane_dot, ternary_dot
from .formats import format_for
from .formats.activations import QK_K, quantize_i8_s, quantize_q8_k_blocks
from .formats.i2s import I2S_X86, QK_I2_S
from .ggml_ref import (
    _add_f32,
    _fma,
    _i2s_epilogue,
    _reduce16,
    f16_gemm_ggml,
    ggml_expf,
    i2s_dot_i8_s_ggml,
    tq_dot_q8_k_ggml,
    vec_dot_f16_ggml,
)
from .gguf import open_gguf
from .numerics import Profile, get_profile

LM_HEAD_CHUNK_ROWS = 8192


@dataclass
class Linear:
    """One projection: ternary int8 values with scales, or plain float weights (F32/F16 files).

    A ternary projection the native kernels compute keeps only `packed` (the stored bytes, a view of the
    mapped file) and unpacks `values` on first use by a numpy path (`ternary_values`)."""

    name: str
    fmt: str
    values: np.ndarray | None = None  # int8 (rows, K)
    scale: np.ndarray | None = None  # float32 (rows, blocks); a per-tensor scale is (1, 1)
    weight: np.ndarray | None = None  # float32 (rows, K), float formats only
    out_scale: float | None = None  # the optional `.scale` tensor
    packed: np.ndarray | None = None  # uint8: the stored bytes, for the native kernels
    type_id: int | None = None  # ggml type id of `packed`
    shape: tuple[int, int] | None = None  # (rows, K)
    unpack: Callable[[], np.ndarray] | None = field(default=None, repr=False)

    @property
    def ternary(self) -> bool:
        return self.values is not None or self.packed is not None

    def ternary_values(self) -> np.ndarray:
        if self.values is None:
            self.values = np.ascontiguousarray(self.unpack(), dtype=np.int8)
        return self.values


@dataclass
class Layer:
    norms: dict[str, np.ndarray]
    proj: dict[str, Linear]


@dataclass
class State:
    """KV cache of one sequence: per layer, K and V of every position seen so far."""

    pos: int = 0
    k: list = field(default_factory=list)  # per layer: (capacity, kv_heads, head_dim)
    v: list = field(default_factory=list)
    # when a dict: forward() stores named intermediates in it, under llama.cpp's graph node names
    # (attn_norm-N, Qcur-N, Kcur-N, Vcur-N, kqv_out-N, ..., l_out-N, result_norm, result_output), for
    # localizing differences
    taps: dict | None = None


def _rms(x: np.ndarray, gain: np.ndarray, eps: float, ggml: bool = False) -> np.ndarray:
    if ggml:
        # ggml's rms_norm: float32 squares summed in double, in order (cumsum: numpy's sum is pairwise); mean
        # rounded to float; scale = 1/sqrtf(mean + eps) in float; y = x * scale * gain, float32 left to right
        f32 = np.float32
        sq = np.square(x, dtype=f32).astype(np.float64)
        ms = (np.cumsum(sq, axis=-1)[..., -1:] / x.shape[-1]).astype(f32)
        scale = f32(1) / np.sqrt(ms + f32(eps))
        return (x * scale) * gain.astype(f32)
    ms = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    y = x * (1.0 / np.sqrt(ms + eps)).astype(x.dtype)
    return np.multiply(y, gain.astype(x.dtype), out=y)  # in place: the same product, one array fewer


def _libm_f32(name: str):
    """The C library's float32 function `name` (cosf, sinf) through ctypes, or None where none loads."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        fn = getattr(lib, name)
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    return fn


_COSF, _SINF = _libm_f32("cosf"), _libm_f32("sinf")


def cos_sin_f32(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cosf/sinf of float32 angles as ggml's CPU rope takes them: from the C math library, which (glibc)
    is not correctly rounded (about 2% of results differ by one ulp from cos/sin rounded from float64);
    the float64 rounding where no libm loads."""
    th = np.asarray(theta, dtype=np.float32)
    native = kernels.cos_sin(th)  # the same libm functions, called from C
    if native is not None:
        return native
    if _COSF is None or _SINF is None:
        return np.cos(th.astype(np.float64)).astype(np.float32), np.sin(th.astype(np.float64)).astype(np.float32)
    flat = th.ravel().tolist()
    c = np.fromiter((_COSF(v) for v in flat), dtype=np.float32, count=len(flat)).reshape(th.shape)
    s = np.fromiter((_SINF(v) for v in flat), dtype=np.float32, count=len(flat)).reshape(th.shape)
    return c, s


def _native_packed(prof: Profile, fmt_name: str, shape) -> bool:
    """Whether this profile's products on this format run in the native kernels, straight from the packed
    bytes: I2_S (x86 layout) x i8_s and TQ1_0/TQ2_0 x Q8_K in the ggml_cpu profiles."""
    if not (prof.ggml_cpu and prof.quantizes(fmt_name) and len(shape) == 2):
        return False
    if prof.activations == "i8_s" and fmt_name != "i2_s":
        return False
    if prof.activations == "q8_k" and fmt_name not in ("tq1_0", "tq2_0"):
        return False
    return kernels.available()


def _native_as_i2s(prof: Profile, fmt_name: str, shape) -> bool:
    """bitnet-cpp computes TL1/TL2 and ARM-layout I2_S products as x86 I2_S ones: such tensors are repacked into
    I2_S x86 bytes at load (2 bits a weight, not int8) for the native kernels."""
    return (prof.ggml_cpu and prof.activations == "i8_s" and prof.quantizes(fmt_name)
            and fmt_name in ("tl1", "tl2", "i2_s_arm") and len(shape) == 2 and shape[1] % QK_I2_S == 0
            and kernels.available())


EXACT_PACKED = ("tq1_0", "tq2_0", "i2_s")  # formats bk_exact_matmul reads packed
EXACT_REPACKED = ("tl1", "tl2", "i2_s_arm")  # per-tensor-scale formats repacked to I2_S (x86) bytes at load


def _exact_native(prof: Profile, fmt_name: str, shape) -> bool:
    """Whether this profile's products on this ternary format run in the native exact kernel (float64 math,
    unquantized activations), the weights kept packed: TQ1_0, TQ2_0, I2_S x86 read as stored, TL1/TL2/ARM I2_S
    repacked to I2_S x86 (2 bits a weight) when the row length is a multiple of 128."""
    if prof.ggml_cpu or prof.math != "float64" or prof.quantizes(fmt_name) or len(shape) != 2:
        return False
    if fmt_name not in EXACT_PACKED and not (fmt_name in EXACT_REPACKED and shape[1] % QK_I2_S == 0):
        return False
    return kernels.available()


def _repack_i2s(lin: Linear, tern, shape) -> None:
    scale = np.asarray(tern.scale, dtype=np.float32)
    if scale.size != 1:
        raise FormatError(f"{lin.name}: {lin.fmt} with {scale.size} scales cannot be computed as I2_S")
    packed = I2S_X86.pack(tern.values, float(scale.reshape(-1)[0]))
    lin.packed, lin.type_id, lin.shape = packed, I2S_X86.type_id, shape
    lin.unpack = _unpacker(I2S_X86, packed, shape)
    lin.scale = scale.reshape(1, 1)


def _make_resident(gf, entries) -> None:
    """Copy the packed tensors the native kernels stream into one array of process memory (huge pages; see
    GGUFFile.resident_copy), 64-byte aligned each, and point their Linear at it."""
    sizes = [-(-t.nbytes // 64) * 64 for _, t, _ in entries]
    arena = np.empty(sum(sizes) + 64, np.uint8)
    off = (-arena.ctypes.data) % 64
    for (lin, t, fmt), size in zip(entries, sizes):
        data = gf.resident_copy(t, arena[off: off + t.nbytes])
        lin.packed = data
        lin.unpack = _unpacker(fmt, data, lin.shape)
        off += size


def _unpacker(fmt, data: np.ndarray, shape):
    return lambda: fmt.unpack(data, shape).values


def _packed_scale(fmt, data: np.ndarray, shape) -> np.ndarray:
    """The float32 scales of a packed ternary tensor without unpacking it: (1, 1) per tensor, (rows, blocks)."""
    if fmt.name == "i2_s":
        fmt.check_shape(shape)
        n = shape[0] * shape[1]
        fmt._check_size(data, shape)
        return data[n // 4: n // 4 + 4].copy().view(np.float32).reshape(1, 1)
    fmt._check_size(data, shape)
    return np.ascontiguousarray(fmt.block_scales(data, shape), dtype=np.float32)


class Model:
    def __init__(self, cfg: ModelConfig, profile: Profile, layers: list[Layer], output_norm: np.ndarray,
                 gf, embd_info, embd_fmt, path: str):
        self.cfg = cfg
        self.profile = profile
        self.layers = layers
        self.output_norm = output_norm
        self.path = path
        self._gf = gf
        self._embd = embd_info
        self._embd_fmt = embd_fmt
        self.dtype = np.dtype(profile.math)
        # the exact profile: float64 math in exact_sum's defined orders (products and attention)
        self._exact_math = not profile.ggml_cpu and self.dtype == np.float64
        self._row_bytes = self._embedding_row_bytes()
        # the F16/F32 lm_head the native kernels read once per token: held in process memory (see resident_copy)
        native_head = self._native_lm_head_applies() or self._exact_lm_head_native()
        self._embd_bytes = gf.resident_copy(embd_info) if native_head else None
        self._plans_checked, self._plans = False, None  # see _layer_plans
        self._rope_table = None  # ggml RoPE: (cos, sin) of positions 0 .. len - 1, see _rope_angles
        # BITNET_DEVICE: where the I2_S decode products run (bitnet_ref/device.py; CUDA untested on hardware)
        self.device, self._gpu = _device.for_model(layers)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path, profile: str | Profile = "exact") -> Model:
        prof = get_profile(profile)
        gf = open_gguf(path)
        try:
            meta = {k: mv.value for k, mv in gf.metadata.items()}
            cfg = ModelConfig.from_metadata(meta, path=str(path))
            shapes = cfg.tensor_shapes()

            def info(name):
                t = gf.tensor(name)
                if t.shape != shapes[name]:
                    raise model_error("tensor-shape-mismatch",
                                      f"tensor {name!r} has shape {t.shape}, the metadata implies {shapes[name]}",
                                      "the hyper-parameters and the tensors disagree: check the converter",
                                      path=str(path), tensor=name)
                return t

            def fmt_of(t):
                try:
                    return format_for(gf, t)
                except FormatError as e:
                    raise model_error("unsupported-type", f"tensor {t.name!r}: {e}",
                                      "this engine reads f32, f16, bf16, tq1_0, tq2_0, i2_s, tl1, tl2 and iq2_s",
                                      path=str(path), tensor=t.name) from None

            def floats(name):
                t = info(name)
                return fmt_of(t).decode(gf.tensor_bytes(t), t.shape).astype(np.float32)

            layers, resident = [], []
            for i in range(cfg.layers):
                norms, proj = {}, {}
                for n in LAYER_TENSORS:
                    name = f"blk.{i}.{n}.weight"
                    if n not in PROJECTIONS:
                        norms[n] = floats(name)
                        continue
                    t = info(name)
                    fmt = fmt_of(t)
                    lin = Linear(name, fmt.name)
                    data = gf.tensor_bytes(t)
                    try:
                        if fmt.ternary and _native_packed(prof, fmt.name, t.shape):
                            lin.scale = _packed_scale(fmt, data, tuple(t.shape))
                            lin.packed, lin.type_id, lin.shape = data, fmt.type_id, tuple(t.shape)
                            resident.append((lin, t, fmt))
                        elif fmt.ternary and _native_as_i2s(prof, fmt.name, t.shape):
                            _repack_i2s(lin, fmt.unpack(data, t.shape), tuple(t.shape))
                        elif fmt.ternary and _exact_native(prof, fmt.name, t.shape) and fmt.name in EXACT_PACKED:
                            lin.scale = _packed_scale(fmt, data, tuple(t.shape))
                            lin.packed, lin.type_id, lin.shape = data, fmt.type_id, tuple(t.shape)
                            resident.append((lin, t, fmt))
                        elif (fmt.ternary and _exact_native(prof, fmt.name, t.shape)
                              and np.asarray(fmt.unpack(data, t.shape).scale).size == 1):
                            _repack_i2s(lin, fmt.unpack(data, t.shape), tuple(t.shape))
                        elif fmt.ternary:
                            tern = fmt.unpack(data, t.shape)
                            lin.values = np.ascontiguousarray(tern.values, dtype=np.int8)
                            s = np.asarray(tern.scale, dtype=np.float32)
                            lin.scale = s.reshape(1, 1) if s.ndim == 0 else s
                        else:
                            lin.weight = fmt.decode(data, t.shape).astype(np.float32)
                    except FormatError as e:
                        raise model_error("bad-tensor", f"tensor {name!r} cannot be decoded: {e}",
                                          "the tensor bytes are damaged or in an unexpected layout",
                                          path=str(path), tensor=name) from None
                    sname = f"blk.{i}.{n}.scale"
                    if gf.has_tensor(sname):
                        st = gf.tensor(sname)
                        sv = fmt_of(st).decode(gf.tensor_bytes(st), st.shape).reshape(-1)
                        lin.out_scale = float(sv[0])
                    proj[n] = lin
                layers.append(Layer(norms, proj))
            _make_resident(gf, resident)
            output_norm = floats("output_norm.weight")
            embd = info("token_embd.weight")
            embd_fmt = fmt_of(embd)
            if embd_fmt.ternary:
                raise model_error("unsupported-embedding", f"token_embd is stored as {embd_fmt.name}",
                                  "store the embedding as f32/f16/bf16", path=str(path), tensor=embd.name)
            return cls(cfg, prof, layers, output_norm, gf, embd, embd_fmt, str(path))
        except BaseException:
            gf.close()
            raise

    def close(self) -> None:
        if getattr(self, "_gpu", None) is not None:
            self._gpu.close()
        if self._gf is not None:
            self._gf.close()
            self._gf = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- embedding -------------------------------------------------------------------------------
    def _embedding_row_bytes(self) -> int | None:
        try:
            row = self._embd_fmt.nbytes((1, self.cfg.hidden))
        except FormatError:
            return None
        return row if row * self.cfg.vocab == self._embd.nbytes else None

    def _embedding_rows(self, start: int, stop: int) -> np.ndarray:
        data = self._embd_bytes if self._embd_bytes is not None else self._gf.tensor_bytes(self._embd)
        if self._row_bytes is None:  # not row-sliceable: decode all (rare)
            return self._embd_fmt.decode(data, self._embd.shape)[start:stop]
        rb = self._row_bytes
        return self._embd_fmt.decode(data[start * rb: stop * rb], (stop - start, self.cfg.hidden))

    def embed(self, ids: np.ndarray) -> np.ndarray:
        if self._embd_fmt.name in ("f32", "f16") and self._row_bytes is not None:  # rows gathered at once
            data = self._embd_bytes if self._embd_bytes is not None else self._gf.tensor_bytes(self._embd)
            table = data.view(np.float16 if self._embd_fmt.name == "f16" else np.float32).reshape(-1, self.cfg.hidden)
            return table[np.asarray(ids, dtype=np.int64)].astype(self.dtype)
        return np.stack([self._embedding_rows(int(i), int(i) + 1)[0] for i in ids]).astype(self.dtype)

    # -- products --------------------------------------------------------------------------------
    def _quantized(self, x: np.ndarray, k: int) -> np.ndarray:
        """The activations as the profile's quantizer leaves them (dequantized, exactly, in math dtype)."""
        if self.profile.activations == "q8_k":
            q, d = quantize_q8_k_blocks(x.astype(np.float32))
            t = q.shape[0]
            return (q.reshape(t, -1, QK_K).astype(self.dtype) * d[:, :, None].astype(self.dtype)).reshape(t, k)
        q, s = quantize_i8_s(x.astype(np.float32))
        return q.astype(self.dtype) / s[:, None].astype(self.dtype)

    def _mm(self, x: np.ndarray, lin: Linear) -> np.ndarray:
        dt = self.dtype
        if self.profile.ggml_cpu:
            return self._mm_ggml(x, lin)
        if self._exact_math:  # the products' defined order (exact_sum), in C where the kernels are loaded
            return self._mm_exact(x, lin)
        if lin.ternary:
            values = lin.ternary_values()
            rows, k = values.shape
            a = self._quantized(x, k) if self.profile.quantizes(lin.fmt) else x
            nb = lin.scale.shape[1]
            g = k // nb
            out = np.zeros((x.shape[0], rows), dtype=dt)
            for b in range(nb):
                part = a[:, b * g:(b + 1) * g] @ values[:, b * g:(b + 1) * g].T.astype(dt)
                out += part * lin.scale[:, b].astype(dt)
        else:
            a = x
            if lin.fmt == "f16" and self.profile.f16_acts_for_f16_weights:
                a = x.astype(np.float16).astype(dt)
            out = a @ lin.weight.T.astype(dt)
        if lin.out_scale is not None:
            out = out * dt.type(lin.out_scale)
        return out

    def _mm_same_x(self, x: np.ndarray, lins: list[Linear]) -> list[np.ndarray]:
        """_mm of each Linear on the same x; the exact profile's packed ternary products of one type go to the
        native kernel in one call (its per-token tables computed once), with the same bits."""
        if (self._exact_math and len({lin.type_id for lin in lins}) == 1
                and all(self._exact_packed_native(lin) for lin in lins)):
            mats = [(lin.packed, lin.shape[0], lin.scale) for lin in lins]
            outs = kernels.exact_matmul_many(lins[0].type_id, x, mats)
            return [o if lin.out_scale is None else o * np.float64(lin.out_scale) for o, lin in zip(outs, lins)]
        return [self._mm(x, lin) for lin in lins]

    def _exact_packed_native(self, lin: Linear) -> bool:
        """whether this exact-profile ternary product runs in bk_exact_matmul on the packed bytes"""
        return (lin.ternary and lin.packed is not None and lin.values is None
                and not self.profile.quantizes(lin.fmt) and kernels.available())

    def _mm_exact(self, x: np.ndarray, lin: Linear) -> np.ndarray:
        """float64 products in exact_sum's order (ternary_dot, lane_dot for float weights): bk_exact_matmul on the
        packed (or float) weights when the kernels are loaded, else numpy on the unpacked values; the same bits."""
        dt = np.dtype(np.float64)
        if lin.ternary:
            if self._exact_packed_native(lin):
                out = kernels.exact_matmul(lin.type_id, x, lin.packed, lin.shape[0], lin.scale)
            else:
                values = lin.ternary_values()
                a = self._quantized(x, values.shape[1]) if self.profile.quantizes(lin.fmt) else x
                out = ternary_dot(a, values, lin.scale)
        else:
            a = x
            if lin.fmt == "f16" and self.profile.f16_acts_for_f16_weights:
                a = x.astype(np.float16).astype(dt)
            if kernels.available():
                out = kernels.exact_matmul(0, a, lin.weight, lin.weight.shape[0])
            else:
                out = lane_dot(a, lin.weight)
        if lin.out_scale is not None:
            out = out * dt.type(lin.out_scale)
        return out

    def _mm_ggml(self, x: np.ndarray, lin: Linear) -> np.ndarray:
        """ggml_mul_mat on x86 CPU, float32 out: TQ x Q8_K as the kernel computes it; float weights as
        the exact product of the (f16-rounded for F16 weights) activations, rounded once to float32."""
        f32 = np.float32
        if lin.packed is not None and lin.values is None and self.profile.quantizes(lin.fmt):
            out = self._mm_native(x, lin)
        elif lin.ternary:
            values = lin.ternary_values()
            if not self.profile.quantizes(lin.fmt) and self.profile.activations == "i8_s":
                # bitnet-cpp on a format that is not bitnet.cpp's own (TQ1_0/TQ2_0): float activations times
                # the dequantized weights, rounded once (the fork's Q8_K kernels are not emulated)
                group = values.shape[1] // lin.scale.shape[1]
                w = values.astype(f32) * np.repeat(lin.scale.astype(f32), group, axis=1)
                out = (x.astype(np.float64) @ w.T.astype(np.float64)).astype(f32)
            elif not self.profile.quantizes(lin.fmt):
                raise model_error("unsupported-format", f"{lin.name}: {lin.fmt} is not a ggml CPU format",
                                  "use a profile made for this format", path=self.path)
            elif self.profile.activations == "i8_s":
                # bitnet.cpp: I2_S x I8_S (TL1/TL2 are computed the same way: their LUT kernels, which
                # quantize the activations slightly differently, are not emulated)
                if lin.scale.shape[1] != 1:
                    raise model_error("unsupported-format", f"{lin.name}: {lin.fmt} has block scales",
                                      "bitnet.cpp's kernels take one scale per tensor", path=self.path)
                q, s = quantize_i8_s(x.astype(f32))
                out = i2s_dot_i8_s_ggml(q, s, values, lin.scale[:, 0], self.profile.i2s_int16_wrap)
            else:
                q, dy = quantize_q8_k_blocks(x.astype(f32))
                out = tq_dot_q8_k_ggml(q, dy, values, lin.scale.astype(f32))
        else:
            a = x.astype(np.float16) if lin.fmt == "f16" and self.profile.f16_acts_for_f16_weights else x
            out = (a.astype(np.float64) @ lin.weight.T.astype(np.float64)).astype(f32)
        if lin.out_scale is not None:
            out = out * f32(lin.out_scale)
        return out

    def _mm_native(self, x: np.ndarray, lin: Linear) -> np.ndarray:
        """The native kernels' exact integer sums on the packed bytes, then the numpy float32 epilogues
        (the same functions the numpy path ends with)."""
        f32 = np.float32
        rows = lin.shape[0]
        if self.profile.activations == "i8_s":
            q, s, act_sum = kernels.quantize_i8_s(x.astype(f32))
            raw = None
            if self._gpu is not None and not self.profile.i2s_int16_wrap:  # exact int32 sums, one row
                raw = self._gpu.raw(lin, q)  # None: not one row, or CUDA failed (logged): the CPU computes
            if raw is None:
                raw = kernels.i2s_raw(q, lin.packed, rows, wrap16=self.profile.i2s_int16_wrap)
            return _i2s_epilogue(raw, act_sum, s, lin.scale[:, 0])
        q, dy = kernels.quantize_q8_k_blocks(x.astype(f32))
        return kernels.tq_dot(lin.type_id, q, dy, lin.packed, rows)

    def _lm_head(self, h: np.ndarray) -> np.ndarray:
        dt = self.dtype
        p = self.profile
        if p.lm_head == "f16" or (self._embd_fmt.name == "f16" and p.f16_acts_for_f16_weights):
            h = h.astype(np.float16).astype(dt)
        native = self._lm_head_native(h)
        if native is not None:
            return native
        if self._exact_math:
            return self._lm_head_exact(h)
        out = np.empty((h.shape[0], self.cfg.vocab), dtype=np.float32)
        for start in range(0, self.cfg.vocab, LM_HEAD_CHUNK_ROWS):
            stop = min(start + LM_HEAD_CHUNK_ROWS, self.cfg.vocab)
            if p.ggml_cpu and p.activations == "i8_s" and self._embd_fmt.name == "f16" and h.shape[1] % 16 == 0:
                # bitnet.cpp's 2024 ggml, F16 token_embd: two or more output rows go to llamafile's tinyBLAS on
                # the float32 activations; one row (sgemm declines n < 2) to ggml_vec_dot_f16 on f16 ones
                rows = self._embedding_rows(start, stop)
                if h.shape[0] == 1:
                    out[:, start:stop] = vec_dot_f16_ggml(h.astype(np.float16)[:, None, :], rows[None, :, :])
                else:
                    out[:, start:stop] = f16_gemm_ggml(h.astype(np.float32), rows)
            elif p.ggml_cpu:
                out[:, start:stop] = h.astype(np.float64) @ self._embedding_rows(start, stop).T.astype(np.float64)
            else:
                out[:, start:stop] = h @ self._embedding_rows(start, stop).T.astype(dt)
        return out

    def _exact_lm_head_native(self) -> bool:
        """whether the exact profile's lm_head runs in bk_exact_matmul (F32/F16 rows read in place)"""
        return (self._exact_math and self._embd_fmt.name in ("f32", "f16") and self._row_bytes is not None
                and kernels.available())

    def _lm_head_exact(self, h: np.ndarray) -> np.ndarray:
        """float64 logits in exact_sum.lane_dot's order, rounded to float32: bk_exact_matmul reads F32/F16
        rows in place; lane_dot on decoded chunks of rows otherwise (no kernels, BF16)."""
        fmt = self._embd_fmt.name
        if self._exact_lm_head_native():
            data = self._embd_bytes if self._embd_bytes is not None else self._gf.tensor_bytes(self._embd)
            return kernels.exact_matmul(1 if fmt == "f16" else 0, h, data, self.cfg.vocab).astype(np.float32)
        out = np.empty((h.shape[0], self.cfg.vocab), dtype=np.float32)
        for start in range(0, self.cfg.vocab, LM_HEAD_CHUNK_ROWS):
            stop = min(start + LM_HEAD_CHUNK_ROWS, self.cfg.vocab)
            out[:, start:stop] = lane_dot(h, self._embedding_rows(start, stop).astype(np.float32))
        return out

    def _native_lm_head_applies(self) -> bool:
        p = self.profile
        if p.ggml_cpu and p.activations == "q8_k":  # llama-cpp: F16/F32 rows in double sums (kernels.f64_matmul)
            return bool(self._embd_fmt.name in ("f16", "f32") and self._row_bytes is not None and kernels.available())
        return bool(p.ggml_cpu and p.activations == "i8_s" and self._embd_fmt.name == "f16"
                    and self.cfg.hidden % 16 == 0 and self._row_bytes is not None and kernels.available())

    def _lm_head_native(self, h: np.ndarray) -> np.ndarray | None:
        """bitnet-cpp's F16 lm_head in the native kernels, straight from the stored rows: the same bits as the
        numpy branch of `_lm_head` (ggml_vec_dot_f16 on f16 activations for one row, tinyBLAS for more);
        None where that branch does not apply or the kernels are unavailable."""
        if not self._native_lm_head_applies():
            return None
        data = self._embd_bytes if self._embd_bytes is not None else self._gf.tensor_bytes(self._embd)
        if self.profile.activations == "q8_k":  # the numpy branch's float64 product, rounded once
            return kernels.f64_matmul(h.astype(np.float32), data, self.cfg.vocab, self._embd_fmt.name)
        if h.shape[0] == 1:
            return kernels.f16_matmul(h.astype(np.float16).astype(np.float32), data, self.cfg.vocab, "vec_dot")
        return kernels.f16_matmul(h.astype(np.float32), data, self.cfg.vocab, "gemm")

    # -- rope and attention ----------------------------------------------------------------------
    def _rope_angles(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.profile.rope == "ggml":
            # a position's angles depend on it alone: kept in a table grown by doubling, so that a decoded token
            # does not pay the per-pair loop of _rope_angles_of
            need = int(pos.max()) + 1 if pos.size else 0
            have = 0 if self._rope_table is None else len(self._rope_table[0])
            if need > have:
                grow = max(need, 2 * have, 64)
                c, s = self._rope_angles_of(np.arange(have, grow))
                self._rope_table = (c, s) if not have else tuple(
                    np.concatenate([old, new]) for old, new in zip(self._rope_table, (c, s)))
            return self._rope_table[0][pos], self._rope_table[1][pos]
        return self._rope_angles_of(pos)

    def _rope_angles_of(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        half = self.cfg.head_dim // 2
        if self.profile.rope == "ggml":
            # ggml: theta_scale = powf(base, -2/n_dims); theta starts at the position and is multiplied by
            # theta_scale once per pair, in float32; cos/sin of the float32 angle
            ts = np.float32(self.cfg.rope_theta) ** np.float32(np.float32(-2.0) / np.float32(self.cfg.head_dim))
            theta = np.empty((len(pos), half), dtype=np.float32)
            cur = pos.astype(np.float32)
            for i in range(half):
                theta[:, i] = cur
                cur = (cur * ts).astype(np.float32)
            # cosf/sinf of the float32 angle, from the C math library as ggml calls them
            c, s = cos_sin_f32(theta)
            return c.astype(self.dtype), s.astype(self.dtype)
        inv = self.cfg.rope_theta ** (-2.0 * np.arange(half, dtype=np.float64) / self.cfg.head_dim)
        theta = pos.astype(np.float64)[:, None] * inv[None, :]
        return np.cos(theta).astype(self.dtype), np.sin(theta).astype(self.dtype)

    def _norm(self, x: np.ndarray, gain: np.ndarray) -> np.ndarray:
        """The profile's RMS norm: the exact profile's in exact_sum's order (native where loaded), else _rms."""
        if self._exact_math:
            return kernels.exact_rms(x, gain, self.cfg.rms_eps)
        return _rms(x, gain, self.cfg.rms_eps, self.profile.ggml_cpu)

    def _rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """NeoX rotation: pairs (i, i + d/2). x is (T, heads, d); cos/sin are (T, d/2). The exact profile rotates
        its own (fresh) q and k in place in C where the kernels are loaded, with the same bits."""
        if self._exact_math and kernels.exact_rope(x, cos, sin):
            return x
        half = x.shape[-1] // 2
        x0, x1 = x[..., :half], x[..., half:]
        c, s = cos[:, None, :], sin[:, None, :]
        if self.profile.ggml_cpu:
            # ggml's rotate_pairs as GCC contracts it on an FMA target (-ffp-contract=fast, the GNU default):
            # fma(x0, cos, -(x1*sin)) and fma(x0, sin, x1*cos), the second products rounded to float32
            return np.concatenate([_fma(x0, c, -(x1 * s)), _fma(x0, s, x1 * c)], axis=-1)
        return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)

    def _grow_cache(self, state: State, i: int, end: int) -> None:
        """Layer i's K and V caches in `state` with room for `end` positions (the first state.pos kept)."""
        kvt = np.float16 if self.profile.kv_cache == "f16" else np.float32
        shape = (self.cfg.kv_heads, self.cfg.head_dim)
        if len(state.k) <= i:
            state.k.append(np.zeros((0,) + shape, dtype=kvt))
            state.v.append(np.zeros((0,) + shape, dtype=kvt))
        if state.k[i].shape[0] < end:
            cap = min(max(end, 2 * state.k[i].shape[0], 64), max(end, self.cfg.context))
            for store in (state.k, state.v):
                grown = np.zeros((cap,) + shape, dtype=kvt)
                grown[: state.pos] = store[i][: state.pos]
                store[i] = grown

    def _cache(self, state: State, i: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        end = state.pos + k.shape[0]
        self._grow_cache(state, i, end)
        state.k[i][state.pos:end] = k
        state.v[i][state.pos:end] = v
        if self.profile.ggml_cpu and self.profile.kv_cache == "f16" and kernels.available():
            return state.k[i][:end], state.v[i][:end]  # f16 views: the native attention reads the cache in place
        if self._exact_math:  # views: the exact attention reads the cache in place (its values exact in float64)
            return state.k[i][:end], state.v[i][:end]
        return state.k[i][:end].astype(self.dtype), state.v[i][:end].astype(self.dtype)

    def _attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """q (T, H, d); k, v (S, KV, d) for positions 0..S-1; query head h reads KV head h // (H/KV)."""
        cfg = self.cfg
        t, kvh, d = q.shape[0], cfg.kv_heads, cfg.head_dim
        g = cfg.heads // kvh
        qg = q.reshape(t, kvh, g, d)
        if self.profile.ggml_cpu:
            if self.profile.kv_cache == "f16":
                # K·Q against an F16 K cache: q (a non-contiguous permute, so no llamafile F16 x F32 path) is
                # converted to f16, F16's vec_dot type, and ggml_vec_dot_f16 has ggml_vec_dot_f32's 4x16-lane
                # structure on exact f16 products. V·softmax keeps the probabilities in float32 (tinyBLAS).
                qg = qg.astype(np.float16).astype(np.float32)
            return self._attention_ggml(qg, k, v, pos)
        if self._exact_math:
            return self._attention_exact(q, k, v, pos)
        scores = np.einsum("tkgd,skd->kgts", qg, k) * self.dtype.type(1.0 / np.sqrt(d))
        mask = np.arange(k.shape[0])[None, :] > pos[:, None]  # (T, S): future keys
        scores = np.where(mask, -np.inf, scores)
        scores = scores - scores.max(axis=-1, keepdims=True)
        w = np.exp(scores)
        w = w / w.sum(axis=-1, keepdims=True)
        out = np.einsum("kgts,skd->tkgd", w, v)
        return out.reshape(t, cfg.heads * d)

    def _attention_exact(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """The exact profile's attention: float64, its two products in exact_sum's order (kernels.exact_scores /
        exact_values: native where loaded, the caches read in place), the softmax in numpy."""
        t, s = q.shape[0], k.shape[0]
        scores = kernels.exact_scores(q, k, s) * (1.0 / np.sqrt(self.cfg.head_dim))  # (heads, T, S)
        scores = np.where(np.arange(s)[None, :] > pos[:, None], -np.inf, scores)  # future keys
        scores = scores - scores.max(axis=-1, keepdims=True)
        w = np.exp(scores)
        w = w / w.sum(axis=-1, keepdims=True)
        return kernels.exact_values(w, v, s).reshape(t, -1)

    def _attention_ggml(self, qg: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """ggml's non-flash attention on x86 AVX-512, float32. KQ: ggml_vec_dot_f32 (4 accumulators of 16
        lanes, products rounded, (a0+a2)+(a1+a3), then _mm512_reduce_add_ps). soft_max_ext: x*scale + mask,
        max, ggml's vector expf of x - max, 16-value float32 reductions added in order into a double, times
        (float)(1/sum). KQV: llamafile sgemm (16-lane FMA accumulation over the keys, then reduce_add).
        Keys are zero-padded to a multiple of 16 (ggml's padded cache: zeros change no sum). With an f16 KV
        cache and the native kernels, all of it runs in C (native/bk_attention.c), bit for bit this code."""
        f32, f64 = np.float32, np.float64
        t, kvh, g, d = qg.shape
        s_len = k.shape[0]
        if (self.profile.kv_cache == "f16" and kernels.available() and int(pos[0]) == s_len - t
                and int(pos[-1]) == s_len - 1):  # the usual causal rows: prefill and decode alike in C
            return kernels.attention_f16(qg.reshape(t, kvh * g, d), np.asarray(k, np.float16),
                                         np.asarray(v, np.float16), s_len, self.cfg.context)
        sp = -(-s_len // 16) * 16
        kp = np.zeros((sp, kvh, d), f32)
        vp = np.zeros((sp, kvh, d), f32)
        kp[:s_len], vp[:s_len] = k, v
        if self.profile.kv_cache == "f16":  # ggml_vec_dot_f16 on f16 q and K, any head size
            kq = vec_dot_f16_ggml(qg[:, :, :, None, :], kp.transpose(1, 0, 2)[None, :, None, :, :])
            kq = kq.transpose(1, 2, 0, 3)  # (kvh, g, t, sp)
        elif d % 64 == 0:
            prod = (qg.astype(f64)[:, :, :, None, :] * kp.transpose(1, 0, 2).astype(f64)[None, :, None, :, :])
            prod = prod.reshape(t, kvh, g, sp, d // 64, 4, 16)  # exact float64 products, FMA'd into float32
            accs = prod[..., 0, :, :].astype(f32)  # the first FMA into zeroed accumulators
            for c in range(1, d // 64):
                accs = _add_f32(prod[..., c, :, :], accs)
            acc = (accs[..., 0, :] + accs[..., 2, :]) + (accs[..., 1, :] + accs[..., 3, :])
            kq = _reduce16(acc).transpose(1, 2, 0, 3)  # (kvh, g, t, sp)
        else:
            kq = np.einsum("tkgd,skd->kgts", qg.astype(f64), kp.astype(f64)).astype(f32)
        scale = f32(1.0) / np.sqrt(f32(d))
        mask = np.arange(sp)[None, :] > pos[:, None]
        w = np.where(mask, f32(-np.inf), kq * scale)
        e = ggml_expf(w - w.max(axis=-1, keepdims=True))
        # ggml adds the chunk sums one after another (numpy's sum would add more than 8 of them pairwise)
        chunks = _reduce16(e.reshape(*e.shape[:-1], sp // 16, 16)).astype(f64)
        inv = 1.0 / np.cumsum(chunks, axis=-1)[..., -1:]
        p = e * inv.astype(f32)
        if t == 1 and self.profile.kv_cache == "f16":
            # one query row against an F16 V cache: llamafile's sgemm declines n < 2, so V·softmax is
            # ggml_vec_dot_f16 over the n_kv cells the graph sees (cells used, padded to 32) with the
            # probabilities rounded to f16
            n_kv = min(-(-s_len // 32) * 32, -(-self.cfg.context // 32) * 32)
            pf = np.zeros((kvh, g, 1, 1, n_kv), f32)
            vf = np.zeros((kvh, 1, 1, d, n_kv), f32)
            pf[..., 0, 0, :s_len] = p[..., 0, :s_len].astype(np.float16)
            vf[:, 0, 0, :, :s_len] = v.transpose(1, 2, 0)
            return vec_dot_f16_ggml(pf, vf).reshape(t, self.cfg.heads * d)
        pc = p.reshape(kvh, g, t, 1, sp // 16, 16)
        vc = vp.transpose(1, 2, 0).reshape(kvh, 1, 1, d, sp // 16, 16)
        acc = np.zeros((kvh, g, t, d, 16), f32)
        for c in range(sp // 16):
            acc = _fma(pc[..., c, :], vc[..., c, :], acc)
        out = _reduce16(acc).transpose(2, 0, 1, 3)  # (t, kvh, g, d)
        return out.reshape(t, self.cfg.heads * d)

    def _ffn_act(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        if self.cfg.activation == "silu":
            if self.profile.ggml_cpu:  # ggml_vec_swiglu_f32: x / (1 + expf(-x)) * g, float32 steps
                return (gate / (np.float32(1) + ggml_expf(-gate))) * up
            # gate / (1 + exp(-gate)) * up, step by step in one array (no temporaries of the FFN's size)
            y = np.negative(gate)
            np.exp(y, out=y)
            np.add(y, 1.0, out=y)
            np.divide(gate, y, out=y)
            return np.multiply(y, up, out=y)
        if self.profile.ggml_cpu:  # ggml_vec_relu_f32 (x > 0 ? x : 0), ggml_sqr, ggml_mul in float32
            return np.square(np.where(gate > 0, gate, np.float32(0))) * up
        if self._exact_math:  # in C where the kernels are loaded: the same bits
            y = kernels.exact_relu2_mul(gate, up)
            if y is not None:
                return y
        y = np.maximum(gate, 0)  # relu(gate)^2 * up in one array
        np.square(y, out=y)
        return np.multiply(y, up, out=y)

    # -- the forward pass ------------------------------------------------------------------------
    def new_state(self) -> State:
        return State()

    def _check_ids(self, ids, state: State) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size == 0:
            raise model_error("empty-input" if arr.size == 0 else "bad-input",
                              f"token ids must be a non-empty 1-D sequence, got shape {arr.shape}",
                              "pass at least one token id (tokenize the prompt first)", path=self.path)
        if not np.issubdtype(arr.dtype, np.integer):
            raise model_error("bad-input", f"token ids must be integers, got dtype {arr.dtype}",
                              "pass integer token ids", path=self.path)
        bad = (arr < 0) | (arr >= self.cfg.vocab)
        if bad.any():
            j = int(np.argmax(bad))
            raise model_error("token-out-of-range",
                              f"token id {int(arr[j])} at index {j} is outside the vocabulary "
                              f"(0..{self.cfg.vocab - 1})",
                              "use the model's own tokenizer", path=self.path)
        if state.pos + arr.size > self.cfg.context:
            raise model_error("context-overflow",
                              f"{state.pos} cached + {arr.size} new tokens exceed the context length "
                              f"{self.cfg.context}", "shorten the input or start a new state", path=self.path)
        return arr.astype(np.int64)

    def forward(self, ids, state: State, last_only: bool = False) -> np.ndarray:
        """Run `ids` after the positions already in `state` (which is updated); float32 logits (T, vocab), or
        (1, vocab) for the last position with last_only. last_only computes what llama.cpp computes when only
        the last logits are asked for (llama-cli, llama-bench): its last layer drops the other rows after the
        attention, and the lm_head sees one row (for bitnet.cpp's F16 lm_head, its one-row path)."""
        ids = self._check_ids(ids, state)
        cfg = self.cfg
        t = ids.size
        pos = np.arange(state.pos, state.pos + t)
        cos, sin = self._rope_angles(pos)
        x = self.embed(ids)
        plans = self._layer_plans() if state.taps is None else None
        if plans:
            return self._forward_native(plans, x, state, cos, sin, last_only)
        n_layers = len(self.layers)
        for i, layer in enumerate(self.layers):
            n, p = layer.norms, layer.proj
            h = self._norm(x, n["attn_norm"])
            q, k, v = self._mm_same_x(h, [p["attn_q"], p["attn_k"], p["attn_v"]])
            q = q.reshape(t, cfg.heads, cfg.head_dim)
            k = k.reshape(t, cfg.kv_heads, cfg.head_dim)
            v = v.reshape(t, cfg.kv_heads, cfg.head_dim)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            keys, values = self._cache(state, i, k, v)
            a = self._attention(q, keys, values, pos)
            a_norm = self._norm(a, n["attn_sub_norm"])
            attn_out = self._mm(a_norm, p["attn_output"])
            x_attn = x + attn_out
            x = x_attn[-1:] if last_only and i == n_layers - 1 else x_attn
            h2 = self._norm(x, n["ffn_norm"])
            gate, up = self._mm_same_x(h2, [p["ffn_gate"], p["ffn_up"]])
            act = self._ffn_act(gate, up)
            f_norm = self._norm(act, n["ffn_sub_norm"])
            down = self._mm(f_norm, p["ffn_down"])
            x = x + down
            if state.taps is not None:  # llama.cpp's node names (mainline's bitnet graph), in graph order
                for name, val in (("attn_norm", h), ("Qcur", q), ("Kcur", k), ("Vcur", v),
                                  ("kqv_out", a.reshape(t, -1)), ("attn_sub_norm", a_norm), ("attn_out", attn_out),
                                  ("ffn_inp", x_attn), ("ffn_norm", h2), ("ffn_gate", gate), ("ffn_up", up),
                                  ("ffn_sub_out", act), ("ffn_sub_norm", f_norm), ("ffn_down", down), ("l_out", x)):
                    state.taps[f"{name}-{i}"] = np.array(val, dtype=np.float32)
        state.pos += t
        out = self._norm(x, self.output_norm)
        logits = self._lm_head(out)
        if state.taps is not None:
            state.taps["result_norm"] = np.array(out, dtype=np.float32)
            state.taps["result_output"] = np.array(logits, dtype=np.float32)
        return logits

    def _layer_plans(self) -> list | None:
        """The layers prepared for the native one-call-per-layer forward (kernels.bitnet_layer), or None where
        it does not apply: it computes the bitnet-cpp profile on models whose projections are all packed I2_S
        (x86) tensors with one scale each, on the CPU."""
        if not self._plans_checked:
            self._plans_checked = True
            p, cfg = self.profile, self.cfg
            if p.ggml_cpu and p.activations == "q8_k":
                self._plans = self._llama_plans()
                return self._plans
            ok = (p.ggml_cpu and p.activations == "i8_s" and p.kv_cache == "f16" and not p.i2s_int16_wrap
                  and cfg.activation in ("relu2", "silu") and self._gpu is None and kernels.available()
                  and cfg.hidden % QK_I2_S == 0 and cfg.ffn % QK_I2_S == 0
                  and all(lin.packed is not None and lin.values is None and lin.type_id == I2S_X86.type_id
                          and lin.scale.size == 1 for layer in self.layers for lin in layer.proj.values()))
            if ok:
                dims = {"hidden": cfg.hidden, "heads": cfg.heads, "kv_heads": cfg.kv_heads,
                        "head_dim": cfg.head_dim, "ffn": cfg.ffn, "n_ctx": cfg.context, "eps": cfg.rms_eps,
                        "silu": int(cfg.activation == "silu")}
                self._plans = [kernels.layer_plan(
                    dims, layer.norms, {n: lin.packed for n, lin in layer.proj.items()},
                    {n: lin.scale.reshape(-1)[0] for n, lin in layer.proj.items()},
                    {n: 1.0 if lin.out_scale is None else lin.out_scale for n, lin in layer.proj.items()})
                    for layer in self.layers]
        return self._plans

    def _llama_plans(self) -> list | None:
        """The layers prepared for kernels.llama_cpp_layer (the llama-cpp profile), or None where it does not
        apply: an F32 KV cache, head_dim a multiple of 64 (the definition's float32 KQ path), ReLU^2 or SiLU
        gating, and every projection a packed TQ1_0/TQ2_0 tensor the profile quantizes for, or F16/F32 weights."""
        p, cfg = self.profile, self.cfg
        if not (p.kv_cache == "f32" and cfg.activation in ("relu2", "silu") and cfg.head_dim % 64 == 0
                and kernels.available()):
            return None
        weights = []
        for layer in self.layers:
            w = {}
            for n, lin in layer.proj.items():
                if (lin.packed is not None and lin.values is None and lin.fmt in ("tq1_0", "tq2_0")
                        and p.quantizes(lin.fmt) and cfg.hidden % QK_K == 0 and cfg.ffn % QK_K == 0):
                    w[n] = (lin.fmt, lin.packed)
                elif lin.weight is not None and lin.fmt in ("f16", "f32"):
                    w[n] = ("f16" if lin.fmt == "f16" and p.f16_acts_for_f16_weights else "f32", lin.weight)
                else:
                    return None
            weights.append(w)
        dims = {"hidden": cfg.hidden, "heads": cfg.heads, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
                "ffn": cfg.ffn, "n_ctx": cfg.context, "eps": cfg.rms_eps, "silu": int(cfg.activation == "silu")}
        return [kernels.llama_layer_plan(
            dims, layer.norms, w, {n: 1.0 if lin.out_scale is None else lin.out_scale for n, lin in layer.proj.items()})
            for layer, w in zip(self.layers, weights)]

    def _forward_native(self, plans, x, state: State, cos, sin, last_only: bool) -> np.ndarray:
        """`forward` with each layer one native call (the same bits as the numpy layers)."""
        t = x.shape[0]
        end = state.pos + t
        x = np.ascontiguousarray(x, dtype=np.float32)
        cos, sin = np.ascontiguousarray(cos, np.float32), np.ascontiguousarray(sin, np.float32)
        for i, plan in enumerate(plans):
            self._grow_cache(state, i, end)
            run = kernels.llama_cpp_layer if plan.kv_dtype == np.float32 else kernels.bitnet_layer
            run(plan, x, end, state.k[i], state.v[i], cos, sin, last_only and i == len(plans) - 1)
        state.pos = end
        if last_only:
            x = x[:1]
        out = _rms(x, self.output_norm, self.cfg.rms_eps, True)
        return self._lm_head(out)

    def logits(self, ids) -> np.ndarray:
        """Teacher-forced logits for every position of `ids`: float32 (T, vocab)."""
        return self.forward(ids, self.new_state())


__all__ = ["Layer", "Linear", "Model", "State"]
