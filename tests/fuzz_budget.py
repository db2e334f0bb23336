"""How many examples each fuzz property runs.

Without BITNET_FUZZ_TOTAL every property runs the test profile's default (BITNET_FUZZ_EXAMPLES, else 60;
the engine-level property a handful: its examples each run the engine). `nox -s fuzz` sets
BITNET_FUZZ_TOTAL=100000 and each property gets its share of it below (a parametrized property's share is
split over its parameters). The README lists the same table with the measured rates."""

from __future__ import annotations

import os

SHARES = {  # property -> (fraction of the total, number of parametrizations sharing it)
    "gguf-header": (0.30, 1),  # ~12 ms an example on 2 shared cores
    "gguf-whole": (0.20, 1),  # ~15 ms
    "tokenizer-round-trip": (0.12, 3),  # bpe-tiny, spm-tiny ~1.5 ms; llama3 ~14 ms
    "tokenizer-decode": (0.06, 3),  # ~1.5 ms
    "cases": (0.07, 1),  # ~5 ms
    "baselines-json": (0.06, 1),  # ~4 ms
    "baselines-text": (0.04, 1),  # ~4 ms
    "lock": (0.06, 1),  # ~4 ms
    "jsonl": (0.05, 1),  # ~56 ms: a round trip through a subprocess, restarted after each protocol error
    "engine": (0.04, 1),  # ~76 ms: load + logits + 3 greedy tokens in a worker (plus the files that do not validate)
}
assert abs(sum(f for f, _ in SHARES.values()) - 1.0) < 1e-9
DEFAULT_ENGINE = 6  # the engine-level property in the default run: a handful


def examples(name: str) -> int:
    total = os.environ.get("BITNET_FUZZ_TOTAL")
    if total:
        frac, parts = SHARES[name]
        return max(1, round(int(total) * frac / parts))
    default = int(os.environ.get("BITNET_FUZZ_EXAMPLES", "60"))
    return min(default, DEFAULT_ENGINE) if name == "engine" else default
