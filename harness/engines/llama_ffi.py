"""libllama through cffi (ABI mode): mainline llama.cpp (as llama-cpp-python vendors it) and bitnet.cpp's
2024-10-era fork, in-process, with every position's logits and the graph's intermediate tensors.

Two API generations, told apart by the symbols the library exports (never by guessing from a path):
- "mainline": llama_model_load_from_file, llama_init_from_model, llama_model_get_vocab (the vocab
  object carries tokenize/token_to_piece), 2-argument llama_batch_get_one, llama_memory_clear.
- "bitnet-fork": llama_load_model_from_file, llama_new_context_with_model, llama_kv_cache_clear,
  4-argument llama_batch_get_one, tokenizer calls on the model; no llama_model_get_vocab.
(Mainline still exports the fork's names as deprecated aliases, so mainline is tested first.)

llama_model_params and llama_context_params are passed by value: each generation has its own cdef that
declares them exactly as its llama.h does (mainline: llama-cpp-python 0.3.36's vendored llama.h; fork:
bitnet.cpp's 3rdparty/llama.cpp/include/llama.h), and the engine always starts from the library's own
llama_*_default_params() and edits only named fields. ggml_tensor (read in the eval callback) is also
declared per generation (the fork has the deprecated `backend` and `grad` fields), and every read is
cross-checked against libggml's own ggml_get_name/ggml_nelements.
"""

from __future__ import annotations

import collections
import math
import os
import threading
from pathlib import Path

import numpy as np

from bitnet_ref import kernels

from .base import (
    Engine,
    EngineError,
    EngineInfo,
    NotSupported,
    Perplexity,
    Receipt,
    ReferenceUnavailable,
    Sampling,
    file_sha256,
)

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
MAINLINE = "mainline"
GREEDY = Sampling()
FORK = "bitnet-fork"

MAINLINE_SYMBOLS = ("llama_model_load_from_file", "llama_init_from_model", "llama_model_get_vocab",
                    "llama_vocab_n_tokens", "llama_memory_clear", "llama_get_memory")
FORK_SYMBOLS = ("llama_load_model_from_file", "llama_new_context_with_model", "llama_n_vocab",
                "llama_kv_cache_clear", "llama_tokenize", "llama_token_to_piece")

_COMMON_TYPES = """
typedef int32_t llama_token;
typedef int32_t llama_pos;
typedef int32_t llama_seq_id;
struct llama_model;
struct llama_context;
struct ggml_backend_buffer;
struct llama_model_kv_override;
typedef void (*ggml_log_callback)(int level, const char * text, void * user_data);
typedef bool (*llama_progress_callback)(float progress, void * user_data);
typedef bool (*ggml_abort_callback)(void * data);
"""

_COMMON_FUNCS = """
typedef bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor * t, bool ask, void * user_data);
void llama_backend_init(void);
void llama_log_set(ggml_log_callback log_callback, void * user_data);
void ggml_log_set(ggml_log_callback log_callback, void * user_data);
const char * llama_print_system_info(void);
int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch);
float * llama_get_logits(struct llama_context * ctx);
float * llama_get_logits_ith(struct llama_context * ctx, int32_t i);
void llama_free(struct llama_context * ctx);
uint32_t llama_n_ctx(const struct llama_context * ctx);
int32_t llama_model_desc(const struct llama_model * model, char * buf, size_t buf_size);
int64_t ggml_nelements(const struct ggml_tensor * tensor);
size_t ggml_nbytes(const struct ggml_tensor * tensor);
const char * ggml_get_name(const struct ggml_tensor * tensor);
const char * ggml_type_name(int type);
void ggml_backend_tensor_get(const struct ggml_tensor * tensor, void * data, size_t offset, size_t size);
"""

