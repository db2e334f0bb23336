"""An example engine speaking the JSON-lines protocol of harness/engines/jsonl.py.

    python tests/jsonl_example_engine.py --model M.gguf [--backend llama|toy] [--fault MODE] [--fault-op OP]
                                         [--operations OP,OP,...]

Backends: "llama" wraps mainline llama.cpp through llama-cpp-python (Llama(..., logits_all=True));
"toy" is a deterministic byte-level stand-in with no dependency (vocab 257: bytes, BOS = 256) so the
protocol and fault tests run everywhere. Faults, on the first request of --fault-op (default: the first
request after hello): crash (message on stderr, exit 3 mid-request), hang (sleep), garbage (a
non-JSON line), error (an "ok": false response; the engine stays usable), wrongid, segv.
`--operations` limits what the hello declares and what the engine answers (e.g. `generate` for a
greedy-only engine: the harness then judges its greedy rung only). The toy backend also answers the
optional `intermediates` op (named per-token tensors, encoded like logits).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
import time

import numpy as np

N_CTX = 256
THREADS = 2


class Toy:
    name, version, vocab, bos = "toy-bytes", "1.0", 257, 256

    def __init__(self, model):
        self.model = model
        self.artifact = os.path.abspath(__file__)

    def tokenize(self, text, add_bos):
        return ([self.bos] if add_bos else []) + list(text.encode())

    def detokenize(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")

    def logits(self, ids):
        pos = np.arange(len(ids), dtype=np.float32)[:, None]
        v = np.arange(self.vocab, dtype=np.float32)[None, :]
        return np.sin(0.37 * np.asarray(ids, np.float32)[:, None] + 0.011 * v * (pos + 1)).astype(np.float32)

    def next_token(self, ids):
        return int(np.argmax(self.logits(ids)[-1]))

    def intermediates(self, ids, names):
        """One row per token for every requested name: a deterministic function of the ids and the name."""
        x = np.asarray(ids, np.float32)[:, None]
        return {n: np.cos(x * (1 + len(n)) + np.arange(8, dtype=np.float32)).astype(np.float32) for n in names}

    def close(self):
        pass


class Llama:
    name = "llama-cpp-python"

    def __init__(self, model):
        import llama_cpp

        self.version = f"llama-cpp-python {llama_cpp.__version__}"
        self.model = model
        self.artifact = None
        for cand in ("libllama.so", "lib/libllama.so"):
            p = os.path.join(os.path.dirname(llama_cpp.__file__), cand)
            if os.path.isfile(p):
                self.artifact = p
                break
        self.llm = llama_cpp.Llama(model_path=model, logits_all=True, n_ctx=N_CTX, n_threads=THREADS,
                                   verbose=False, flash_attn=False, type_k=0, type_v=0)
        self.vocab = self.llm.n_vocab()
        self.bos = self.llm.token_bos()

    def tokenize(self, text, add_bos):
        return list(self.llm.tokenize(text.encode(), add_bos=add_bos))

    def detokenize(self, ids):
        return self.llm.detokenize(ids).decode("utf-8", "replace")

    def logits(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return np.asarray(self.llm.scores[: len(ids)], dtype=np.float32).copy()

    def next_token(self, ids):
        return int(np.argmax(self.logits(ids)[-1]))

    def close(self):
        self.llm.close()


def perplexity(backend, ids, ctx):
    """llama-perplexity's convention: chunks of ctx tokens, BOS replaces each chunk's first token, the
    second half of each chunk scored."""
    n_chunks = len(ids) // ctx
    if n_chunks < 1:
        raise ValueError(f"need at least {ctx} tokens, got {len(ids)}")
    nll, count, per_chunk = 0.0, 0, []
    for c in range(n_chunks):
        toks = list(ids[c * ctx:(c + 1) * ctx])
        toks[0] = backend.bos
        lg = backend.logits(toks).astype(np.float64)
        logp = lg - np.logaddexp.reduce(lg, axis=1, keepdims=True)
        for j in range(ctx // 2, ctx - 1):
            nll -= logp[j, toks[j + 1]]
            count += 1
        per_chunk.append(float(np.exp(nll / count)))
    return {"ppl": float(np.exp(nll / count)), "nll": nll / count, "n_scored": count, "per_chunk": per_chunk,
            "convention": "llama-perplexity", "ctx": ctx}


def handle(backend, req, npy_ok=True):
    op = req["op"]
    t = time.perf_counter()
    if op == "tokenize":
        out = {"ids": backend.tokenize(req["text"], req.get("add_bos", True))}
    elif op == "detokenize":
        out = {"text": backend.detokenize(req["ids"])}
    elif op == "logits":
        arr = np.ascontiguousarray(backend.logits(req["ids"]), dtype="<f4")
        if req.get("npy") and npy_ok:
            np.save(req["npy"], arr)
            out = {"logits": {"npy": req["npy"], "shape": list(arr.shape)}}
        else:
            b64 = base64.b64encode(arr.tobytes()).decode()
            out = {"logits": {"shape": list(arr.shape), "dtype": "<f4", "b64": b64}}
    elif op == "generate":
        if req.get("sampling", {}).get("temperature", 0) > 0:
            return {"ok": False, "kind": "not_supported", "error": "only greedy generation"}
        ids, new = list(req["ids"]), []
        for _ in range(req["n"]):
            nxt = backend.next_token(ids)
            new.append(nxt)
            ids.append(nxt)
        out = {"ids": new}
    elif op == "perplexity":
        if req.get("convention", "llama-perplexity") != "llama-perplexity":
            return {"ok": False, "kind": "not_supported", "error": f"convention {req['convention']}"}
        out = perplexity(backend, req["ids"], req["ctx"])
    elif op == "intermediates" and hasattr(backend, "intermediates"):
        tensors = backend.intermediates(req["ids"], req["names"])
        out = {"tensors": {n: {"shape": list(a.shape), "dtype": "<f4",
                               "b64": base64.b64encode(np.ascontiguousarray(a, "<f4").tobytes()).decode()}
                           for n, a in tensors.items()}}
    else:
        return {"ok": False, "kind": "not_supported", "error": f"unknown op {op!r}"}
    out["ok"] = True
    out["timings"] = {"compute": time.perf_counter() - t}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--backend", choices=("llama", "toy"), default="llama")
    ap.add_argument("--fault", choices=("crash", "hang", "garbage", "error", "wrongid", "segv"))
    ap.add_argument("--fault-op")
    ap.add_argument("--pid-file")
    ap.add_argument("--operations", default=None, help="comma-separated operations to declare and answer")
    a = ap.parse_args()
    if a.pid_file:
        with open(a.pid_file, "w") as f:
            f.write(str(os.getpid()))
    out = sys.stdout
    backend = None
    faulted = False
    ops: list[str] = []
    for line in sys.stdin:
        req = json.loads(line)
        rid, op = req.get("id"), req.get("op")
        if op == "shutdown":
            out.write(json.dumps({"id": rid, "ok": True}) + "\n")
            out.flush()
            break
        if op == "hello":
            try:
                backend = (Toy if a.backend == "toy" else Llama)(a.model)
            except Exception as e:  # a model it cannot load: say so, in the protocol
                print(f"cannot load {a.model}: {e}", file=sys.stderr)
                out.write(json.dumps({"id": rid, "ok": False, "error": f"cannot load {a.model}: {e}"}) + "\n")
                out.flush()
                return 1
            ops = ["tokenize", "detokenize", "logits", "generate", "perplexity"]
            ops += ["intermediates"] if hasattr(backend, "intermediates") else []
            ops = a.operations.split(",") if a.operations else ops
            resp = {"ok": True, "protocol": 1, "name": backend.name, "version": backend.version,
                    "archs": ["bitnet", "llama"], "formats": ["f32", "f16", "tq1_0", "tq2_0"],
                    "operations": ops,
                    "receipt": {"artifact": backend.artifact, "model": os.path.abspath(a.model), "device": "cpu",
                                "threads": THREADS}}
        elif a.fault and not faulted and (a.fault_op in (None, op)):
            faulted = True
            print(f"example engine: fault {a.fault} on {op}", file=sys.stderr, flush=True)
            if a.fault == "crash":
                os._exit(3)
            if a.fault == "segv":
                os.kill(os.getpid(), signal.SIGSEGV)
            if a.fault == "hang":
                time.sleep(600)
            if a.fault == "garbage":
                out.write("this is not json {\n")
                out.flush()
                continue
            if a.fault == "wrongid":
                rid = rid + 1000
            if a.fault == "error":
                out.write(json.dumps({"id": rid, "ok": False, "error": "injected failure"}) + "\n")
                out.flush()
                continue
            resp = handle(backend, req)
        elif op not in ops:
            resp = {"ok": False, "kind": "not_supported", "error": f"this engine does not offer {op}"}
        else:
            try:
                resp = handle(backend, req)
            except Exception as e:
                resp = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        resp["id"] = rid
        out.write(json.dumps(resp) + "\n")
        out.flush()
    if backend is not None:
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
