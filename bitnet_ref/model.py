"""The BitNet b1.58 forward pass in numpy, with the numerics of a chosen profile (see numerics.py).

Per layer (mainline llama.cpp's `bitnet` graph, which bitnet.cpp shares):
    h = rms(x) * attn_norm;  q, k, v = Wq h, Wk h, Wv h;  NeoX RoPE on q, k
    a = causal GQA attention (scale 1/sqrt(head_dim));  o = rms(a) * attn_sub_norm;  x += Wo o
    h = rms(x) * ffn_norm;  f = act(Wg h) * (Wu h);  f = rms(f) * ffn_sub_norm;  x += Wd f
and logits = (rms(x) * output_norm) . token_embd^T. Every projection's output is multiplied by its
optional `blk.N.<name>.scale` tensor (shape {1}) when the file has one, as mainline does.

Ternary weights stay int8 values with their scales; the embedding is decoded per lookup (and per
chunk of rows for the lm_head), straight from the memory-mapped file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import LAYER_TENSORS, PROJECTIONS, ModelConfig
from .errors import FormatError, model_error
from .formats import format_for
from .formats.activations import QK_K, quantize_i8_s, quantize_q8_k_blocks
from .gguf import open_gguf
from .numerics import Profile, get_profile

LM_HEAD_CHUNK_ROWS = 8192


@dataclass
class Linear:
    """One projection: ternary int8 values with scales, or plain float weights (F32/F16 files)."""

    name: str
    fmt: str
    values: np.ndarray | None = None  # int8 (rows, K)
    scale: np.ndarray | None = None  # float32 (rows, blocks); a per-tensor scale is (1, 1)
    weight: np.ndarray | None = None  # float32 (rows, K), float formats only
    out_scale: float | None = None  # the optional `.scale` tensor


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


def _rms(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    return (x * (1.0 / np.sqrt(ms + eps)).astype(x.dtype)) * gain.astype(x.dtype)


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
        self._row_bytes = self._embedding_row_bytes()

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

            def floats(name):
                t = info(name)
                return format_for(gf, t).decode(gf.tensor_bytes(t), t.shape).astype(np.float32)

            layers = []
            for i in range(cfg.layers):
                norms, proj = {}, {}
                for n in LAYER_TENSORS:
                    name = f"blk.{i}.{n}.weight"
                    if n not in PROJECTIONS:
                        norms[n] = floats(name)
                        continue
                    t = info(name)
                    fmt = format_for(gf, t)
                    lin = Linear(name, fmt.name)
                    data = gf.tensor_bytes(t)
                    try:
                        if fmt.ternary:
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
                        sv = format_for(gf, st).decode(gf.tensor_bytes(st), st.shape).reshape(-1)
                        lin.out_scale = float(sv[0])
                    proj[n] = lin
                layers.append(Layer(norms, proj))
            output_norm = floats("output_norm.weight")
            embd = info("token_embd.weight")
            embd_fmt = format_for(gf, embd)
            if embd_fmt.ternary:
                raise model_error("unsupported-embedding", f"token_embd is stored as {embd_fmt.name}",
                                  "store the embedding as f32/f16/bf16", path=str(path), tensor=embd.name)
            return cls(cfg, prof, layers, output_norm, gf, embd, embd_fmt, str(path))
        except BaseException:
            gf.close()
            raise

    def close(self) -> None:
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
        data = self._gf.tensor_bytes(self._embd)
        if self._row_bytes is None:  # not row-sliceable: decode all (rare)
            return self._embd_fmt.decode(data, self._embd.shape)[start:stop]
        rb = self._row_bytes
        return self._embd_fmt.decode(data[start * rb: stop * rb], (stop - start, self.cfg.hidden))

    def embed(self, ids: np.ndarray) -> np.ndarray:
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
        if lin.values is not None:
            rows, k = lin.values.shape
            a = self._quantized(x, k) if self.profile.quantizes(lin.fmt) else x
            nb = lin.scale.shape[1]
            g = k // nb
            out = np.zeros((x.shape[0], rows), dtype=dt)
            for b in range(nb):
                part = a[:, b * g:(b + 1) * g] @ lin.values[:, b * g:(b + 1) * g].T.astype(dt)
                out += part * lin.scale[:, b].astype(dt)
        else:
            a = x
            if lin.fmt == "f16" and self.profile.f16_acts_for_f16_weights:
                a = x.astype(np.float16).astype(dt)
            out = a @ lin.weight.T.astype(dt)
        if lin.out_scale is not None:
            out = out * dt.type(lin.out_scale)
        return out

    def _lm_head(self, h: np.ndarray) -> np.ndarray:
        dt = self.dtype
        p = self.profile
        if p.lm_head == "f16" or (self._embd_fmt.name == "f16" and p.f16_acts_for_f16_weights):
            h = h.astype(np.float16).astype(dt)
        out = np.empty((h.shape[0], self.cfg.vocab), dtype=np.float32)
        for start in range(0, self.cfg.vocab, LM_HEAD_CHUNK_ROWS):
            stop = min(start + LM_HEAD_CHUNK_ROWS, self.cfg.vocab)
            out[:, start:stop] = h @ self._embedding_rows(start, stop).T.astype(dt)
        return out

    # -- rope and attention ----------------------------------------------------------------------
    def _rope_angles(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
            return np.cos(theta).astype(self.dtype), np.sin(theta).astype(self.dtype)
        inv = self.cfg.rope_theta ** (-2.0 * np.arange(half, dtype=np.float64) / self.cfg.head_dim)
        theta = pos.astype(np.float64)[:, None] * inv[None, :]
        return np.cos(theta).astype(self.dtype), np.sin(theta).astype(self.dtype)

    @staticmethod
    def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """NeoX rotation: pairs (i, i + d/2). x is (T, heads, d); cos/sin are (T, d/2)."""
        half = x.shape[-1] // 2
        x0, x1 = x[..., :half], x[..., half:]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)

    def _cache(self, state: State, i: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kvt = np.float16 if self.profile.kv_cache == "f16" else np.float32
        end = state.pos + k.shape[0]
        if len(state.k) <= i:
            state.k.append(np.zeros((0,) + k.shape[1:], dtype=kvt))
            state.v.append(np.zeros((0,) + v.shape[1:], dtype=kvt))
        if state.k[i].shape[0] < end:
            cap = max(end, 2 * state.k[i].shape[0], 64)
            for store in (state.k, state.v):
                grown = np.zeros((cap,) + k.shape[1:], dtype=kvt)
                grown[: state.pos] = store[i][: state.pos]
                store[i] = grown
        state.k[i][state.pos:end] = k
        state.v[i][state.pos:end] = v
        return state.k[i][:end].astype(self.dtype), state.v[i][:end].astype(self.dtype)

    def _attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """q (T, H, d); k, v (S, KV, d) for positions 0..S-1; query head h reads KV head h // (H/KV)."""
        cfg = self.cfg
        t, kvh, d = q.shape[0], cfg.kv_heads, cfg.head_dim
        g = cfg.heads // kvh
        qg = q.reshape(t, kvh, g, d)
        scores = np.einsum("tkgd,skd->kgts", qg, k) * self.dtype.type(1.0 / np.sqrt(d))
        mask = np.arange(k.shape[0])[None, :] > pos[:, None]  # (T, S): future keys
        scores = np.where(mask, -np.inf, scores)
        scores = scores - scores.max(axis=-1, keepdims=True)
        w = np.exp(scores)
        w = w / w.sum(axis=-1, keepdims=True)
        out = np.einsum("kgts,skd->tkgd", w, v)
        return out.reshape(t, cfg.heads * d)

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

    def forward(self, ids, state: State) -> np.ndarray:
        """Run `ids` after the positions already in `state` (which is updated); float32 logits (T, vocab)."""
        ids = self._check_ids(ids, state)
        cfg, eps = self.cfg, self.cfg.rms_eps
        t = ids.size
        pos = np.arange(state.pos, state.pos + t)
        cos, sin = self._rope_angles(pos)
        x = self.embed(ids)
        for i, layer in enumerate(self.layers):
            n, p = layer.norms, layer.proj
            h = _rms(x, n["attn_norm"], eps)
            q = self._mm(h, p["attn_q"]).reshape(t, cfg.heads, cfg.head_dim)
            k = self._mm(h, p["attn_k"]).reshape(t, cfg.kv_heads, cfg.head_dim)
            v = self._mm(h, p["attn_v"]).reshape(t, cfg.kv_heads, cfg.head_dim)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            keys, values = self._cache(state, i, k, v)
            a = self._attention(q, keys, values, pos)
            x = x + self._mm(_rms(a, n["attn_sub_norm"], eps), p["attn_output"])
            h = _rms(x, n["ffn_norm"], eps)
            gate = self._mm(h, p["ffn_gate"])
            up = self._mm(h, p["ffn_up"])
            if cfg.activation == "silu":
                act = gate / (1.0 + np.exp(-gate))
            else:
                act = np.square(np.maximum(gate, 0))
            f = _rms(act * up, n["ffn_sub_norm"], eps)
            x = x + self._mm(f, p["ffn_down"])
        state.pos += t
        return self._lm_head(_rms(x, self.output_norm, eps))

    def logits(self, ids) -> np.ndarray:
        """Teacher-forced logits for every position of `ids`: float32 (T, vocab)."""
        return self.forward(ids, self.new_state())


__all__ = ["Layer", "Linear", "Model", "State"]
