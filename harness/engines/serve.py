"""Serve any registry engine over the JSON-lines protocol (harness/engines/jsonl.py), in its own process.

    python -m harness.engines.serve ENGINE --model M.gguf [--option KEY=VALUE ...]

Why: two builds of bitnet.cpp's fork share the soname libggml.so, so once one is loaded in a process
the dynamic linker hands it to the other (a TL2 build's libllama then misses its TL2 symbols). Running
the second one here, behind the protocol, keeps each build in a process of its own.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time

import numpy as np

from .base import EngineError, NotSupported, Sampling


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _handle(engine, req: dict) -> dict:
    op = req["op"]
    if op == "tokenize":
        return {"ids": engine.tokenize(req["text"], req.get("add_bos", True))}
    if op == "detokenize":
        return {"text": engine.detokenize(req["ids"])}
    if op == "logits":
        arr = np.ascontiguousarray(engine.logits(req["ids"]), dtype="<f4")
        if req.get("npy"):
            np.save(req["npy"], arr)
            return {"logits": {"npy": req["npy"], "shape": list(arr.shape)}}
        return {"logits": {"shape": list(arr.shape), "dtype": "<f4", "b64": base64.b64encode(arr.tobytes()).decode()}}
    if op == "generate":
        s = req.get("sampling") or {}
        return {"ids": engine.generate(req["ids"], req["n"], Sampling(s.get("temperature", 0.0), s.get("top_k", 0),
                                                                      s.get("top_p", 1.0), s.get("seed")))}
    if op == "perplexity":
        p = engine.perplexity(req["ids"], req["ctx"], req.get("convention", "llama-perplexity"))
        return {"ppl": p.ppl, "nll": p.nll, "n_scored": p.n_scored, "per_chunk": p.per_chunk,
                "convention": p.convention, "ctx": p.ctx}
    if op == "intermediates":
        tensors = engine.intermediates(req["ids"], req["names"], missing_ok=True)  # the harness asks for what it needs
        return {"tensors": {n: {"shape": list(a.shape), "dtype": "<f4",
                                "b64": base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode()}
                            for n, a in tensors.items()}}
    raise NotSupported(f"unknown op {op!r}")


def main(argv=None) -> int:
    from .registry import open_engine

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("engine")
    ap.add_argument("--model", required=True)
    ap.add_argument("--profile", default="exact")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args(argv)
    options = {k: _value(v) for k, _, v in (o.partition("=") for o in a.option)}
    return serve(lambda: open_engine(a.engine, a.model, a.profile, options, isolate=False))


def serve(open_fn, operations: tuple[str, ...] | None = None) -> int:
    """Answer protocol requests on stdin/stdout with the engine `open_fn()` opens at the hello.
    `operations`: what the hello declares (default: everything the engine's info() names)."""
    out = sys.stdout
    sys.stdout = sys.stderr  # only protocol lines on the real stdout
    engine = None
    for line in sys.stdin:
        req = json.loads(line)
        rid, op = req.get("id"), req.get("op")
        if op == "shutdown":
            out.write(json.dumps({"id": rid, "ok": True}) + "\n")
            out.flush()
            break
        t = time.perf_counter()
        try:
            if op == "hello":
                engine = open_fn()
                info, r = engine.info(), engine.receipt
                resp = {"protocol": 1, "name": r.engine, "version": r.version, "archs": list(info.archs),
                        "formats": list(info.formats),
                        "operations": list(info.operations if operations is None else operations),
                        "receipt": {"artifact": r.artifact, "artifact_sha256": r.artifact_sha256, "model": r.model,
                                    "device": r.device, "threads": r.threads, "profile": r.profile,
                                    "source": r.source}}
            elif operations is not None and op not in operations and op != "detokenize":
                raise NotSupported(f"this engine does not offer {op}")
            else:
                resp = _handle(engine, req)
            resp.update(ok=True, timings={"compute": time.perf_counter() - t})
        except NotSupported as e:
            resp = {"ok": False, "kind": "not_supported", "error": str(e)}
        except (EngineError, ValueError, KeyError, TypeError) as e:
            resp = {"ok": False, "kind": "error", "error": f"{type(e).__name__}: {e}"}
        resp["id"] = rid
        out.write(json.dumps(resp) + "\n")
        out.flush()
        if op == "hello" and not resp["ok"]:
            return 1
    if engine is not None:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