# mainline llama.cpp as vendored by llama-cpp-python 0.3.36 (include/llama.h, ggml/include/ggml.h)
_CDEF_MAINLINE = _COMMON_TYPES + """
struct llama_vocab;
struct llama_memory_i;
typedef struct llama_memory_i * llama_memory_t;
struct llama_model_tensor_buft_override;
struct llama_sampler;
struct llama_sampler_seq_config { llama_seq_id seq_id; struct llama_sampler * sampler; };
struct ggml_tensor {
    int type;
    struct ggml_backend_buffer * buffer;
    int64_t ne[4];
    size_t nb[4];
    int op;
    int32_t op_params[16];
    int32_t flags;
    struct ggml_tensor * src[10];
    struct ggml_tensor * view_src;
    size_t view_offs;
    void * data;
    char name[64];
    void * extra;
    char padding[8];
};
typedef struct llama_batch {
    int32_t n_tokens;
    llama_token * token;
    float * embd;
    llama_pos * pos;
    int32_t * n_seq_id;
    llama_seq_id ** seq_id;
    int8_t * logits;
} llama_batch;
struct llama_model_params {
    void * devices;
    const struct llama_model_tensor_buft_override * tensor_buft_overrides;
    int32_t n_gpu_layers;
    int split_mode;
    int load_mode;
    int lazy_mode;
    int32_t main_gpu;
    const float * tensor_split;
    llama_progress_callback progress_callback;
    void * progress_callback_user_data;
    const struct llama_model_kv_override * kv_overrides;
    bool vocab_only;
    bool check_tensors;
    bool use_extra_bufts;
    bool no_host;
    bool no_alloc;
    bool load_mtp;
};
struct llama_context_params {
    uint32_t n_ctx;
    uint32_t n_batch;
    uint32_t n_ubatch;
    uint32_t n_seq_max;
    uint32_t n_rs_seq;
    uint32_t n_outputs_max;
    uint32_t n_outputs_max_per_seq;
    int32_t n_threads;
    int32_t n_threads_batch;
    int ctx_type;
    int rope_scaling_type;
    int pooling_type;
    int attention_type;
    int flash_attn_type;
    float rope_freq_base;
    float rope_freq_scale;
    float yarn_ext_factor;
    float yarn_attn_factor;
    float yarn_beta_fast;
    float yarn_beta_slow;
    uint32_t yarn_orig_ctx;
    float defrag_thold;
    bool (*cb_eval)(struct ggml_tensor * t, bool ask, void * user_data);
    void * cb_eval_user_data;
    int type_k;
    int type_v;
    ggml_abort_callback abort_callback;
    void * abort_callback_data;
    bool embeddings;
    bool offload_kqv;
    bool no_perf;
    bool op_offload;
    bool swa_full;
    bool kv_unified;
    struct llama_sampler_seq_config * samplers;
    size_t n_samplers;
    struct llama_context * ctx_other;
};
""" + _COMMON_FUNCS + """
const char * llama_version(void);
struct llama_model_params llama_model_default_params(void);
struct llama_context_params llama_context_default_params(void);
struct llama_model * llama_model_load_from_file(const char * path_model, struct llama_model_params params);
void llama_model_free(struct llama_model * model);
struct llama_context * llama_init_from_model(struct llama_model * model, struct llama_context_params params);
const struct llama_vocab * llama_model_get_vocab(const struct llama_model * model);
int32_t llama_vocab_n_tokens(const struct llama_vocab * vocab);
int32_t llama_model_n_ctx_train(const struct llama_model * model);
bool llama_vocab_is_eog(const struct llama_vocab * vocab, llama_token token);
llama_memory_t llama_get_memory(const struct llama_context * ctx);
void llama_memory_clear(llama_memory_t mem, bool data);
struct llama_batch llama_batch_get_one(llama_token * tokens, int32_t n_tokens);
int32_t llama_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len,
                       llama_token * tokens, int32_t n_tokens_max, bool add_special, bool parse_special);
int32_t llama_token_to_piece(const struct llama_vocab * vocab, llama_token token, char * buf, int32_t length,
                             int32_t lstrip, bool special);
"""

