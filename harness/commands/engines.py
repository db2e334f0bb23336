"""`bitnet-xval engines`: the engines found here, their versions, and what to set for a missing one."""

from __future__ import annotations

import json
from dataclasses import asdict


def add_parser(sub) -> None:
    p = sub.add_parser("engines", help="list the engines found and what each needs", description=__doc__)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=run)


def run(args) -> int:
    from harness.engines.registry import probe_all

    found = probe_all()
    if args.format == "json":
        print(json.dumps([asdict(s) for s in found], indent=2))
        return 0
    for s in found:
        mark = "found  " if s.available else "missing"
        print(f"{s.name:<16} {mark} {s.version:<40} {s.detail}")
    return 0
