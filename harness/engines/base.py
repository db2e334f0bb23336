"""The Engine protocol every system under test and reference implements, and the receipt each run
leaves behind.

A receipt proves that an engine really ran: which engine (name, version or commit), which library or
binary (path and sha256), which model (path and sha256), with which numerics profile, threads, device,
command line, and how long each step took. A comparison whose reference has no receipt is an error.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


class EngineError(Exception):
    """An engine failed: it could not load, crashed, timed out, or answered nonsense. The message
    carries the context (command, the tail of stderr, the reference's own message)."""


class ReferenceUnavailable(EngineError):
    """The engine is not present or not configured here; the message names what to install or set.
    A comparison against it is a skip with that reason, never a pass."""


class NotSupported(EngineError):
    """The engine does not offer this operation (e.g. intermediates from a CLI tool)."""


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, cached per (path, size, mtime) so a 1 GB model is hashed once per process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


@dataclass
class Receipt:
    engine: str
    version: str
    model: str
    model_sha256: str
    artifact: str | None = None  # the library or binary that computed
    artifact_sha256: str | None = None
    profile: str | None = None  # numerics profile, where the engine has one
    threads: int | None = None
    device: str = "cpu"
    command: list[str] | None = None  # the last command line, for subprocess engines
    source: str | None = None  # a reference's upstream source commit, where its build says (drift check)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per operation, summed over calls
    host: str = field(default_factory=platform.node)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EngineInfo:
    name: str
    version: str
    archs: tuple[str, ...]
    formats: tuple[str, ...]
    operations: tuple[str, ...]  # of: tokenize logits generate perplexity intermediates


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


GREEDY = Sampling()


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood (nats) over the scored tokens
    n_scored: int
    convention: str  # "llama-perplexity" or "sliding"
    ctx: int
    per_chunk: list[float] = field(default_factory=list)


class Engine(ABC):
    """One engine on one model. Subclasses set `self.receipt` when they load and keep its timings."""

    receipt: Receipt

    @abstractmethod
    def info(self) -> EngineInfo: ...

    @abstractmethod
    def tokenize(self, text: str, add_bos: bool = True) -> list[int]: ...

    @abstractmethod
    def detokenize(self, ids: list[int]) -> str: ...

    @abstractmethod
    def logits(self, ids: list[int]) -> np.ndarray:
        """float32 [T, vocab]: the logits at every position, teacher-forced."""

    @abstractmethod
    def generate(self, ids: list[int], n: int, sampling: Sampling = GREEDY) -> list[int]:
        """The n tokens that follow `ids` (fewer if an end token comes)."""

    def perplexity(self, ids: list[int], ctx: int, convention: str = "llama-perplexity") -> Perplexity:
        raise NotSupported(f"{self.info().name} does not compute perplexity")

    def intermediates(self, ids: list[int], names: list[str], missing_ok: bool = False) -> dict[str, np.ndarray]:
        """Named tensors (llama.cpp's graph node names) of one teacher-forced pass over ids, evaluated as
        logits(ids) evaluates them (the same micro-batches). missing_ok: leave out names the engine does not
        have, instead of raising."""
        raise NotSupported(f"{self.info().name} does not expose intermediate tensors")

    def close(self) -> None:
        """Release the model and any child process (engines that hold nothing inherit this)."""
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def timed(self, operation: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.receipt.timings[operation] = self.receipt.timings.get(operation, 0.0) + time.perf_counter() - t


def require_receipt(engine_name: str, receipt: Receipt | None) -> Receipt:
    """A comparison may use an engine's output only with its receipt: anything else is an error."""
    if receipt is None or not receipt.model_sha256 or not receipt.engine:
        raise EngineError(f"{engine_name} produced no receipt: its output cannot be trusted as having run")
    return receipt
