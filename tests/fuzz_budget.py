"""How many examples each fuzz property runs.

Without BITNET_FUZZ_TOTAL every property runs the test profile's default (BITNET_FUZZ_EXAMPLES, else 60;
the engine-level property a handful: its examples each run the engine). `nox -s fuzz` sets
BITNET_FUZZ_TOTAL=100000 and each property gets its share of it below (a parametrized property's share is
split over its parameters). The README lists the same table with the measured rates."""

from __future__ import annotations

import os

SHARES = {  # property -> (fraction of the total, number of parametrizations sharing it)
    "gguf-header": (0.30, 1),
    "gguf-whole": (0.20, 1),
    "tokenizer-round-trip": (0.09, 3),
    "tokenizer-decode": (0.06, 3),
    "cases": (0.06, 1),
    "baselines-json": (0.05, 1),
    "baselines-text": (0.03, 1),
    "lock": (0.06, 1),
    "jsonl": (0.10, 1),
    "engine": (0.05, 1),
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
