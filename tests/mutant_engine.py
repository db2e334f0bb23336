"""A planted-bug or legitimate variant of bitnet_ref (tests/mutants.py) served over the JSON-lines protocol.

    python tests/mutant_engine.py VARIANT --model M.gguf --format i2_s|tq2_0 [--operations tokenize,logits,...]

`--operations` limits what the hello declares (and what the engine answers), e.g. `generate` for a
greedy-only engine. The variant's environment (e.g. BITNET_KERNELS=0) is set before anything loads.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variant")
    ap.add_argument("--model", required=True)
    ap.add_argument("--format", required=True, choices=("i2_s", "tq2_0"))
    ap.add_argument("--operations", default=None, help="comma-separated operations to declare")
    a = ap.parse_args(argv)
    import mutants

    os.environ.update(dict(mutants.VARIANTS[a.variant].env))
    from harness.engines.serve import serve

    ops = tuple(a.operations.split(",")) if a.operations else None
    return serve(lambda: mutants.open_variant(a.variant, a.model, a.format), ops)


if __name__ == "__main__":
    sys.exit(main())
