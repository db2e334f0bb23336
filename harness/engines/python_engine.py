"""The Python engine (bitnet_ref) behind the Engine protocol: the default system under test."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

import bitnet_ref
from bitnet_ref import device, kernels
from bitnet_ref.config import ARCHITECTURES
from bitnet_ref.errors import ModelError
from bitnet_ref.generate import SamplingParams, generate, perplexity_llama, perplexity_sliding
from bitnet_ref.model import Model
from bitnet_ref.tokenizer import load_tokenizer

from .base import GREEDY, Engine, EngineError, EngineInfo, Perplexity, Receipt, Sampling, file_sha256

FORMATS = ("f32", "f16", "bf16", "tq1_0", "tq2_0", "i2_s", "i2_s_arm", "tl1", "tl2", "iq2_s")


def artifact_sha256(package: Path, libraries: list[str | None]) -> str:
    """What bitnet_ref's receipt calls its artifact hash: sha256 over every file of the package (sources and
    data, by relative path; byte-code caches and the built extension itself left out) and over each loaded
    native library (the kernels' extension, the CUDA library when decode runs there; None: numpy). Any
    change to the engine, its kernels, formats, tokenizer or numerics changes it."""
    h = hashlib.sha256()
    for p in sorted(package.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".so", ".pyd"):
            h.update(f"{p.relative_to(package).as_posix()}\0{file_sha256(p)}\n".encode())
    for lib in libraries:
        h.update(f"library\0{file_sha256(lib) if lib else 'numpy'}\n".encode())
    return h.hexdigest()


class PythonEngine(Engine):
    def __init__(self, model_path: str | os.PathLike, profile: str = "exact", n_ubatch: int | None = None):
        """n_ubatch: evaluate prompts in pieces of this many tokens (through the KV cache), as a reference
        run with the same micro-batch does; None: the whole prompt at once."""
        path = Path(model_path)
        threads = kernels.threads()  # a bad BITNET_CPU_THREADS is an error before anything is loaded
        self.n_ubatch = n_ubatch
        try:
            self.model = Model.load(path, profile)
        except ModelError as e:
            raise EngineError(f"bitnet_ref cannot load {path}: {e}") from e
        meta = {k: mv.value for k, mv in self.model._gf.metadata.items()}
        self.tokenizer = load_tokenizer(meta)
        stop = [t for t in (meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id"))
                if isinstance(t, int)]
        self.stop_ids = tuple(stop)
        self.bos_id = self.tokenizer.bos_id if self.tokenizer else meta.get("tokenizer.ggml.bos_token_id")
        package = Path(bitnet_ref.__file__).parent
        dev = self.model.device  # BITNET_DEVICE's decision; a fallback's reason goes in the version string
        version = bitnet_ref.__version__ + (f" (device fallback: {dev.reason})" if dev.fallback else "")
        self.receipt = Receipt(
            engine="bitnet_ref", version=version, model=str(path.resolve()),
            model_sha256=file_sha256(path), artifact=str(package),
            artifact_sha256=artifact_sha256(package, [kernels.library_path()] + (
                [device.library_path()] if dev.kind == "cuda" else [])),
            profile=self.model.profile.name, threads=threads, device=dev.name,
        )

    def info(self) -> EngineInfo:
        return EngineInfo(name="bitnet_ref", version=bitnet_ref.__version__, archs=tuple(ARCHITECTURES),
                          formats=FORMATS,
                          operations=("tokenize", "logits", "generate", "perplexity", "intermediates"))

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise EngineError(f"{self.receipt.model} has no usable tokenizer: pass token ids, or set "
                              "BITNET_TOKENIZER to a tokenizer.json")
        return self.tokenizer

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        with self.timed("tokenize"):
            return self._need_tokenizer().encode(text, add_bos=add_bos)

    def detokenize(self, ids: list[int]) -> str:
        return self._need_tokenizer().decode(ids)

    def logits(self, ids: list[int]) -> np.ndarray:
        with self.timed("logits"):
            return self._run(self._logits, ids)

    def _logits(self, ids: list[int]) -> np.ndarray:
        if not self.n_ubatch:
            return self.model.logits(ids)
        state = self.model.new_state()
        return np.concatenate([self.model.forward(ids[i : i + self.n_ubatch], state)
                               for i in range(0, len(ids), self.n_ubatch)])

    def generate(self, ids: list[int], n: int, sampling: Sampling = GREEDY) -> list[int]:
        params = SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed)
        with self.timed("generate"):
            return self._run(lambda i: generate(self.model, i, n, params, self.stop_ids), ids)

    def perplexity(self, ids: list[int], ctx: int, convention: str = "llama-perplexity") -> Perplexity:
        with self.timed("perplexity"):
            if convention == "llama-perplexity":
                s = self._run(lambda i: perplexity_llama(self.model, i, ctx, self.bos_id), ids)
            elif convention == "sliding":
                s = self._run(lambda i: perplexity_sliding(self.model, i, ctx), ids)
            else:
                raise EngineError(f"unknown perplexity convention {convention!r} (llama-perplexity, sliding)")
        return Perplexity(ppl=s.ppl, nll=s.nll, n_scored=s.n_scored, convention=s.convention, ctx=ctx,
                          per_chunk=s.per_chunk)

    def intermediates(self, ids: list[int], names: list[str], missing_ok: bool = False) -> dict[str, np.ndarray]:
        """Named tensors of one teacher-forced pass, under llama.cpp's node names (see State.taps), in the
        micro-batches logits() uses (each tensor's rows concatenated over them)."""
        state = self.model.new_state()
        ids = list(ids)
        step = self.n_ubatch or max(1, len(ids))
        taps: dict[str, list[np.ndarray]] = {}
        with self.timed("intermediates"):
            for s in range(0, len(ids), step):
                state.taps = {}
                self._run(lambda i: self.model.forward(i, state), ids[s : s + step])
                for name, value in state.taps.items():
                    taps.setdefault(name, []).append(value)
        missing = [n for n in names if n not in taps]
        if missing and not missing_ok:
            raise EngineError(f"bitnet_ref has no tensor named {missing[0]!r}; it exposes {', '.join(taps)}")
        return {n: np.concatenate(taps[n]) for n in names if n in taps}

    def _run(self, fn, ids):
        try:
            return fn(list(ids))
        except ModelError as e:
            raise EngineError(f"bitnet_ref: {e}") from e

    def close(self) -> None:
        self.model.close()
