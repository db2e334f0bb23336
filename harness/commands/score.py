"""`bitnet-xval score`: perplexity of a text file under the Python engine (llama-perplexity convention by
default, so that the number compares with llama-perplexity's), plus bits per byte."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from harness.engines.base import EngineError

from .common import add_model_args, load_engine


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="perplexity of a text file", description=__doc__)
    add_model_args(p)
    p.add_argument("--file", required=True, help="a UTF-8 text file")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--convention", choices=("llama-perplexity", "sliding"), default="llama-perplexity")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=run)


def run(args) -> int:
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        print(f"score: cannot read {path}: {e}", file=sys.stderr)
        return 2
    engine = load_engine(args)
    if engine is None:
        return 2
    try:
        t = time.perf_counter()
        ids = engine.tokenize(text)
        s = engine.perplexity(ids, args.ctx, args.convention)
        seconds = time.perf_counter() - t
    except (EngineError, ValueError) as e:
        print(f"score: {e}", file=sys.stderr)
        return 2
    finally:
        engine.close()
    bpb = s.nll * s.n_scored / 0.6931471805599453 / len(text.encode("utf-8"))
    doc = {"file": str(path), "tokens": len(ids), "ctx": args.ctx, "convention": s.convention, "ppl": s.ppl,
           "nll": s.nll, "n_scored": s.n_scored, "bits_per_byte_scored": bpb, "per_chunk": s.per_chunk,
           "seconds": seconds, "receipt": engine.receipt.to_json()}
    if args.format == "json":
        print(json.dumps(doc, indent=2))
    else:
        for i, p in enumerate(s.per_chunk):
            print(f"[{i + 1}]{p:.4f},", end=" ")
        print(f"\nFinal estimate: PPL = {s.ppl:.4f} ({s.n_scored} tokens scored, {s.convention}, ctx {args.ctx}; "
              f"{bpb:.4f} bits per byte of the scored share)")
    return 0