# bitnet.cpp's llama.cpp fork (3rdparty/llama.cpp/include/llama.h, ggml/include/ggml.h)
_CDEF_FORK = _COMMON_TYPES + """
struct ggml_tensor {
    int type;
    int backend;
    struct ggml_backend_buffer * buffer;
    int64_t ne[4];
    size_t nb[4];
    int op;
    int32_t op_params[16];
    int32_t flags;
    struct ggml_tensor * grad;
    struct ggml_tensor * src[10];
    struct ggml_tensor * view_src;
    size_t view_offs;
    void * data;
    char name[64];
    void * extra;
};
typedef struct llama_batch {
    int32_t n_tokens;
    llama_token * token;
    float * embd;
    llama_pos * pos;
    int32_t * n_seq_id;
    llama_seq_id ** seq_id;
    int8_t * logits;
    llama_pos all_pos_0;
    llama_pos all_pos_1;
    llama_seq_id all_seq_id;
} llama_batch;
struct llama_model_params {
    int32_t n_gpu_layers;
    int split_mode;
    int32_t main_gpu;
    const float * tensor_split;
    const char * rpc_servers;
    llama_progress_callback progress_callback;
    void * progress_callback_user_data;
    const struct llama_model_kv_override * kv_overrides;
    bool vocab_only;
    bool use_mmap;
    bool use_mlock;
    bool check_tensors;
};
struct llama_context_params {
    uint32_t n_ctx;
    uint32_t n_batch;
    uint32_t n_ubatch;
    uint32_t n_seq_max;
    int32_t n_threads;
    int32_t n_threads_batch;
    int rope_scaling_type;
    int pooling_type;
    int attention_type;
    float rope_freq_base;
    float rope_freq_scale;
    float yarn_ext_factor;
    float yarn_attn_factor;
    float yarn_beta_fast;
    float yarn_beta_slow;
    uint32_t yarn_orig_ctx;
    float defrag_thold;
    bool (*cb_eval)(struct ggml_tensor * t, bool ask, void * user_data);
    void * cb_eval_user_data;
    int type_k;
    int type_v;
    bool logits_all;
    bool embeddings;
    bool offload_kqv;
    bool flash_attn;
    bool no_perf;
    ggml_abort_callback abort_callback;
    void * abort_callback_data;
};
""" + _COMMON_FUNCS + """
struct llama_model_params llama_model_default_params(void);
struct llama_context_params llama_context_default_params(void);
struct llama_model * llama_load_model_from_file(const char * path_model, struct llama_model_params params);
void llama_free_model(struct llama_model * model);
struct llama_context * llama_new_context_with_model(struct llama_model * model, struct llama_context_params params);
int32_t llama_n_vocab(const struct llama_model * model);
int32_t llama_n_ctx_train(const struct llama_model * model);
bool llama_token_is_eog(const struct llama_model * model, llama_token token);
void llama_kv_cache_clear(struct llama_context * ctx);
struct llama_batch llama_batch_get_one(llama_token * tokens, int32_t n_tokens, llama_pos pos_0, llama_seq_id seq_id);
int32_t llama_tokenize(const struct llama_model * model, const char * text, int32_t text_len,
                       llama_token * tokens, int32_t n_tokens_max, bool add_special, bool parse_special);
int32_t llama_token_to_piece(const struct llama_model * model, llama_token token, char * buf, int32_t length,
                             int32_t lstrip, bool special);
"""


def _concat_rows(pieces: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """One tensor from its per-micro-batch pieces [(tokens, array)], rows (tokens) first; a one-token piece
    comes without its leading unit dim, so each is reshaped to (tokens, rest of the shape)."""
    tail = next((a.shape[1:] for t, a in pieces if t > 1), None)
    rows = [a.reshape((t, -1) if tail is None else (t, *tail)) for t, a in pieces]
    return np.concatenate(rows)


def mainline_library() -> Path:
    """libllama.so of mainline llama.cpp: LLAMA_CPP_LIB if set, else llama-cpp-python's package lib dir."""
    value = os.environ.get("LLAMA_CPP_LIB")
    if value:
        p = Path(value).expanduser()
        if p.is_dir():
            p = p / "libllama.so"
        if not p.is_file():
            raise ReferenceUnavailable(f"LLAMA_CPP_LIB={value}: {p} does not exist")
        return p
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is not None and spec.origin:
        p = Path(spec.origin).parent / "lib" / "libllama.so"
        if p.is_file():
            return p
    raise ReferenceUnavailable("mainline libllama.so not found: install llama-cpp-python (it ships "
                      "llama_cpp/lib/libllama.so) or set LLAMA_CPP_LIB to a libllama.so")


def _missing(names: tuple[str, ...], handle) -> list[str]:
    return [n for n in names if not _has_symbol(handle, n)]


def _has_symbol(handle, name: str) -> bool:
    try:
        getattr(handle, name)
        return True
    except AttributeError:
        return False


class _MainlineApi:
    """What differs in mainline llama.cpp's API (2025-): one small object per generation, so the adapter
    asks it instead of testing the generation everywhere."""

    name = MAINLINE
    symbols = MAINLINE_SYMBOLS
    cdef = _CDEF_MAINLINE
    profile = "llama-cpp"
    archs = ("bitnet",)
    formats = ("f32", "f16", "tq1_0", "tq2_0")
    default_kv = "f32"
    v_cache_f16_only = False

    @staticmethod
    def load_model(lib, path: bytes, mp):
        mp.load_mode = 0  # LLAMA_LOAD_MODE_NONE: read, no mmap
        return lib.llama_model_load_from_file(path, mp)

    @staticmethod
    def vocab(lib, model):
        vocab = lib.llama_model_get_vocab(model)
        return vocab, int(lib.llama_vocab_n_tokens(vocab))

    @staticmethod
    def n_ctx_train(lib, model) -> int:
        return int(lib.llama_model_n_ctx_train(model))

    @staticmethod
    def new_context(lib, model, cp):
        cp.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        return lib.llama_init_from_model(model, cp)

    @staticmethod
    def free_model(lib, model) -> None:
        lib.llama_model_free(model)

    @staticmethod
    def clear(lib, ctx) -> None:
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)

    @staticmethod
    def batch(lib, ffi, toks, n: int, pos0: int):
        """A batch of n tokens at positions pos0..; returns (batch, what must stay alive with it)."""
        batch = lib.llama_batch_get_one(toks, n)
        pos = ffi.new("llama_pos[]", list(range(pos0, pos0 + n)))
        batch.pos = pos
        return batch, pos

    @staticmethod
    def is_eog(lib, vocab, model, tok: int) -> bool:
        return bool(lib.llama_vocab_is_eog(vocab, tok))


