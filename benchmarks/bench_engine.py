"""Engine benchmark: prefill and decode tokens per second of the Python engine (bitnet_ref) and of
mainline llama.cpp (through llama-cpp-python) on the same synthesized file, in the same run, printed
with their ratio. Measured, never asserted.

    python -m benchmarks.bench_engine [--presets tiny,large-shapes] [--format tq2_0] [--prefill 128] [--decode 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from bitnet_ref.generate import SamplingParams, stream
from bitnet_ref.model import Model
from bitnet_ref.synth import SynthSpec, synthesize


def bench_bitnet_ref(path, prompt, n_decode, profile):
    with Model.load(path, profile) as m:
        times = []
        t = time.perf_counter()
        for _ in stream(m, prompt, n_decode, SamplingParams()):
            now = time.perf_counter()
            times.append(now - t)
            t = now
    return len(prompt) / times[0], (n_decode - 1) / sum(times[1:])


def bench_llama_cpp(path, prompt, n_decode, threads):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + n_decode + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=len(prompt), logits_all=True, verbose=False)
    try:
        t = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - t
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t = time.perf_counter()
        for _ in range(n_decode - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode = time.perf_counter() - t
    finally:
        llm.close()
    return len(prompt) / prefill, (n_decode - 1) / decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,large-shapes")
    ap.add_argument("--format", default="tq2_0")
    ap.add_argument("--profile", default="llama-cpp")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    args = ap.parse_args()
    threads = int(os.environ.get("BITNET_CPU_THREADS", "2"))
    print(f"{'preset':<14}{'engine':<22}{'prefill tok/s':>15}{'decode tok/s':>15}")
    with tempfile.TemporaryDirectory() as d:
        for preset in args.presets.split(","):
            path = synthesize(SynthSpec(preset=preset, arch="bitnet", format=args.format), d)
            prompt = [int(x) for x in np.random.default_rng(0).integers(0, 500, args.prefill)]
            ours = bench_bitnet_ref(path, prompt, args.decode, args.profile)
            ref = bench_llama_cpp(path, prompt, args.decode, threads)
            print(f"{preset:<14}{'bitnet_ref (numpy)':<22}{ours[0]:>15.1f}{ours[1]:>15.1f}")
            print(f"{preset:<14}{'llama.cpp':<22}{ref[0]:>15.1f}{ref[1]:>15.1f}")
            print(f"{preset:<14}{'ratio ours/llama.cpp':<22}{ours[0] / ref[0]:>15.3f}{ours[1] / ref[1]:>15.3f}")
            os.unlink(path)


if __name__ == "__main__":
    main()
