"""Metrics benchmark: compare two [512, 128256] float32 logit matrices (Llama 3 vocabulary size) with
harness.metrics.compare_logits, targets included. Prints seconds (best of --repeat) per configuration.

    python -m benchmarks.bench_metrics [--positions 512] [--vocab 128256] [--repeat 3] [--threads 2]

Not a test. Target: under 2 s on two cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from harness.metrics import compare_greedy, compare_logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--positions", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    T, V = args.positions, args.vocab
    b = (rng.standard_normal((T, V), dtype=np.float32) * 3.0).astype(np.float32)
    a = b + rng.standard_normal((T, V), dtype=np.float32) * np.float32(1e-5)
    targets = rng.integers(0, V, T)
    best = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        res = compare_logits(a, b, targets, k=5, threads=args.threads)
        best = min(best, time.perf_counter() - t0)
    print(f"compare_logits [{T}, {V}] threads={args.threads}: {best:.3f} s "
          f"(best of {args.repeat}; max_abs {res['max_abs']:.3g}, kl_mean {res['kl_mean']:.3g})")
    t0 = time.perf_counter()
    compare_greedy(targets[:128], targets[:128], a, b)
    print(f"compare_greedy 128 tokens: {time.perf_counter() - t0:.4f} s")


if __name__ == "__main__":
    main()