class _ForkApi:
    """bitnet.cpp's fork (llama.cpp of 2024): its own names, and a V cache that must be f16 without flash
    attention."""

    name = FORK
    symbols = FORK_SYMBOLS
    cdef = _CDEF_FORK
    profile = "bitnet-cpp"
    archs = ("bitnet-b1.58",)
    formats = ("f32", "f16", "i2_s", "tl1", "tl2")
    default_kv = "f16"
    v_cache_f16_only = True

    @staticmethod
    def load_model(lib, path: bytes, mp):
        mp.use_mmap = False
        return lib.llama_load_model_from_file(path, mp)

    @staticmethod
    def vocab(lib, model):
        return model, int(lib.llama_n_vocab(model))

    @staticmethod
    def n_ctx_train(lib, model) -> int:
        return int(lib.llama_n_ctx_train(model))

    @staticmethod
    def new_context(lib, model, cp):
        cp.flash_attn = False
        cp.logits_all = False  # each batch says which tokens' logits it wants
        return lib.llama_new_context_with_model(model, cp)

    @staticmethod
    def free_model(lib, model) -> None:
        lib.llama_free_model(model)

    @staticmethod
    def clear(lib, ctx) -> None:
        lib.llama_kv_cache_clear(ctx)

    @staticmethod
    def batch(lib, ffi, toks, n: int, pos0: int):
        return lib.llama_batch_get_one(toks, n, pos0, 0), None

    @staticmethod
    def is_eog(lib, vocab, model, tok: int) -> bool:
        return bool(lib.llama_token_is_eog(model, tok))


APIS = (_MainlineApi, _ForkApi)


