"""An engine in any language, run as a subprocess that speaks JSON lines on stdin/stdout.

Protocol (version 1)
====================
Transport. The harness starts the engine from a command line, in its own process group, with stdin and
stdout as pipes and stderr captured to a file (kept for error context: its tail goes into every
error). Each message is one JSON object, UTF-8, on one line ending in "\\n". The engine's stdout
carries protocol lines only (log to stderr); any stdout line that is not a JSON object is a protocol
error: the harness kills the engine. One request is in flight at a time.

Requests: {"id": <int>, "op": <name>, ...arguments}. Ids increase from 0.
Responses: {"id": <same int>, "ok": true, ...results, "timings": {<name>: <seconds>, ...}?}
       or  {"id": <same int>, "ok": false, "error": "<message>", "kind": "not_supported" | "error"}
A response whose id differs from the request's is a protocol error. "timings" (optional) are the
engine's own measurements; the harness adds them to the receipt as "<op>.engine_<name>".

Operations:
- hello (always first, id 0): {"id": 0, "op": "hello", "protocol": 1}
    -> {"ok": true, "protocol": 1, "name": str, "version": str, "archs": [str], "formats": [str],
        "operations": [str, of tokenize detokenize logits generate perplexity intermediates],
        "receipt": {"artifact": path|null, "artifact_sha256": hex|null, "model": path|null,
                    "device": str?, "threads": int?, "profile": str?, "source": str?}}
    "artifact" is the library or binary that computes (e.g. libllama.so). Where that file exists here,
    the harness hashes it and refuses an engine whose claimed artifact_sha256 differs. Where "model"
    is given it must be the model file the harness named (same file after resolving paths).
- tokenize: {"text": str, "add_bos": bool} -> {"ids": [int]}
- detokenize: {"ids": [int]} -> {"text": str}
- logits: {"ids": [int], "npy": path?} -> {"logits": {"shape": [T, V], "dtype": "<f4", "b64": str}}
    The logits at every position, teacher-forced, as base64 of little-endian float32, row-major.
    When the request names "npy" (the harness does for large outputs) the engine may instead write a
    .npy file of float32 [T, V] there and answer {"logits": {"npy": path, "shape": [T, V]}}.
- generate: {"ids": [int], "n": int, "sampling": {"temperature": float, "top_k": int, "top_p": float,
    "seed": int|null}} -> {"ids": [int]}: the new tokens only (fewer than n if an end token comes);
    temperature 0 is greedy.
- perplexity: {"ids": [int], "ctx": int, "convention": "llama-perplexity"|"sliding"}
    -> {"ppl": float, "nll": float, "n_scored": int, "per_chunk": [float], "convention": str, "ctx": int}
- intermediates (optional): {"ids": [int], "names": [str]}
    -> {"tensors": {name: {"shape": [...], "dtype": "<f4", "b64": str}}}: named tensors of one teacher-forced
    pass over ids, float32 base64 as for logits, under llama.cpp's graph node names (attn_norm-N,
    attn_sub_norm-N, ffn_sub_norm-N, l_out-N, result_output, ...: one row per token; names the engine does not
    have are left out). With it a failing logits rung is
    localized to the first layer and operation that diverges, as for the in-process engines.
- shutdown: {"op": "shutdown"} -> {"ok": true}, then the engine exits. The harness also closes stdin
  (EOF means: exit) and kills the process group if it is still there after a grace period.

Capabilities. "operations" in the hello says what the engine can do; the check ladder judges only the
rungs those allow and records the others as not supported (harness/capabilities.py): an engine with
generate only gets a verdict from its greedy rung. The protocol version stays 1: every addition is
optional.

Faults. Each request has a timeout (the engine's default or per call); on timeout, on EOF from the
engine (it died), on a protocol error, or on an interruption, the harness kills the whole process group
and reaps it, raises EngineError (with the command line, the exit status and the stderr tail) and the
engine object is closed. An "ok": false response raises NotSupported (kind "not_supported") or
EngineError and leaves the engine usable.

Receipt: engine name and version from the handshake, the command line, the model sha256 computed by
the harness, the artifact path and sha256 (verified where the file is here), timings per operation.
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import shlex
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from .base import Engine, EngineError, EngineInfo, NotSupported, Perplexity, Receipt, Sampling, file_sha256

PROTOCOL = 1
TAIL_CHARS = 3000
NPY_THRESHOLD = 1 << 22  # floats: above this the harness asks for a .npy file (16 MiB of float32)
# The longest response line read (bytes): memory stays bounded whatever an engine writes. Base64 logits of
# 512 positions x 128256 tokens are ~350 MB; larger outputs go through the .npy path once the vocabulary is known.
MAX_LINE = 1 << 30
MAX_TOKEN_ID = (1 << 31) - 1
GREEDY = Sampling()


class JsonlEngine(Engine):
    def __init__(self, command: list[str], model: str | os.PathLike, *, timeout: float = 120.0,
                 hello_timeout: float | None = None, env: dict | None = None, cwd: str | os.PathLike | None = None,
                 npy_threshold: int = NPY_THRESHOLD, max_line: int = MAX_LINE):
        self.max_line = max_line
        self.command = [str(c) for c in command]
        self.model = Path(model)
        if not self.model.is_file():
            raise EngineError(f"model file {self.model} does not exist")
        self.timeout = timeout
        self.npy_threshold = npy_threshold
        self._next_id = 0
        self._buf = b""
        self._closed_why: str | None = None
        self.receipt = Receipt(engine="?", version="?", model=str(self.model.resolve()),
                               model_sha256=file_sha256(self.model), command=self.command)
        self._stderr = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._stderr, start_new_session=True, env=env, cwd=cwd)
        except OSError as e:
            self._stderr.close()
            raise EngineError(f"cannot start {shlex.join(self.command)}: {e}") from e
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            with self.timed("hello"):
                hello = self._request("hello", {"protocol": PROTOCOL}, hello_timeout or timeout)
            self._accept_hello(hello)
        except BaseException:
            self._kill("handshake failed")
            raise

    # -- handshake ------------------------------------------------------------------------------------
    def _accept_hello(self, h: dict) -> None:
        try:
            self._info = EngineInfo(name=str(h["name"]), version=str(h["version"]), archs=tuple(h.get("archs", ())),
                                    formats=tuple(h.get("formats", ())), operations=tuple(h.get("operations", ())))
        except (KeyError, TypeError) as e:
            raise self._fail(f"handshake lacks {e}: {h!r}") from None
        if h.get("protocol", PROTOCOL) != PROTOCOL:
            raise self._fail(f"engine speaks protocol {h.get('protocol')}, the harness {PROTOCOL}")
        r = h.get("receipt") or {}
        if not isinstance(r, dict) or not all(isinstance(r.get(k), (str, type(None)))
                                              for k in ("model", "artifact", "artifact_sha256")):
            raise self._fail(f"handshake's receipt must be an object with string paths: {str(r)[:300]}")
        self.receipt.engine, self.receipt.version = self._info.name, self._info.version
        claimed_model = r.get("model")
        if claimed_model and Path(claimed_model).resolve() != self.model.resolve():
            raise self._fail(f"engine loaded {claimed_model}, not the model named {self.model}")
        artifact, claimed_sha = r.get("artifact"), r.get("artifact_sha256")
        if artifact:
            self.receipt.artifact = str(artifact)
            if Path(artifact).is_file():
                actual = file_sha256(artifact)
                if claimed_sha and claimed_sha != actual:
                    raise self._fail(f"engine claims {artifact} has sha256 {claimed_sha}, it has {actual}")
                self.receipt.artifact_sha256 = actual
            else:
                self.receipt.artifact_sha256 = claimed_sha
        for key in ("device", "threads", "profile", "source"):
            if r.get(key) is not None:
                setattr(self.receipt, key, r[key])

    # -- transport ------------------------------------------------------------------------------------
    def stderr_tail(self, n: int = TAIL_CHARS) -> str:
        try:
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - n))
            return self._stderr.read().decode("utf-8", "replace")
        except (ValueError, OSError):
            return ""

    def _context(self) -> str:
        status = self.proc.poll()
        if status is None:
            how = "running"
        elif status < 0:
            try:
                how = f"killed by signal {signal.Signals(-status).name}"
            except ValueError:
                how = f"killed by signal {-status}"
        else:
            how = f"exit status {status}"
        return f"engine: {shlex.join(self.command)} ({how})\n--- stderr tail ---\n{self.stderr_tail()}"

    def _fail(self, why: str) -> EngineError:
        """Kill the engine and make the error that says why."""
        self._kill(why)
        return EngineError(f"{why}\n{self._context()}")

    def _kill(self, why: str) -> None:
        if self._closed_why is None:
            self._closed_why = why
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._release()

    def _release(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f:
                    f.close()
            except OSError:
                pass
        try:
            self._sel.close()
        except (OSError, ValueError):
            pass

    def _readline(self, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if not self._sel.select(left):
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise EOFError
            self._buf += chunk
            if len(self._buf) > self.max_line and b"\n" not in self._buf:
                raise OverflowError
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def _request(self, op: str, args: dict, timeout: float | None = None) -> dict:
        if self._closed_why is not None:
            raise EngineError(f"engine is closed ({self._closed_why}): {shlex.join(self.command)}")
        rid = self._next_id
        self._next_id += 1
        timeout = self.timeout if timeout is None else timeout
        msg = json.dumps({"id": rid, "op": op, **args}, separators=(",", ":")).encode() + b"\n"
        try:
            try:
                self.proc.stdin.write(msg)
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self.proc.wait(timeout=2)
                raise self._fail(f"engine exited before request {rid} ({op}) could be sent") from None
            try:
                line = self._readline(time.monotonic() + timeout)
            except TimeoutError:
                raise self._fail(f"request {rid} ({op}) timed out after {timeout:g} s; process group "
                                 f"{self.proc.pid} killed") from None
            except OverflowError:
                raise self._fail(f"engine's response to request {rid} ({op}) exceeds {self.max_line} bytes "
                                 f"without a newline") from None
            except EOFError:
                try:
                    self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
                raise self._fail(f"engine closed its stdout during request {rid} ({op})") from None
        except EngineError:
            raise
        except BaseException:
            self._kill(f"interrupted during request {rid} ({op})")
            raise
        try:
            resp = json.loads(line)
            if not isinstance(resp, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):
            shown = line[:500].decode("utf-8", "replace")
            raise self._fail(f"engine answered request {rid} ({op}) with a line that is not a JSON object: "
                             f"{shown!r}") from None
        if type(resp.get("id")) is not int or resp.get("id") != rid:
            raise self._fail(f"engine answered request {rid} ({op}) with id {resp.get('id')!r}")
        timings = resp.get("timings") or {}
        if not isinstance(timings, dict) or not all(
                type(v) in (int, float) and np.isfinite(v) for v in timings.values()):
            raise self._fail(f"engine's {op} response has timings that are not an object of finite numbers: "
                             f"{str(timings)[:300]}")
        for name, seconds in timings.items():
            key = f"{op}.engine_{name}"
            self.receipt.timings[key] = self.receipt.timings.get(key, 0.0) + float(seconds)
        if resp.get("ok") is not True:
            error = str(resp.get("error", "(no error message)"))
            cls = NotSupported if resp.get("kind") == "not_supported" else EngineError
            raise cls(f"{self._info.name if hasattr(self, '_info') else 'engine'} {op} failed: {error}\n"
                      f"engine: {shlex.join(self.command)}\n--- stderr tail ---\n{self.stderr_tail()}")
        return resp

    def _field(self, resp: dict, key: str, op: str):
        if key not in resp:
            raise self._fail(f"engine's {op} response lacks {key!r}: {str(resp)[:300]}")
        return resp[key]

    def _ids(self, resp: dict, op: str) -> list[int]:
        ids = self._field(resp, "ids", op)
        if not isinstance(ids, list) or not all(type(i) is int and 0 <= i <= MAX_TOKEN_ID for i in ids):
            raise self._fail(f"engine's {op} response: 'ids' must be a list of non-negative integer token ids, "
                             f"got {str(ids)[:300]}")
        return ids

    # -- Engine ---------------------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        return self._info

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        with self.timed("tokenize"):
            r = self._request("tokenize", {"text": text, "add_bos": add_bos})
        return self._ids(r, "tokenize")

    def detokenize(self, ids: list[int]) -> str:
        with self.timed("detokenize"):
            r = self._request("detokenize", {"ids": [int(i) for i in ids]})
        text = self._field(r, "text", "detokenize")
        if not isinstance(text, str):
            raise self._fail(f"engine's detokenize response: 'text' must be a string, got {str(text)[:300]}")
        return text

    def logits(self, ids: list[int], vocab_hint: int | None = None) -> np.ndarray:
        ids = [int(i) for i in ids]
        vocab = vocab_hint or getattr(self, "_vocab", None)
        big = vocab is not None and len(ids) * vocab > self.npy_threshold
        with tempfile.TemporaryDirectory(prefix="jsonl-logits-") as d, self.timed("logits"):
            args: dict = {"ids": ids}
            if big:
                args["npy"] = str(Path(d) / "logits.npy")
            r = self._request("logits", args)
            spec = self._field(r, "logits", "logits")
            try:
                if not isinstance(spec, dict):
                    raise TypeError(f"'logits' must be an object, got {str(spec)[:100]}")
                shape = spec.get("shape")
                if (not isinstance(shape, list) or len(shape) != 2
                        or not all(type(x) is int and x >= 0 for x in shape)):
                    raise ValueError(f"shape must be [T, V] of non-negative integers, got {str(shape)[:100]}")
                if "npy" in spec:
                    if not isinstance(spec["npy"], str):
                        raise TypeError(f"npy must be a path, got {str(spec['npy'])[:100]}")
                    arr = np.load(spec["npy"], allow_pickle=False).astype(np.float32, copy=False)
                else:
                    if spec.get("dtype", "<f4") != "<f4":
                        raise ValueError(f"dtype {str(spec['dtype'])[:100]!r}, expected '<f4'")
                    if not isinstance(spec.get("b64"), str):
                        raise TypeError("b64 must be a string")
                    arr = np.frombuffer(base64.b64decode(spec["b64"], validate=True), dtype="<f4")
                    arr = arr.reshape(shape).astype(np.float32)
                if list(arr.shape) != shape:
                    raise ValueError(f"the array has shape {list(arr.shape)}, the response says {shape}")
            except (ValueError, KeyError, TypeError, OSError, EOFError) as e:
                raise EngineError(f"engine's logits are unreadable ({e}); engine: {shlex.join(self.command)}") from e
        if arr.ndim != 2 or arr.shape[0] != len(ids):
            raise EngineError(f"engine returned logits of shape {arr.shape} for {len(ids)} tokens")
        self._vocab = arr.shape[1]
        return arr

    def generate(self, ids: list[int], n: int, sampling: Sampling = GREEDY) -> list[int]:
        s = {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
             "seed": sampling.seed}
        with self.timed("generate"):
            r = self._request("generate", {"ids": [int(i) for i in ids], "n": int(n), "sampling": s})
        return self._ids(r, "generate")

    def perplexity(self, ids: list[int], ctx: int, convention: str = "llama-perplexity") -> Perplexity:
        with self.timed("perplexity"):
            r = self._request("perplexity", {"ids": [int(i) for i in ids], "ctx": int(ctx), "convention": convention})
        try:
            nums = [r["ppl"], r["nll"], *r.get("per_chunk", [])]
            if not all(type(x) in (int, float) for x in nums) or not all(
                    type(r.get(k, 0)) is int for k in ("n_scored", "ctx")):
                raise TypeError("ppl, nll and per_chunk must be numbers, n_scored and ctx integers")
            return Perplexity(ppl=float(r["ppl"]), nll=float(r["nll"]), n_scored=int(r["n_scored"]),
                              convention=str(r.get("convention", convention)), ctx=int(r.get("ctx", ctx)),
                              per_chunk=[float(x) for x in r.get("per_chunk", [])])
        except (KeyError, TypeError, ValueError) as e:
            raise self._fail(f"engine's perplexity response is malformed ({e}): {str(r)[:300]}") from None

    def intermediates(self, ids: list[int], names: list[str], missing_ok: bool = False) -> dict[str, np.ndarray]:
        if "intermediates" not in self._info.operations:
            raise NotSupported(f"{self._info.name} does not declare intermediates")
        with self.timed("intermediates"):
            r = self._request("intermediates", {"ids": [int(i) for i in ids], "names": [str(n) for n in names]})
        tensors = self._field(r, "tensors", "intermediates")
        out = {}
        for name in names:
            spec = tensors.get(name) if isinstance(tensors, dict) else None
            if spec is None and missing_ok:
                continue
            if not isinstance(spec, dict):
                raise EngineError(f"engine's intermediates response lacks tensor {name!r}; engine: "
                                  f"{shlex.join(self.command)}")
            try:
                if spec.get("dtype", "<f4") != "<f4":
                    raise ValueError(f"dtype {spec['dtype']!r}, expected '<f4'")
                arr = np.frombuffer(base64.b64decode(spec["b64"], validate=True), dtype="<f4")
                out[name] = arr.reshape([int(x) for x in spec["shape"]]).astype(np.float32)
            except (ValueError, KeyError, TypeError) as e:
                raise EngineError(f"engine's tensor {name!r} is unreadable ({e}); engine: "
                                  f"{shlex.join(self.command)}") from e
        return out

    def close(self, grace: float = 2.0) -> None:
        """Ask the engine to shut down, close its stdin, then kill its group if it lingers."""
        if self._closed_why is None:
            self._closed_why = "closed"
            try:
                rid = self._next_id
                self.proc.stdin.write(json.dumps({"id": rid, "op": "shutdown"}).encode() + b"\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
            except (OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # whatever it left in its group
            except (ProcessLookupError, PermissionError):
                pass
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self._release()
        try:
            self._stderr.close()
        except OSError:
            pass

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __del__(self):
        try:
            if getattr(self, "_closed_why", "x") is None:
                self._kill("garbage-collected")
        except Exception:
            pass
