"""`bitnet-xval run`: generate with the Python engine (bitnet_ref), optionally with a metrics breakdown."""

from __future__ import annotations

import json
import resource
import sys
import time

from bitnet_ref.errors import ModelError

from .common import add_model_args, load_engine


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="generate text with the Python engine", description=__doc__)
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("-n", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--temp", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="default: BITNET_SEED, else 0")
    p.add_argument("--truncate", action="store_true",
                   help="keep the end of a prompt longer than the context instead of failing")
    p.add_argument("--metrics", action="store_true", help="tokenize/prefill/decode times, tokens/s, peak RSS")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=run)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args) -> int:
    from bitnet_ref.generate import SamplingParams, stream

    engine = load_engine(args)
    if engine is None:
        return 2
    try:
        t0 = time.perf_counter()
        ids = engine.tokenize(args.prompt)
        t_tok = time.perf_counter() - t0
        room = engine.model.cfg.context - args.n
        if len(ids) > room:
            if not args.truncate:
                print(f"run: the prompt has {len(ids)} tokens; with -n {args.n} the context "
                      f"({engine.model.cfg.context}) holds {room}: shorten it or pass --truncate", file=sys.stderr)
                return 2
            ids = ids[-room:]
        params = SamplingParams(args.temp, args.top_k, args.top_p, args.seed)
        out, times = [], []
        t = time.perf_counter()
        for tok in stream(engine.model, ids, args.n, params, engine.stop_ids):
            now = time.perf_counter()
            times.append(now - t)
            t = now
            out.append(tok)
    except (ModelError, ValueError) as e:
        print(f"run: {e}", file=sys.stderr)
        return 2
    finally:
        engine.close()
    text = engine.detokenize(out)
    prefill = times[0] if times else 0.0
    decode = sum(times[1:])
    metrics = {
        "prompt_tokens": len(ids), "generated_tokens": len(out),
        "tokenize_s": t_tok, "prefill_s": prefill, "decode_s": decode,
        "prefill_tok_per_s": len(ids) / prefill if prefill else None,
        "decode_tok_per_s": (len(out) - 1) / decode if decode else None,
        "peak_rss_mb": peak_rss_mb(),
    }
    if args.format == "json":
        doc = {"prompt": args.prompt, "prompt_ids": ids, "ids": out, "text": text,
               "receipt": engine.receipt.to_json()}
        if args.metrics:
            doc["metrics"] = metrics
        print(json.dumps(doc, indent=2))
    else:
        print(args.prompt + text)
        if args.metrics:
            for k, v in metrics.items():
                print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}", file=sys.stderr)
    return 0
