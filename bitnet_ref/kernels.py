"""Native (C, cffi API mode) kernels for the forward pass, each the numpy definition's bits, with a numpy fallback.

The extension `bitnet_ref._bitnet_kernels` is built from native/ by `pip install` (setup.py's
`cffi_modules`; a compile failure only warns) or by hand with `python native/build_kernels.py`. What it
computes is integer-exact or bit-defined, so every result here equals the numpy code's bit for bit:

- `quantize_i8_s`: bitnet.cpp's per-token quantizer -> (q int8, s float32, act_sum int32)
- `quantize_q8_k_blocks`: ggml's Q8_K block quantizer -> (q int8, d float32)
- `i2s_raw`: Σ code·q over I2_S x86 packed bytes (code 0..2, bitnet.cpp's raw kernel sum), int32 (T, R)
- `tq_lanes`: ggml's 8 int32 lanes per 256-value block for TQ1_0/TQ2_0 packed blocks, int32 (T, R, K/256, 8)
- `tq_dot`: the whole TQ1_0/TQ2_0 x Q8_K dot (those lanes and ggml's float epilogue), float32 (T, R)
- `f16_matmul`: F16 rows (read in place) x float32 activations in ggml's float32 lane order (the F16 lm_head)
- `attention_f16`: bitnet-cpp's attention over an f16 KV cache (ggml's non-flash float32 order; no fallback)
- `layer_plan` / `bitnet_layer`: a whole decoder layer as the bitnet-cpp profile computes it, one call
- `exact_matmul` / `exact_matmul_many`: the exact profile's float64 products in `exact_sum`'s order, weights read
  packed; `exact_scores` / `exact_values`: its attention products; `exact_rms`, `exact_rope`, `exact_relu2_mul`:
  its RMS norm, RoPE and ReLU² gating
- `llama_layer_plan` / `llama_cpp_layer`: the same for the llama-cpp profile (TQ1_0/TQ2_0 x Q8_K as a GEMM, F16/F32
  weights, the F32-KV attention `attention_f32`); `f64_matmul`: its F16/F32 products (and lm_head)
- `cos_sin`: the C library's cosf/sinf (ggml's RoPE angles)

Environment: BITNET_KERNELS=0 forces numpy; BITNET_KERNELS_PATH loads the extension from that file (e.g. a
sanitizer build); BITNET_KERNELS_ISA forces a variant ("avx512-vnni", "avx2", "neon" on AArch64, "portable");
BITNET_CPU_THREADS sets the threads of the kernels' pool (default 2).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import logging
import os

import numpy as np

from .formats.activations import QK_K
from .formats.activations import quantize_i8_s as _np_quantize_i8_s
from .formats.activations import quantize_q8_k_blocks as _np_quantize_q8_k_blocks
from .formats.i2s import QK_I2_S
from .formats.tq import TQ1_0, TQ2_0
from .ggml_ref import _i2s_raw_int16, _tq_lanes_numpy, f16_gemm_ggml, tq_dot_q8_k_ggml, vec_dot_f16_ggml

log = logging.getLogger(__name__)

TQ_FORMATS = {f.type_id: f for f in (TQ1_0, TQ2_0)}  # type id -> format (block bytes, unpacking)

_state: dict = {}


def _load():
    """The extension module, or None (and the reason, logged once)."""
    if "mod" in _state:
        return _state["mod"]
    mod, reason = None, None
    path = os.environ.get("BITNET_KERNELS_PATH")
    try:
        if os.environ.get("BITNET_KERNELS", "1") == "0":
            reason = "disabled by BITNET_KERNELS=0"
        elif path:
            name = "bitnet_ref._bitnet_kernels"
            loader = importlib.machinery.ExtensionFileLoader(name, path)
            spec = importlib.util.spec_from_file_location(name, path, loader=loader)
            mod = importlib.util.module_from_spec(spec)
            loader.exec_module(mod)
        else:
            from . import _bitnet_kernels as mod  # type: ignore[no-redef]
    except Exception as e:  # ImportError, OSError (a bad path): fall back
        mod, reason = None, f"{type(e).__name__}: {e}"
    if mod is not None:
        isa = os.environ.get("BITNET_KERNELS_ISA")
        if isa and mod.lib.bk_set_isa(isa.encode()) != 0:
            log.warning("native kernels: ISA %r is not available on this CPU; using %s", isa,
                        mod.ffi.string(mod.lib.bk_isa()).decode())
    else:
        log.warning("native kernels unavailable: %s; using numpy", reason)
    _state["mod"] = mod
    _state["reason"] = reason
    return mod


def available() -> bool:
    return _load() is not None


def library_path() -> str | None:
    """The file of the loaded native extension (None: numpy computes)."""
    mod = _load()
    return getattr(mod, "__file__", None) if mod is not None else None


def active() -> str:
    """The variant that computes the products: "avx512-vnni", "avx2", "portable" (native) or "numpy"."""
    mod = _load()
    return "numpy" if mod is None else mod.ffi.string(mod.lib.bk_isa()).decode()


def unavailable_reason() -> str | None:
    _load()
    return _state.get("reason")


def set_isa(name: str) -> bool:
    """Force a native variant ("auto" restores the CPU's best); False when this CPU cannot run it."""
    mod = _load()
    return mod is not None and mod.lib.bk_set_isa(name.encode()) == 0


def threads() -> int:
    """BITNET_CPU_THREADS (default 2): the CPU threads of every engine, here and in the harness (the kernels'
    pool, bitnet_ref's receipt, the llama.cpp adapters, bitnet.cpp's tools), so that results which depend
    on the thread split (llama-perplexity's sums) do not vary by machine. ValueError for anything but a
    positive integer."""
    text = os.environ.get("BITNET_CPU_THREADS", "").strip()
    if not text:
        return 2
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"BITNET_CPU_THREADS={text!r} is not a positive integer: set it to the number of CPU "
                         "threads the engines may use (default 2), or unset it")
    return n