class _Library:
    """One loaded libllama (per path, per process): its API generation (`api`), its cffi handle, its log tail."""

    _loaded: dict[str, _Library] = {}
    _lock = threading.Lock()

    def __init__(self, path: Path, variable: str):
        import ctypes

        import cffi

        self.path = path
        self.variable = variable
        if not path.is_file():
            raise EngineError(f"{path} (from {variable}) does not exist")
        # RTLD_DEEPBIND: this library and its libggml bind to their own ggml symbols first, even when
        # another ggml (llama-cpp-python loads its own RTLD_GLOBAL) is already in the process.
        flags = os.RTLD_NOW | os.RTLD_LOCAL | getattr(os, "RTLD_DEEPBIND", 0)
        self._preloaded = []
        try:
            for dep in ("libggml-base.so", "libggml-cpu.so", "libggml.so"):
                p = path.parent / dep
                if p.is_file():  # beside libllama: make sure these (not another ggml) satisfy its NEEDED
                    self._preloaded.append(ctypes.CDLL(str(p), mode=flags))
            probe = ctypes.CDLL(str(path), mode=flags)
        except OSError as e:
            raise EngineError(f"cannot load {path} (from {variable}): {e}") from e
        missing = {api: _missing(api.symbols, probe) for api in APIS}
        self.api = next((api for api in APIS if not missing[api]), None)
        if self.api is None:
            raise EngineError(f"{path} (from {variable}) is not a libllama of a known API generation: "
                              f"mainline needs {', '.join(missing[_MainlineApi])}; bitnet.cpp's fork needs "
                              f"{', '.join(missing[_ForkApi])}")
        self.generation = self.api.name
        self._probe = probe
        self.ffi = cffi.FFI()
        self.ffi.cdef(self.api.cdef)
        self.lib = self.ffi.dlopen(str(path), flags)
        self.log_lines: collections.deque[str] = collections.deque(maxlen=40)
        self._partial = ""

        @self.ffi.callback("void(int, const char *, void *)")
        def _log(level, text, _ud):
            try:
                s = self._partial + self.ffi.string(text).decode("utf-8", "replace")
                *done, self._partial = s.split("\n")
                self.log_lines.extend(line for line in done if line.strip())
            except Exception:  # noqa: BLE001 - a log line must never raise into C
                pass

        self._log_cb = _log
        self.silence()
        self.lib.llama_backend_init()
        self.system_info = self.ffi.string(self.lib.llama_print_system_info()).decode("utf-8", "replace").strip()
        self.version = "unknown"
        if _has_symbol(probe, "llama_version"):
            self.version = self.ffi.string(self.lib.llama_version()).decode()
        self.sha256 = file_sha256(path)

    def silence(self) -> None:
        """(Re)install our log callback: the logger is global to the library and others may set theirs."""
        self.lib.llama_log_set(self._log_cb, self.ffi.NULL)
        if _has_symbol(self._probe, "ggml_log_set"):
            self.lib.ggml_log_set(self._log_cb, self.ffi.NULL)

    def last_log(self, n: int = 12) -> str:
        lines = list(self.log_lines)[-n:]
        if self._partial.strip():
            lines.append(self._partial)
        return "\n".join(lines)

    @classmethod
    def get(cls, path: Path, variable: str) -> _Library:
        key = str(Path(path).resolve()) if Path(path).exists() else str(path)
        with cls._lock:
            if key not in cls._loaded:
                cls._loaded[key] = _Library(Path(key), variable)
            return cls._loaded[key]


def _tensor_array(L: _Library, t) -> np.ndarray:
    """A ggml tensor (F32 or F16, any strides) as a float32 numpy array, shape = reversed ne, trailing
    unit dims of ne dropped (so a [n_embd, T] activation reads as [T, n_embd])."""
    ffi, lib = L.ffi, L.lib
    ne = [int(t.ne[i]) for i in range(4)]
    nb = [int(t.nb[i]) for i in range(4)]
    name = ffi.string(t.name).decode("utf-8", "replace")
    if name != ffi.string(lib.ggml_get_name(t)).decode("utf-8", "replace") or \
            int(lib.ggml_nelements(t)) != math.prod(ne):
        raise EngineError("ggml_tensor layout in the cdef does not match this libggml (name/ne disagree)")
    dtype = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16}.get(int(t.type))
    if dtype is None:
        tname = ffi.string(lib.ggml_type_name(t.type)).decode()
        raise NotSupported(f"intermediate {name!r} has type {tname}; only f32/f16 tensors are read")
    nbytes = int(lib.ggml_nbytes(t))
    raw = np.empty(nbytes, np.uint8)
    if nbytes:
        lib.ggml_backend_tensor_get(t, ffi.cast("void *", raw.ctypes.data), 0, nbytes)
    dims = 4
    while dims > 1 and ne[dims - 1] == 1:
        dims -= 1
    shape = tuple(reversed(ne[:dims]))
    item = np.dtype(dtype).itemsize
    # a byte view with the tensor's own strides (views such as k-0/q-0 are not contiguous)
    view = np.lib.stride_tricks.as_strided(raw, shape=shape + (item,), strides=tuple(reversed(nb[:dims])) + (1,),
                                           writeable=False)
    return np.ascontiguousarray(view).view(dtype).reshape(shape).astype(np.float32)


