"""`bitnet-xval compat-check MODEL`: what a GGUF file holds and whether the references can run it.

Exit codes: 0 compatible (warnings allowed), 1 findings of severity error, 2 the file cannot be read.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

from bitnet_ref.config import ModelConfig
from bitnet_ref.errors import ERROR, ModelError
from bitnet_ref.gguf import open_gguf
from bitnet_ref.gguf.validate import validate

SCHEMA_VERSION = 1


def add_parser(sub) -> None:
    p = sub.add_parser("compat-check", help="describe a GGUF model and list what is wrong with it",
                       description=__doc__)
    p.add_argument("model", nargs="?", help="the .gguf file (default: $BITNET_GGUF)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=run)


def report(path) -> dict:
    """The compat-check report as a JSON-ready dict. Raises ModelError when the file cannot be parsed."""
    with open_gguf(path) as gf:
        findings = validate(gf)
        meta = {k: mv.value for k, mv in gf.metadata.items()}
        try:
            cfg = ModelConfig.from_metadata(meta, gf.path)
        except ModelError:
            cfg = None
        tensors = [
            {"name": t.name, "type": t.type_name, "type_id": t.type_id, "shape": list(t.shape),
             "nbytes": t.nbytes, "offset": t.data_start}
            for t in gf.tensors
        ]
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        tokenizer = {
            "model": meta.get("tokenizer.ggml.model"),
            "pre": meta.get("tokenizer.ggml.pre"),
            "tokens": len(tokens) if isinstance(tokens, list) else None,
            "merges": len(merges) if isinstance(merges, list) else None,
            "bos_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_id": meta.get("tokenizer.ggml.eos_token_id"),
            "eot_id": meta.get("tokenizer.ggml.eot_token_id"),
            "add_bos": meta.get("tokenizer.ggml.add_bos_token"),
        }
        n_errors = sum(f.severity == ERROR for f in findings)
        return {
            "schema_version": SCHEMA_VERSION,
            "path": gf.path,
            "file_size": gf.file_size,
            "gguf_version": gf.version,
            "alignment": gf.alignment,
            "architecture": gf.architecture,
            "hyperparameters": None if cfg is None else {
                "hidden": cfg.hidden, "ffn": cfg.ffn, "layers": cfg.layers, "heads": cfg.heads,
                "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "vocab": cfg.vocab,
                "context": cfg.context, "rms_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
                "activation": cfg.activation,
            },
            "parameters": sum(_n(t["shape"]) for t in tensors),
            "tensor_types": dict(Counter(t["type"] for t in tensors)),
            "tensors": tensors,
            "tokenizer": tokenizer,
            "findings": [f.to_json() for f in findings],
            "compatible": n_errors == 0,
        }


def _n(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _text(r: dict) -> str:
    lines = [f"{r['path']}: GGUF v{r['gguf_version']}, {r['file_size']:,} bytes, alignment {r['alignment']}",
             f"architecture: {r['architecture']}"]
    hp = r["hyperparameters"]
    if hp:
        lines.append("hyper-parameters: " + ", ".join(f"{k} {v}" for k, v in hp.items()))
    lines.append(f"parameters: {r['parameters']:,}")
    lines.append("tensor types: " + ", ".join(f"{k} x{v}" for k, v in sorted(r["tensor_types"].items())))
    tok = r["tokenizer"]
    lines.append("tokenizer: " + ", ".join(f"{k} {v}" for k, v in tok.items() if v is not None))
    lines.append("tensors:")
    for t in r["tensors"]:
        size = "?" if t["nbytes"] is None else f"{t['nbytes']:,}"
        lines.append(f"  {t['name']:<32} {t['type']:<8} {tuple(t['shape'])!s:<16} {size} bytes")
    if r["findings"]:
        lines.append("findings:")
        for f in r["findings"]:
            where = ", ".join(f"{k} {f[k]}" for k in ("offset", "tensor", "key") if k in f)
            lines.append(f"  [{f['code']}] {f['severity']}: {f['message']}" + (f" ({where})" if where else ""))
            lines.append(f"      hint: {f['hint']}")
    lines.append("compatible: yes" if r["compatible"] else "compatible: NO")
    return "\n".join(lines)


def run(args) -> int:
    from bitnet_ref.hub import default_model

    try:
        path = default_model(args.model)
        r = report(path)
    except ModelError as e:
        if args.format == "json":
            print(json.dumps({"schema_version": SCHEMA_VERSION, "path": args.model, "readable": False,
                              "findings": [e.finding.to_json()], "compatible": False}, indent=2))
        else:
            print(f"cannot read the model: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=2) if args.format == "json" else _text(r))
    return 0 if r["compatible"] else 1
