"""`bitnet-xval score`: perplexity of a text file under the Python engine (llama-perplexity convention by
default, so that the number compares with llama-perplexity's), plus bits per byte.

With --reference-impl R (bitnet_cpp, llama_cpp, jsonl:COMMAND, or cpp: the C++ reference the file is made for)
the reference scores the same tokens too: both perplexities, their relative difference against the limit
(AC5: 0.1 %, --max-rel-diff), and the paired per-token statistics of the independent mode (mean NLL difference
with a bootstrap 95 % interval, Wilcoxon signed-rank p). Exit 0 within the limit, 1 outside it, 2 when
something could not be computed."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from harness.engines.base import EngineError

from .common import add_model_args, load_engine

AC5 = 1e-3  # the relative perplexity difference a correct engine stays within


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="perplexity of a text file", description=__doc__)
    add_model_args(p)
    p.add_argument("--file", required=True, help="a UTF-8 text file")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--convention", choices=("llama-perplexity", "sliding"), default="llama-perplexity")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--reference-impl", metavar="R",
                   help="also score with this reference and compare: bitnet_cpp, llama_cpp, jsonl:COMMAND, or cpp")
    p.add_argument("--max-rel-diff", type=float, default=AC5, help="limit of |ppl - ppl_ref| / ppl_ref (default 1e-3)")
    p.set_defaults(func=run)


def _reference_name(name: str, model) -> str:
    """`cpp` is the C++ reference the file's format is made for."""
    if name != "cpp":
        return name
    from harness.cases import describe_model

    _, fmt = describe_model(model)
    return "bitnet_cpp_tl2" if fmt == "tl2" else "bitnet_cpp" if fmt in ("i2_s", "tl1") else "llama_cpp"


def compare(engine, ids: list[int], reference: str, ctx: int, limit: float) -> dict:
    """Both engines' per-token NLLs on the same tokens (llama-perplexity's convention) and their comparison."""
    import numpy as np

    from harness import stats
    from harness.engines.registry import open_engine

    model = engine.receipt.model
    reference = _reference_name(reference, model)
    with open_engine(reference, model) as ref:
        nll_ref = stats.chunk_nll(ref.logits, ids, ctx, ids[0])
        receipt = ref.receipt.to_json()
    nll_sut = stats.chunk_nll(engine.logits, ids, ctx, ids[0])
    ppl, ppl_ref = float(np.exp(nll_sut.mean())), float(np.exp(nll_ref.mean()))
    rel = abs(ppl - ppl_ref) / ppl_ref
    paired = stats.paired(nll_sut, nll_ref)
    return {"reference": reference, "ppl": ppl, "ppl_reference": ppl_ref, "ppl_rel_diff": rel, "limit": limit,
            "within_limit": rel <= limit, "paired": paired, "verdict": stats.verdict(paired),
            "reference_receipt": receipt}


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
    comparison = None
    try:
        t = time.perf_counter()
        ids = engine.tokenize(text)
        s = engine.perplexity(ids, args.ctx, args.convention)
        seconds = time.perf_counter() - t
        if args.reference_impl:
            if args.convention != "llama-perplexity":
                raise ValueError("--reference-impl compares in the llama-perplexity convention")
            comparison = compare(engine, ids, args.reference_impl, args.ctx, args.max_rel_diff)
    except (EngineError, ValueError) as e:
        print(f"score: {e}", file=sys.stderr)
        return 2
    finally:
        engine.close()
    bpb = s.nll * s.n_scored / 0.6931471805599453 / len(text.encode("utf-8"))
    doc = {"file": str(path), "tokens": len(ids), "ctx": args.ctx, "convention": s.convention, "ppl": s.ppl,
           "nll": s.nll, "n_scored": s.n_scored, "bits_per_byte_scored": bpb, "per_chunk": s.per_chunk,
           "seconds": seconds, "receipt": engine.receipt.to_json()}
    if comparison:
        doc["comparison"] = comparison
    if args.format == "json":
        print(json.dumps(doc, indent=2))
    else:
        for i, p in enumerate(s.per_chunk):
            print(f"[{i + 1}]{p:.4f},", end=" ")
        print(f"\nFinal estimate: PPL = {s.ppl:.4f} ({s.n_scored} tokens scored, {s.convention}, ctx {args.ctx}; "
              f"{bpb:.4f} bits per byte of the scored share)")
        if comparison:
            c = comparison
            print(f"{c['reference']}: PPL = {c['ppl_reference']:.4f}; relative difference {c['ppl_rel_diff']:.3g} "
                  f"({'within' if c['within_limit'] else 'OUTSIDE'} the limit {c['limit']:g})\n"
                  f"per-token NLL: {c['verdict']}")
    return 1 if comparison and not comparison["within_limit"] else 0