def reload() -> None:
    """Forget the loaded extension: the next call reads the environment again (BITNET_KERNELS, ..._PATH)."""
    _state.clear()


_reset_for_tests = reload


@contextlib.contextmanager
def numpy_only():
    """Inside the block bitnet_ref computes without its native kernels (BITNET_KERNELS=0, as a user sets it); the
    variable and the loaded extension are restored afterwards."""
    old = os.environ.get("BITNET_KERNELS")
    os.environ["BITNET_KERNELS"] = "0"
    reload()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("BITNET_KERNELS", None)
        else:
            os.environ["BITNET_KERNELS"] = old
        reload()


# -- helpers ------------------------------------------------------------------------------------------
def _rows_f32(x) -> np.ndarray:
    a = np.ascontiguousarray(x, dtype=np.float32)
    return a.reshape(1, -1) if a.ndim == 1 else a


def _ptr(mod, ctype: str, a: np.ndarray):
    return mod.ffi.from_buffer(ctype, a)


def _check(rc: int, what: str, k: int, block: int) -> None:
    if rc == 0:
        return
    if rc == -1:
        raise ValueError(f"{what}: K={k} is not a multiple of the {block}-value block")
    if rc == -3:
        raise MemoryError(f"{what}: no memory for the kernel's buffers")
    raise ValueError(f"{what}: bad arguments (rc={rc})")


def _packed_u8(w, nbytes: int, what: str) -> np.ndarray:
    a = np.asarray(w)
    if a.dtype != np.uint8:
        raise TypeError(f"{what}: packed weights must be uint8, got {a.dtype}")
    a = a.reshape(-1)
    if a.size < nbytes:
        raise ValueError(f"{what}: {a.size} packed bytes, the shape needs {nbytes}")
    return np.ascontiguousarray(a[:nbytes])