class LlamaLibEngine(Engine):
    """In-process libllama (mainline or bitnet.cpp's fork) on one model.

    Deterministic settings: `threads` (BITNET_CPU_THREADS, default 2), flash attention off, KV cache
    `kv_type` (mainline: f32 by default; the fork: f16, see below), n_batch = n_ubatch = n_ctx unless
    given (a prompt that fits the context is one batch), logits for every position, no mmap.
    """

    def __init__(self, model: str | os.PathLike, library: str | os.PathLike | None = None, *,
                 name: str = "llama.cpp", variable: str | None = None, threads: int | None = None,
                 n_ctx: int = 0, n_batch: int | None = None, n_ubatch: int | None = None, kv_type: str | None = None):
        self.name = name
        if variable is None:
            variable = "BITNET_CPP_DIR" if name == "bitnet.cpp" else "LLAMA_CPP_LIB"
        if library is None:
            if name == "bitnet.cpp":
                from .discovery import find_build

                library = find_build(variable).library("llama")
            else:
                library = mainline_library()
        self.model_path = Path(model)
        if not self.model_path.is_file():
            raise EngineError(f"model {self.model_path} does not exist")
        self.L = L = _Library.get(Path(library), variable)
        self.generation, self.api = L.generation, L.api
        self.threads = threads or kernels.threads()
        # KV cache: f32 where the library allows. The fork refuses a non-f16 V cache without flash
        # attention, so there the default is f16/f16 (what bitnet.cpp's own tools use) and "f32" means
        # an f32 K cache with an f16 V cache.
        kv_type = kv_type or L.api.default_kv
        if kv_type not in ("f32", "f16"):
            raise EngineError(f"kv_type must be 'f32' or 'f16', got {kv_type!r}")
        k = GGML_TYPE_F32 if kv_type == "f32" else GGML_TYPE_F16
        self.kv_types = (k, GGML_TYPE_F16 if L.api.v_cache_f16_only else k)
        self._n_ctx, self._n_batch, self._n_ubatch = n_ctx, n_batch, n_ubatch
        self.receipt = Receipt(engine=name, version=f"{L.generation} {L.version}; {L.system_info}",
                               model=str(self.model_path), model_sha256=file_sha256(self.model_path),
                               artifact=str(L.path), artifact_sha256=L.sha256,
                               profile=L.api.profile,
                               threads=self.threads, device="cpu")
        self.model = self.ctx = None
        self._keep = []
        with self.timed("load"):
            self._load()

    # ---- loading -------------------------------------------------------------------------------
    def _fail(self, what: str) -> EngineError:
        log = self.L.last_log()
        return EngineError(f"{self.name} ({self.L.path}) {what}" + (f"; the library said:\n{log}" if log else ""))

    def _load(self) -> None:
        L, lib, ffi = self.L, self.L.lib, self.L.ffi
        L.silence()
        L.log_lines.clear()
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.api.load_model(lib, str(self.model_path).encode(), mp)
        if self.model == ffi.NULL:
            self.model = None
            raise self._fail(f"cannot load model {self.model_path}")
        self.vocab, self.n_vocab = L.api.vocab(lib, self.model)
        buf = ffi.new("char[256]")
        lib.llama_model_desc(self.model, buf, 256)
        self.description = ffi.string(buf).decode("utf-8", "replace")
        self.n_ctx = self._n_ctx or L.api.n_ctx_train(lib, self.model)
        self.n_batch = self._n_batch or self.n_ctx  # default: a prompt that fits is one batch
        try:
            self.ctx = self._new_context()
        except EngineError:
            self.close()
            raise
        self.n_ctx = int(lib.llama_n_ctx(self.ctx))

    def _new_context(self, cb_eval=None):
        L, lib, ffi = self.L, self.L.lib, self.L.ffi
        L.silence()
        cp = lib.llama_context_default_params()
        cp.n_ctx = self.n_ctx
        cp.n_batch = self.n_batch
        cp.n_ubatch = self._n_ubatch or self.n_batch
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.type_k, cp.type_v = self.kv_types
        cp.no_perf = True
        if cb_eval is not None:
            cp.cb_eval = cb_eval
            cp.cb_eval_user_data = ffi.NULL
        ctx = L.api.new_context(lib, self.model, cp)  # flash attention off
        if ctx == ffi.NULL:
            raise self._fail("cannot create a context")
        return ctx

    def close(self) -> None:
        lib = self.L.lib
        if self.ctx is not None:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            self.api.free_model(lib, self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # ---- Engine ----------------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        return EngineInfo(name=self.name, version=self.receipt.version,
                          archs=self.api.archs, formats=self.api.formats,
                          operations=("tokenize", "logits", "generate", "perplexity", "intermediates"))

    def tokenize(self, text: str, add_bos: bool = True, parse_special: bool = False) -> list[int]:
        lib, ffi = self.L.lib, self.L.ffi
        data = text.encode("utf-8")
        with self.timed("tokenize"):
            n_max = len(data) + 8
            for _ in range(2):
                out = ffi.new("llama_token[]", n_max)
                n = lib.llama_tokenize(self.vocab, data, len(data), out, n_max, add_bos, parse_special)
                if n >= 0:
                    return [int(out[i]) for i in range(n)]
                n_max = -n
        raise self._fail(f"llama_tokenize failed for {text[:40]!r}")

    def token_piece(self, token: int, special: bool = False) -> bytes:
        lib, ffi = self.L.lib, self.L.ffi
        size = 256
        for _ in range(2):
            buf = ffi.new("char[]", size)
            n = lib.llama_token_to_piece(self.vocab, int(token), buf, size, 0, special)
            if n >= 0:
                return ffi.buffer(buf, n)[:]
            size = -n
        raise self._fail(f"llama_token_to_piece failed for token {token}")

    def detokenize(self, ids: list[int]) -> str:
        with self.timed("detokenize"):
            return b"".join(self.token_piece(t) for t in ids).decode("utf-8", "replace")

    def _clear(self, ctx=None) -> None:
        lib = self.L.lib
        ctx = ctx or self.ctx
        self.api.clear(lib, ctx)

    def _decode(self, ids: list[int], pos0: int, want_all: bool, ctx=None) -> np.ndarray | None:
        """Decode ids at positions pos0.. (one llama_decode per n_batch); the logits of every token
        when want_all, else of the last one."""
        lib, ffi = self.L.lib, self.L.ffi
        ctx = ctx or self.ctx
        if pos0 + len(ids) > self.n_ctx:
            raise EngineError(f"{pos0 + len(ids)} tokens do not fit the context of {self.n_ctx}")
        step = self.n_batch
        rows = []
        for s in range(0, len(ids), step):
            chunk = ids[s:s + step]
            toks = ffi.new("llama_token[]", chunk)
            last = s + len(chunk) >= len(ids)
            # outputs: every token's, or (as llama-cli asks) only the prompt's last: llama.cpp then drops the
            # other rows in its last layer, so the last logits can differ from the every-token run's last row
            flags = ffi.new("int8_t[]", [1] * len(chunk) if want_all else [0] * (len(chunk) - 1) + [int(last)])
            batch, _alive = self.api.batch(lib, ffi, toks, len(chunk), pos0 + s)
            batch.logits = flags
            rc = lib.llama_decode(ctx, batch)
            if rc != 0:
                raise self._fail(f"llama_decode returned {rc}")
            if want_all:
                p = lib.llama_get_logits(ctx)
                rows.append(np.frombuffer(ffi.buffer(p, 4 * self.n_vocab * len(chunk)), np.float32)
                            .reshape(len(chunk), self.n_vocab).copy())
            elif last:
                p = lib.llama_get_logits_ith(ctx, len(chunk) - 1)
                rows.append(np.frombuffer(ffi.buffer(p, 4 * self.n_vocab), np.float32)[None].copy())
        return np.concatenate(rows) if rows else None

    def logits(self, ids: list[int]) -> np.ndarray:
        with self.timed("logits"):
            self._clear()
            return self._decode(list(ids), 0, True)

    def generate(self, ids: list[int], n: int, sampling: Sampling = GREEDY) -> list[int]:
        if sampling.temperature > 0:
            raise NotSupported(f"{self.name} FFI adapter samples greedily only (temperature 0)")
        lib = self.L.lib
        out: list[int] = []
        with self.timed("generate"):
            self._clear()
            last = self._decode(list(ids), 0, False)[-1]
            pos = len(ids)
            for _ in range(n):
                tok = int(np.argmax(last))
                if self.api.is_eog(lib, self.vocab, self.model, tok):
                    break
                out.append(tok)
                if len(out) == n:
                    break
                last = self._decode([tok], pos, False)[-1]
                pos += 1
        return out

    def perplexity(self, ids: list[int], ctx: int, convention: str = "llama-perplexity") -> Perplexity:
        if convention != "llama-perplexity":
            raise NotSupported(f"{self.name} computes the llama-perplexity convention only")
        if ctx > self.n_ctx:
            raise EngineError(f"perplexity ctx {ctx} exceeds the context {self.n_ctx}: create the engine "
                              f"with n_ctx >= {ctx}")
        n_chunks = len(ids) // ctx
        if n_chunks < 1:
            raise EngineError(f"perplexity needs at least {ctx} tokens, got {len(ids)}")
        bos = self._bos()
        nll_sum, count, per_chunk = 0.0, 0, []
        first = ctx // 2
        with self.timed("perplexity"):
            for c in range(n_chunks):
                chunk = list(ids[c * ctx:(c + 1) * ctx])
                if bos is not None:
                    chunk[0] = bos
                self._clear()
                lg = self._decode(chunk, 0, True).astype(np.float64)
                x = lg[first:ctx - 1]
                m = x.max(axis=1, keepdims=True)
                logp = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
                nll_sum += -logp[np.arange(len(x)), ids[c * ctx + first + 1:(c + 1) * ctx]].sum()
                count += len(x)
                per_chunk.append(float(math.exp(nll_sum / count)))
        return Perplexity(ppl=per_chunk[-1], nll=nll_sum / count, n_scored=count, convention=convention,
                          ctx=ctx, per_chunk=per_chunk)

    def _bos(self) -> int | None:
        toks = self.tokenize("", add_bos=True)
        return toks[0] if toks else None

    def _run_with_callback(self, ids: list[int], cb, after_piece=None) -> None:
        """One teacher-forced pass over ids in a new context whose cb_eval is `cb`, decoded one micro-batch
        (n_ubatch tokens) per llama_decode, so that each piece is one graph evaluation; `after_piece(n_tokens)`
        is called after each."""
        ffi = self.L.ffi
        c_cb = ffi.callback("bool(struct ggml_tensor *, bool, void *)", cb, onerror=lambda *a: True)
        ctx = self._new_context(c_cb)
        ids = list(ids)
        step = self._n_ubatch or self.n_batch
        try:
            self._clear(ctx)
            for s in range(0, len(ids), step):
                self._decode(ids[s:s + step], s, True, ctx=ctx)
                if after_piece is not None:
                    after_piece(len(ids[s:s + step]))
        finally:
            self.L.lib.llama_free(ctx)

    def graph_nodes(self, ids: list[int]) -> list[str]:
        """The names of the graph's nodes in evaluation order (what intermediates() can ask for)."""
        ffi = self.L.ffi
        order: list[str] = []

        def cb(t, ask, _ud):
            if ask:
                order.append(ffi.string(t.name).decode("utf-8", "replace"))
            return not ask

        with self.timed("intermediates"):
            self._run_with_callback(ids, cb)
        return order

    def intermediates(self, ids: list[int], names: list[str], missing_ok: bool = False) -> dict[str, np.ndarray]:
        """Named graph tensors from one teacher-forced pass over ids, through cb_eval.

        A node name that occurs more than once (e.g. "Qcur-0" before and after RoPE, "norm-0") gives its
        last occurrence; "name#k" asks for the k-th (0-based). Values are float32, shaped like reversed
        ggml ne with trailing unit dims dropped: "attn_norm-0" is [T, n_embd], "result_output" [T, vocab].
        The prompt is evaluated in the micro-batches logits() uses (n_ubatch), each one graph evaluation;
        a tensor's rows are concatenated over them.
        """
        L, ffi = self.L, self.L.ffi
        wanted: dict[str, int | None] = {}
        for n in names:
            base, _, k = n.partition("#")
            wanted.setdefault(base, None)
        seen: dict[str, list[np.ndarray]] = collections.defaultdict(list)
        pieces: list[dict[str, list[np.ndarray]]] = []
        errors: list[BaseException] = []

        def after_piece(n_tokens):
            pieces.append((n_tokens, dict(seen)))
            seen.clear()

        def cb(t, ask, _ud):
            try:
                name = ffi.string(t.name).decode("utf-8", "replace")
                if name not in wanted:
                    return not ask  # ask: not needed; after compute: continue
                if ask:
                    return True
                seen[name].append(_tensor_array(L, t))
            except BaseException as e:  # noqa: BLE001 - never raise into C
                errors.append(e)
            return True

        with self.timed("intermediates"):
            self._run_with_callback(ids, cb, after_piece)
        if errors:
            e = errors[0]
            raise e if isinstance(e, EngineError) else EngineError(f"reading intermediates failed: {e!r}")
        out = {}
        missing = []
        for n in names:
            base, sep, k = n.partition("#")
            idx = int(k) if sep else -1
            got = [piece.get(base, []) for _, piece in pieces]
            if not all(got) or (sep and any(idx >= len(g) for g in got)):
                missing.append(n)
                continue
            out[n] = got[0][idx] if len(got) == 1 else _concat_rows([(t, g[idx]) for (t, _), g in zip(pieces, got)])
        if missing and not missing_ok:
            have = sorted({k for _, piece in pieces for k in piece})
            raise EngineError(f"{self.name} graph has no node(s) {', '.join(missing)}; it has e.g. "
                              f"{', '.join(have[:10]) or '(none of the requested)'}")
        return out