# -- activation quantizers ----------------------------------------------------------------------------
def quantize_i8_s(x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """bitnet.cpp's quantize_row_i8_s per token row: (q int8 (T, K), s float32 (T,), act_sum int32 (T,))."""
    a = _rows_f32(x)
    mod = _load()
    if mod is None:
        q, s = _np_quantize_i8_s(a)
        return q, s, q.astype(np.int64).sum(axis=1).astype(np.int32)
    t, k = a.shape
    q = np.empty((t, k), np.int8)
    s = np.empty(t, np.float32)
    sums = np.empty(t, np.int32)
    rc = mod.lib.bk_quantize_i8_s(_ptr(mod, "float[]", a), t, k, _ptr(mod, "int8_t[]", q),
                                  _ptr(mod, "float[]", s), _ptr(mod, "int32_t[]", sums))
    _check(rc, "quantize_i8_s", k, 1)
    return q, s, sums


def quantize_q8_k_blocks(x) -> tuple[np.ndarray, np.ndarray]:
    """ggml's Q8_K quantizer: (q int8 (T, K), d float32 (T, K/256)); K % 256 != 0 raises ValueError."""
    a = _rows_f32(x)
    mod = _load()
    if mod is None:
        return _np_quantize_q8_k_blocks(a)
    t, k = a.shape
    if k % QK_K:
        raise ValueError(f"Q8_K needs a row length that is a multiple of {QK_K}, got {k}")
    q = np.empty((t, k), np.int8)
    d = np.empty((t, k // QK_K), np.float32)
    rc = mod.lib.bk_quantize_q8_k(_ptr(mod, "float[]", a), t, k, _ptr(mod, "int8_t[]", q), _ptr(mod, "float[]", d))
    _check(rc, "quantize_q8_k", k, QK_K)
    return q, d


# -- products -----------------------------------------------------------------------------------------
def _i2s_codes_numpy(packed: np.ndarray, rows: int, k: int) -> np.ndarray:
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)
    return ((packed.reshape(-1, 1, 32) >> shifts) & 3).reshape(rows, k)


def i2s_raw(q: np.ndarray, packed, rows: int, wrap16: bool = False) -> np.ndarray:
    """Σ code·q (code = the raw 2-bit value, 0..3) for every (token, row): int32 (T, rows).

    q int8 (T, K), K a multiple of 128; packed: the I2_S x86 bytes of a (rows, K) tensor (the scale tail may
    follow). wrap16 models bitnet.cpp's AVX2 int16 lane accumulation (modulo 2^16 over 32 blocks)."""
    q = np.ascontiguousarray(q, dtype=np.int8)
    if q.ndim != 2:
        raise ValueError(f"i2s_raw: q must be (T, K), got shape {q.shape}")
    t, k = q.shape
    if k % QK_I2_S:
        raise ValueError(f"i2s_raw: K={k} is not a multiple of the {QK_I2_S}-value block")
    w = _packed_u8(packed, rows * k // 4, "i2s_raw")
    mod = _load()
    if mod is None:
        codes = _i2s_codes_numpy(w, rows, k).astype(np.int16)
        if wrap16:
            return _i2s_raw_int16(q, codes).astype(np.int32)
        return (q.astype(np.float64) @ codes.T.astype(np.float64)).astype(np.int32)
    out = np.empty((t, rows), np.int32)
    fn = mod.lib.bk_i2s_raw_wrap16 if wrap16 else mod.lib.bk_i2s_raw
    rc = fn(_ptr(mod, "int8_t[]", q), t, k, _ptr(mod, "uint8_t[]", w), rows, _ptr(mod, "int32_t[]", out), threads())
    _check(rc, "i2s_raw", k, QK_I2_S)
    return out


def _tq_args(type_id: int, q, packed, rows: int, what: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """A TQ product's checked inputs: q int8 (T, K) contiguous, the packed block bytes, K and K/256."""
    fmt = TQ_FORMATS.get(type_id)
    if fmt is None:
        raise ValueError(f"{what}: type {type_id} is not TQ1_0 ({TQ1_0.type_id}) or TQ2_0 ({TQ2_0.type_id})")
    q = np.ascontiguousarray(q, dtype=np.int8)
    if q.ndim != 2:
        raise ValueError(f"{what}: q must be (T, K), got shape {q.shape}")
    k = q.shape[1]
    if k % QK_K:
        raise ValueError(f"{what}: K={k} is not a multiple of the {QK_K}-value block")
    nb = k // QK_K
    return q, _packed_u8(packed, fmt.nbytes((rows, k)), what), k, nb


def _tq_unpack(type_id: int, w: np.ndarray, rows: int, k: int):
    return TQ_FORMATS[type_id].unpack(w, (rows, k))


def tq_lanes(type_id: int, q: np.ndarray, packed, rows: int) -> np.ndarray:
    """ggml's x86 TQ1_0/TQ2_0 x Q8_K lanes: int32 (T, rows, K/256, 8); lane l of a block is Σ code·q over the
    values v with v % 32 in [4l, 4l+4), minus Σ q over [32l, 32l+32). packed: the tensor's block bytes."""
    q, w, k, nb = _tq_args(type_id, q, packed, rows, "tq_lanes")
    mod = _load()
    if mod is None:
        return _tq_lanes_numpy(q, _tq_unpack(type_id, w, rows, k).values).astype(np.int32)
    out = np.empty((q.shape[0], rows, nb, 8), np.int32)
    rc = mod.lib.bk_tq_lanes(type_id, _ptr(mod, "int8_t[]", q), q.shape[0], k, _ptr(mod, "uint8_t[]", w), rows,
                             _ptr(mod, "int32_t[]", out), threads())
    _check(rc, "tq_lanes", k, QK_K)
    return out


def tq_dot(type_id: int, q: np.ndarray, dy: np.ndarray, packed, rows: int) -> np.ndarray:
    """ggml's x86 TQ1_0/TQ2_0 x Q8_K dot for every (token, row): float32 (T, rows), bit for bit
    `ggml_ref.tq_dot_q8_k_ggml` (the lanes of `tq_lanes`, ggml's FMA epilogue with the blocks' f16 scales, and
    hsum_float_8). q int8 (T, K) and dy float32 (T, K/256): the Q8_K activations; packed: the block bytes."""
    q, w, k, nb = _tq_args(type_id, q, packed, rows, "tq_dot")
    t = q.shape[0]
    dy = np.ascontiguousarray(dy, dtype=np.float32)
    if dy.shape != (t, nb):
        raise ValueError(f"tq_dot: dy must be ({t}, {nb}), got {dy.shape}")
    mod = _load()
    if mod is None:
        tern = _tq_unpack(type_id, w, rows, k)
        return tq_dot_q8_k_ggml(q, dy, tern.values, np.asarray(tern.scale, dtype=np.float32))
    out = np.empty((t, rows), np.float32)
    rc = mod.lib.bk_tq_dot(type_id, _ptr(mod, "int8_t[]", q), _ptr(mod, "float[]", dy), t, k,
                           _ptr(mod, "uint8_t[]", w), rows, _ptr(mod, "float[]", out), threads())
    _check(rc, "tq_dot", k, QK_K)
    return out


EXACT_TYPES = {0: "f32", 1: "f16", 34: "tq1_0", 35: "tq2_0", 36: "i2_s"}  # ggml type ids bk_exact_matmul reads


def exact_matmul(type_id: int, x, w, rows: int, scale=None) -> np.ndarray:
    """The exact profile's product: float64 (T, rows) = x (T, K) float64 times the rows of w, bit for bit
    `exact_sum.ternary_dot` / `lane_dot` (which compute it when the native kernels are unavailable). w: the
    tensor's stored bytes (uint8, read in place: TQ1_0/TQ2_0/I2_S x86 packed, or F32/F16 rows); scale float32
    (rows or 1, nb) for the ternary formats (nb = K/256 for TQ, 1 for I2_S)."""
    if type_id not in EXACT_TYPES:
        raise ValueError(f"exact_matmul: type {type_id} is not one of {EXACT_TYPES}")
    a = np.ascontiguousarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"exact_matmul: x must be (T, K), got shape {a.shape}")
    t, k = a.shape
    ternary = type_id not in (0, 1)
    if ternary:
        if scale is None:
            raise ValueError("exact_matmul: ternary weights need their scale")
        sc = np.ascontiguousarray(scale, dtype=np.float32)
        if sc.ndim != 2 or sc.shape[0] not in (1, rows):
            raise ValueError(f"exact_matmul: scale must be (1 or {rows}, nb), got shape {sc.shape}")
    else:
        sc = np.zeros((1, 1), np.float32)
    from .formats import get_format

    fmt = get_format(type_id) if type_id != 36 else None
    nbytes = rows * k // 4 if type_id == 36 else fmt.nbytes((rows, k))
    wb = _packed_u8(np.asarray(w).reshape(-1).view(np.uint8), nbytes, "exact_matmul")
    mod = _load()
    if mod is None:
        from .exact_sum import lane_dot, ternary_dot
        from .formats.i2s import I2S_X86

        if ternary:
            f = I2S_X86 if type_id == 36 else fmt
            if type_id == 36:
                wb = np.concatenate([wb, np.zeros(32, np.uint8)])  # the unpacker wants the scale tail
            return ternary_dot(a, f.unpack(wb, (rows, k)).values, sc)
        return lane_dot(a, fmt.decode(wb, (rows, k)).astype(np.float32))
    out = np.empty((t, rows), np.float64)
    rc = mod.lib.bk_exact_matmul(type_id, _ptr(mod, "double[]", a), t, k, _ptr(mod, "uint8_t[]", wb), rows,
                                 _ptr(mod, "float[]", sc), sc.shape[0], sc.shape[1], _ptr(mod, "double[]", out),
                                 threads())
    _check(rc, "exact_matmul", k, QK_I2_S if type_id == 36 else QK_K)
    return out


def exact_matmul_many(type_id: int, x, mats) -> list[np.ndarray]:
    """exact_matmul of several ternary matrices of one type on the same x (a layer's Q, K, V; gate and up):
    mats is a list of (stored bytes, rows, scale); one native call computes the per-token tables once. The same
    bits as one exact_matmul each (which it falls back to without the kernels or beyond BK_EXACT_MANY)."""
    mod = _load()
    if mod is None or len(mats) > mod.lib.BK_EXACT_MANY or type_id not in (34, 35, 36):
        return [exact_matmul(type_id, x, w, rows, scale) for w, rows, scale in mats]
    a = np.ascontiguousarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"exact_matmul_many: x must be (T, K), got shape {a.shape}")
    t, k = a.shape
    from .formats import get_format

    fmt = get_format(type_id) if type_id != 36 else None
    ws, scales, outs = [], [], []
    for w, rows, scale in mats:
        nbytes = rows * k // 4 if type_id == 36 else fmt.nbytes((rows, k))
        ws.append(_packed_u8(np.asarray(w).reshape(-1).view(np.uint8), nbytes, "exact_matmul_many"))
        sc = np.ascontiguousarray(scale, dtype=np.float32)
        if sc.ndim != 2 or sc.shape[0] not in (1, rows):
            raise ValueError(f"exact_matmul_many: scale must be (1 or {rows}, nb), got shape {sc.shape}")
        scales.append(sc)
        outs.append(np.empty((t, rows), np.float64))
    rc = mod.lib.bk_exact_matmul_many(
        type_id, _ptr(mod, "double[]", a), t, k, len(mats), [_ptr(mod, "uint8_t[]", w) for w in ws],
        [rows for _, rows, _ in mats], [_ptr(mod, "float[]", sc) for sc in scales], [sc.shape[0] for sc in scales],
        [_ptr(mod, "double[]", o) for o in outs], threads())
    _check(rc, "exact_matmul_many", k, QK_I2_S if type_id == 36 else QK_K)
    return outs


def _exact_attention(values: bool, a, cache, s_len: int) -> np.ndarray:
    """bk_exact_scores (a = q (T, heads, d)) or bk_exact_values (a = w (heads, T, s_len)) over the cache's first
    s_len positions; numpy's definition (exact_sum) without the kernels or for a cache that is not float32."""
    from . import exact_sum

    name = "exact_values" if values else "exact_scores"
    a = np.ascontiguousarray(a, dtype=np.float64)
    c = np.asarray(cache)
    if c.ndim != 3 or c.shape[0] < s_len or s_len < 1 or a.ndim != 3:
        raise ValueError(f"{name}: a (>= {s_len}, kv_heads, d) cache and a 3-D array, got {c.shape}, {a.shape}")
    heads, t = (a.shape[0], a.shape[1]) if values else (a.shape[1], a.shape[0])
    fits = a.shape[2] == s_len if values else a.shape[2] == c.shape[2]
    if not fits or heads % c.shape[1]:
        raise ValueError(f"{name}: {a.shape} does not fit the cache {c.shape} over {s_len} positions")
    mod = _load()
    if mod is None or c.dtype != np.float32:
        return (exact_sum.attention_values if values else exact_sum.attention_scores)(a, c[:s_len])
    d = c.shape[2]
    out = np.empty((t, heads, d) if values else (heads, t, s_len), np.float64)
    fn = mod.lib.bk_exact_values if values else mod.lib.bk_exact_scores
    rc = fn(_ptr(mod, "double[]", a), t, heads, c.shape[1], d, _ptr(mod, "float[]", np.ascontiguousarray(c[:s_len])),
            s_len, _ptr(mod, "double[]", out), threads())
    _check(rc, name, d, 1)
    return out


def exact_scores(q, kc, s_len: int) -> np.ndarray:
    """The exact profile's attention scores: float64 (heads, T, s_len) = q (T, heads, d) float64 against the
    first s_len keys of kc (positions, kv_heads, d), in `exact_sum.attention_scores`' order (which computes them
    when the native kernels are unavailable); a float32 cache is read in place."""
    return _exact_attention(False, q, kc, s_len)


def exact_values(w, vc, s_len: int) -> np.ndarray:
    """The exact profile's attention output: float64 (T, heads, d) = the weights w (heads, T, s_len) float64
    times the first s_len rows of vc (positions, kv_heads, d), in `exact_sum.attention_values`' order."""
    return _exact_attention(True, w, vc, s_len)


def exact_rms(x, gain, eps: float) -> np.ndarray:
    """The exact profile's RMS norm: float64 (T, K) = `exact_sum.rms_norm` (which computes it without the native
    kernels) of x (T, K) float64 with a float32 gain (K,)."""
    from .exact_sum import rms_norm

    a = np.ascontiguousarray(x, dtype=np.float64)
    g = np.asarray(gain)
    if a.ndim != 2 or g.shape != (a.shape[1],):
        raise ValueError(f"exact_rms: x must be (T, K) with a gain of K values, got {a.shape} and {g.shape}")
    mod = _load()
    if mod is None or g.dtype != np.float32:
        return rms_norm(a, g, eps)
    out = np.empty_like(a)
    rc = mod.lib.bk_exact_rms(_ptr(mod, "double[]", a), a.shape[0], a.shape[1],
                              _ptr(mod, "float[]", np.ascontiguousarray(g)), float(eps), _ptr(mod, "double[]", out),
                              threads())
    _check(rc, "exact_rms", a.shape[1], 1)
    return out


def exact_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> bool:
    """Rotate x (T, heads, d) float64 in place in NeoX pairs, as Model._rope computes it, with cos/sin (T, d/2)
    float64; False (x untouched) where the native kernels are not loaded or x is not a C-contiguous float64 array."""
    mod = _load()
    if mod is None or x.dtype != np.float64 or not x.flags.c_contiguous or x.ndim != 3:
        return False
    t, heads, d = x.shape
    c = np.ascontiguousarray(cos, dtype=np.float64)
    s = np.ascontiguousarray(sin, dtype=np.float64)
    if d % 2 or c.shape != (t, d // 2) or s.shape != c.shape:
        raise ValueError(f"exact_rope: x {x.shape} needs cos and sin of shape ({t}, {d // 2}), got {c.shape} and "
                         f"{s.shape}")
    rc = mod.lib.bk_exact_rope(_ptr(mod, "double[]", x), t, heads, d, _ptr(mod, "double[]", c),
                               _ptr(mod, "double[]", s), threads())
    _check(rc, "exact_rope", d, 2)
    return True


def exact_relu2_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray | None:
    """max(gate, 0)^2 * up, float64 (T, N), as Model._ffn_act computes it, in a new array; None where the native
    kernels are not loaded or the arrays are not C-contiguous float64 of one 2-D shape."""
    mod = _load()
    if (mod is None or gate.dtype != np.float64 or up.dtype != np.float64 or gate.shape != up.shape
            or gate.ndim != 2 or not (gate.flags.c_contiguous and up.flags.c_contiguous)):
        return None
    out = np.empty_like(gate)
    rc = mod.lib.bk_exact_relu2_mul(_ptr(mod, "double[]", gate), _ptr(mod, "double[]", up), gate.shape[0],
                                    gate.shape[1], _ptr(mod, "double[]", out), threads())
    _check(rc, "exact_relu2_mul", gate.shape[1], 1)
    return out


F16_VEC_DOT, F16_GEMM = 0, 1
F16_MODES = {"vec_dot": F16_VEC_DOT, "gemm": F16_GEMM}


def f16_matmul(x, w, rows: int, mode: str) -> np.ndarray:
    """F16 rows times float32 activations in ggml's float32 order: float32 (T, rows).

    x (T, K) float32; w: the little-endian f16 bytes (uint8, e.g. a view of the mapped file) or a float16
    array of a (rows, K) tensor, read in place. mode "vec_dot": `ggml_ref.vec_dot_f16_ggml` (x must hold f16
    values: round it first); "gemm": `ggml_ref.f16_gemm_ggml` (K % 16 == 0). Bit-identical to those functions;
    they compute it when the native kernels are unavailable."""
    if mode not in F16_MODES:
        raise ValueError(f"f16_matmul: mode {mode!r} is not one of {sorted(F16_MODES)}")
    a = _rows_f32(x)
    if a.ndim != 2:
        raise ValueError(f"f16_matmul: x must be (T, K), got shape {a.shape}")
    t, k = a.shape
    if mode == "gemm" and k % 16:
        raise ValueError(f"f16_matmul: K={k} is not a multiple of the 16-value block")
    wa = np.asarray(w)
    if wa.dtype == np.float16:
        wa = np.ascontiguousarray(wa).reshape(-1).view(np.uint8)
    wb = _packed_u8(wa, rows * k * 2, "f16_matmul")
    mod = _load()
    if mod is None:
        rows_f16 = wb.view(np.float16).reshape(rows, k)
        if mode == "gemm":
            return f16_gemm_ggml(a, rows_f16.astype(np.float32))
        return vec_dot_f16_ggml(a.astype(np.float16)[:, None, :], rows_f16[None, :, :])
    out = np.empty((t, rows), np.float32)
    rc = mod.lib.bk_f16_matmul(F16_MODES[mode], _ptr(mod, "float[]", a), t, k, _ptr(mod, "uint8_t[]", wb), rows,
                               _ptr(mod, "float[]", out), threads())
    _check(rc, "f16_matmul", k, 16)
    return out


def attention_f16(q, kc, vc, s_len: int, n_ctx: int) -> np.ndarray:
    """bitnet-cpp's attention over an f16 KV cache (ggml's non-flash order, AVX-512 build): float32 (T, heads*d).

    q (T, heads, d) float32, rounded to f16 in C; kc, vc: float16 caches (>= s_len positions, kv_heads, d), the
    first s_len positions read in place; the T queries are positions s_len-T .. s_len-1; n_ctx: the context
    length (decode pads V to min(ceil32(s_len), ceil32(n_ctx)) cells). Bit-identical to the numpy definition,
    `model.Model._attention_ggml` with an f16 KV cache, which callers use without the native kernels (there is
    no fallback here: RuntimeError)."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"attention_f16: native kernels unavailable: {unavailable_reason()}")
    a = np.ascontiguousarray(q, dtype=np.float32)
    if a.ndim != 3 or a.shape[0] < 1:
        raise ValueError(f"attention_f16: q must be (T, heads, d) with T >= 1, got shape {a.shape}")
    t, heads, d = a.shape
    caches = []
    for name, c in (("kc", kc), ("vc", vc)):
        c = np.asarray(c)
        if c.dtype != np.float16 or c.ndim != 3:
            raise TypeError(f"attention_f16: {name} must be a float16 (positions, kv_heads, d) array")
        if c.shape[0] < s_len or c.shape[2] != d or c.shape[1] < 1 or heads % c.shape[1]:
            raise ValueError(f"attention_f16: {name} shape {c.shape} does not fit s_len={s_len}, {heads} heads of {d}")
        caches.append(np.ascontiguousarray(c[:s_len]).view(np.uint16))  # leading rows of a C array: no copy
    kvh = caches[0].shape[1]
    if caches[1].shape[1] != kvh:
        raise ValueError(f"attention_f16: K has {kvh} heads, V {caches[1].shape[1]}")
    if not t <= s_len <= n_ctx:
        raise ValueError(f"attention_f16: need T <= s_len <= n_ctx, got T={t}, s_len={s_len}, n_ctx={n_ctx}")
    out = np.empty((t, heads * d), np.float32)
    rc = mod.lib.bk_attention_f16(_ptr(mod, "float[]", a), t, heads, kvh, d, _ptr(mod, "uint16_t[]", caches[0]),
                                  _ptr(mod, "uint16_t[]", caches[1]), s_len, n_ctx, _ptr(mod, "float[]", out),
                                  threads())
    _check(rc, "attention_f16", d, 1)
    return out


def cos_sin(theta) -> tuple[np.ndarray, np.ndarray] | None:
    """cosf and sinf of float32 angles from the C math library the extension links (the functions ggml's RoPE
    calls), or None without the native kernels."""
    mod = _load()
    if mod is None:
        return None
    th = np.ascontiguousarray(theta, dtype=np.float32)
    c, s = np.empty_like(th), np.empty_like(th)
    _check(mod.lib.bk_cos_sin(_ptr(mod, "float[]", th), th.size, _ptr(mod, "float[]", c), _ptr(mod, "float[]", s)),
           "cos_sin", 0, 1)
    return c, s


class LayerPlan:
    """One decoder layer prepared for `bitnet_layer`: the C struct and the arrays it points into (kept alive
    here). Made by `layer_plan`; tied to the extension that was loaded when it was made."""

    def __init__(self, mod, struct, keep, kv_dtype=np.float16):
        self.mod, self.struct, self._keep, self.kv_dtype = mod, struct, keep, kv_dtype


LAYER_PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _new_layer_struct(mod, ctype: str, dims: dict, norms: dict):
    """A new layer struct of `ctype` with the dimensions and the four norm gains set, and the buffers that must
    live as long as it (both layer kernels' structs share these fields)."""
    st = mod.ffi.new(ctype)
    for name in ("hidden", "heads", "kv_heads", "head_dim", "ffn", "n_ctx", "eps", "silu"):
        setattr(st, name, dims[name])
    keep = []
    for name in ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm"):
        a = np.ascontiguousarray(norms[name], dtype=np.float32)
        buf = _ptr(mod, "float[]", a)
        keep += [a, buf]
        setattr(st, name, buf)
    return st, keep


def layer_plan(dims: dict, norms: dict, packed: dict, w_scale: dict, out_scale: dict) -> LayerPlan | None:
    """The struct `bk_bitnet_layer` reads (native/bitnet_kernels.h), or None without the native kernels.

    dims: hidden, heads, kv_heads, head_dim, ffn, n_ctx, eps, silu (0: ReLU^2 gating, 1: SiLU); norms: the four
    float32 gains by tensor name (attn_norm, attn_sub_norm, ffn_norm, ffn_sub_norm); packed / w_scale /
    out_scale: by projection name (LAYER_PROJECTIONS), the I2_S bytes, their per-tensor scale and the `.scale`
    factor (1.0 if absent)."""
    mod = _load()
    if mod is None:
        return None
    st, keep = _new_layer_struct(mod, "bk_layer *", dims, norms)
    for i, name in enumerate(LAYER_PROJECTIONS):
        w = np.ascontiguousarray(packed[name], dtype=np.uint8).reshape(-1)
        buf = _ptr(mod, "uint8_t[]", w)
        keep += [w, buf]
        st.w[i] = buf
        st.w_scale[i] = float(np.float32(w_scale[name]))
        st.out_scale[i] = float(np.float32(out_scale[name]))
    return LayerPlan(mod, st, keep)

def _check_layer_args(what, plan, x, s_len, kc, vc, cos, sin, kv_dtype) -> None:
    st = plan.struct
    t = x.shape[0]
    for name, a, dt in (("x", x, np.float32), ("kc", kc, kv_dtype), ("vc", vc, kv_dtype),
                        ("cos", cos, np.float32), ("sin", sin, np.float32)):
        if a.dtype != dt or not a.flags.c_contiguous:
            raise ValueError(f"{what}: {name} must be C-contiguous {np.dtype(dt).name}")
    cache = (int(st.kv_heads), int(st.head_dim))
    if x.ndim != 2 or x.shape[1] != st.hidden or kc.shape[1:] != cache or vc.shape[1:] != cache:
        raise ValueError(f"{what}: x {x.shape}, caches {kc.shape} / {vc.shape} do not fit the layer "
                         f"(hidden {st.hidden}, (positions, {cache[0]}, {cache[1]}) caches)")
    if kc.shape[0] < s_len or vc.shape[0] < s_len:
        raise ValueError(f"{what}: caches of {min(kc.shape[0], vc.shape[0])} positions for s_len={s_len}")
    if cos.shape != (t, cache[1] // 2) or sin.shape != cos.shape:
        raise ValueError(f"{what}: angles {cos.shape} / {sin.shape}, the layer needs ({t}, {cache[1] // 2})")


def bitnet_layer(plan: LayerPlan, x: np.ndarray, s_len: int, kc: np.ndarray, vc: np.ndarray, cos: np.ndarray,
                 sin: np.ndarray, last_only: bool) -> None:
    """Run one decoder layer in place on x (t, hidden) float32 C-contiguous (see `layer_plan`): bitnet-cpp
    profile numerics, bit-identical to bitnet_ref.model's numpy forward. kc, vc: the layer's float16 caches
    (positions, kv_heads, head_dim) with at least s_len positions; cos, sin float32 (t, head_dim/2)."""
    _check_layer_args("bitnet_layer", plan, x, s_len, kc, vc, cos, sin, np.float16)
    mod, st = plan.mod, plan.struct
    t = x.shape[0]
    rc = mod.lib.bk_bitnet_layer(st, _ptr(mod, "float[]", x), t, s_len, _ptr(mod, "uint16_t[]", kc.view(np.uint16)),
                                 _ptr(mod, "uint16_t[]", vc.view(np.uint16)), _ptr(mod, "float[]", cos),
                                 _ptr(mod, "float[]", sin), int(last_only), threads())
    _check(rc, "bitnet_layer", int(st.hidden), QK_I2_S)


def attention_f32(q, kc, vc, s_len: int) -> np.ndarray:
    """The llama-cpp profile's attention over an F32 KV cache (ggml's non-flash order): float32 (T, heads*d).

    q (T, heads, d) float32, d a multiple of 64; kc, vc: float32 caches (>= s_len positions, kv_heads, d), the
    first s_len positions read in place; the T queries are positions s_len-T .. s_len-1. Bit-identical to
    `model.Model._attention_ggml` with an f32 KV cache (no fallback here: RuntimeError without the kernels)."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"attention_f32: native kernels unavailable: {unavailable_reason()}")
    a = np.ascontiguousarray(q, dtype=np.float32)
    if a.ndim != 3 or a.shape[0] < 1 or a.shape[2] % 64:
        raise ValueError(f"attention_f32: q must be (T, heads, d) with T >= 1 and d % 64 == 0, got {a.shape}")
    t, heads, d = a.shape
    caches = []
    for name, c in (("kc", kc), ("vc", vc)):
        c = np.asarray(c)
        if c.dtype != np.float32 or c.ndim != 3 or c.shape[0] < s_len or c.shape[2] != d or heads % c.shape[1]:
            raise ValueError(f"attention_f32: {name} must be a float32 (>= {s_len}, kv_heads, {d}) array dividing "
                             f"{heads} heads, got {c.dtype} {c.shape}")
        caches.append(np.ascontiguousarray(c[:s_len]))
    if caches[0].shape[1] != caches[1].shape[1] or not t <= s_len:
        raise ValueError(f"attention_f32: K {caches[0].shape}, V {caches[1].shape}, T={t}, s_len={s_len}")
    out = np.empty((t, heads * d), np.float32)
    rc = mod.lib.bk_attention_f32(_ptr(mod, "float[]", a), t, heads, caches[0].shape[1], d,
                                  _ptr(mod, "float[]", caches[0]), _ptr(mod, "float[]", caches[1]), s_len,
                                  _ptr(mod, "float[]", out), threads())
    _check(rc, "attention_f32", d, 64)
    return out


F64_WEIGHTS = {"f32": 0, "f16": 1}  # ggml type ids


def f64_matmul(x, w, rows: int, fmt: str) -> np.ndarray:
    """Float weights times float32 activations as the llama-cpp profile defines them: float32 (T, rows), the exact
    products summed in double and rounded once (the definition: `(x.astype(f64) @ w.T.astype(f64)).astype(f32)`,
    which computes it without the kernels). x (T, K) float32 (round it to f16 first for F16 weights, as the profile
    does); w: the tensor's stored bytes (uint8, read in place) or a float32 / float16 array of (rows, K)."""
    if fmt not in F64_WEIGHTS:
        raise ValueError(f"f64_matmul: weight format {fmt!r} is not one of {sorted(F64_WEIGHTS)}")
    a = _rows_f32(x)
    t, k = a.shape
    wa = np.asarray(w)
    if wa.dtype in (np.float16, np.float32):
        wa = np.ascontiguousarray(wa).reshape(-1).view(np.uint8)
    wb = _packed_u8(wa, rows * k * (2 if fmt == "f16" else 4), "f64_matmul")
    mod = _load()
    if mod is None:
        rows_w = wb.view(np.float16 if fmt == "f16" else np.float32).reshape(rows, k)
        return (a.astype(np.float64) @ rows_w.T.astype(np.float64)).astype(np.float32)
    out = np.empty((t, rows), np.float32)
    rc = mod.lib.bk_f64_matmul(F64_WEIGHTS[fmt], _ptr(mod, "float[]", a), t, k, _ptr(mod, "uint8_t[]", wb), rows,
                               _ptr(mod, "float[]", out), threads())
    _check(rc, "f64_matmul", k, 1)
    return out


LLAMA_WEIGHT_TYPES = {"tq1_0": TQ1_0.type_id, "tq2_0": TQ2_0.type_id, "f16": 1, "f32": 0}


def llama_layer_plan(dims: dict, norms: dict, weights: dict, out_scale: dict) -> LayerPlan | None:
    """The struct `bk_llama_cpp_layer` reads (native/bitnet_kernels.h), or None without the native kernels.

    dims and norms as `layer_plan`; weights: by projection name, (kind, array): kind "tq1_0" / "tq2_0" with the
    packed block bytes, "f16" with float32 values of an F16 tensor (the profile rounds its activations to f16) or
    "f32" with float32 values; out_scale: the `.scale` factors (1.0 if absent)."""
    mod = _load()
    if mod is None:
        return None
    st, keep = _new_layer_struct(mod, "bk_llama_layer *", dims, norms)
    for i, name in enumerate(LAYER_PROJECTIONS):
        kind, arr = weights[name]
        if kind not in LLAMA_WEIGHT_TYPES:
            raise ValueError(f"llama_layer_plan: {name}: weight kind {kind!r} not in {sorted(LLAMA_WEIGHT_TYPES)}")
        if kind in ("f16", "f32"):
            w = np.ascontiguousarray(arr, dtype=np.float32)
            buf = _ptr(mod, "float[]", w)
        else:
            w = np.ascontiguousarray(arr, dtype=np.uint8).reshape(-1)
            buf = _ptr(mod, "uint8_t[]", w)
        keep += [w, buf]
        st.w[i] = buf
        st.type[i] = LLAMA_WEIGHT_TYPES[kind]
        st.out_scale[i] = float(np.float32(out_scale[name]))
    return LayerPlan(mod, st, keep, kv_dtype=np.float32)


def llama_cpp_layer(plan: LayerPlan, x: np.ndarray, s_len: int, kc: np.ndarray, vc: np.ndarray, cos: np.ndarray,
                    sin: np.ndarray, last_only: bool) -> None:
    """Run one decoder layer in place on x (t, hidden) float32 C-contiguous (see `llama_layer_plan`): llama-cpp
    profile numerics, bit-identical to bitnet_ref.model's numpy forward. kc, vc: the layer's float32 caches
    (positions, kv_heads, head_dim) with at least s_len positions; cos, sin float32 (t, head_dim/2)."""
    _check_layer_args("llama_cpp_layer", plan, x, s_len, kc, vc, cos, sin, np.float32)
    mod, st = plan.mod, plan.struct
    rc = mod.lib.bk_llama_cpp_layer(st, _ptr(mod, "float[]", x), x.shape[0], s_len, _ptr(mod, "float[]", kc),
                                    _ptr(mod, "float[]", vc), _ptr(mod, "float[]", cos), _ptr(mod, "float[]", sin),
                                    int(last_only), threads())
    _check(rc, "llama_cpp_layer", int(st.hidden), QK_K)


__all__ = ["active", "attention_f16", "attention_f32", "available", "bitnet_layer", "cos_sin", "exact_matmul",
           "exact_matmul_many", "exact_relu2_mul", "exact_rms", "exact_rope", "exact_scores", "exact_values",
           "f16_matmul", "f64_matmul", "i2s_raw", "layer_plan", "llama_cpp_layer", "llama_layer_plan", "numpy_only",
           "reload", "quantize_i8_s", "quantize_q8_k_blocks", "set_isa", "tq_dot", "tq_lanes", "unavailable_reason"]
