"""Engine benchmark: prefill and decode tokens per second of the Python engine (bitnet_ref, with its native
kernels and, for contrast, with numpy only) and of mainline llama.cpp (through llama-cpp-python) on the same
synthesized file, in the same run, printed with their ratio. Measured, never asserted.

    python -m benchmarks.bench_engine [--presets tiny,large-shapes] [--format tq2_0] [--prefill 128] [--decode 32]
    python -m benchmarks.bench_engine --presets '' --i2s FILE.gguf [--i2s-decode 4] [--i2s-prefill 32]

--i2s times bitnet_ref's decode (bitnet-cpp profile) on a bitnet.cpp I2_S file, against bitnet.cpp's
llama-bench (tg) when BITNET_CPP_DIR names a build (its bin/llama-bench); --i2s-prefill N also times a
prefill of N tokens against llama-bench's pp N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bitnet_ref import kernels
from bitnet_ref.generate import SamplingParams, stream
from bitnet_ref.model import Model
from bitnet_ref.synth import SynthSpec, synthesize


def _with_kernels(native: bool, fn, *args):
    """Run fn with the native kernels on (when built) or forced off; restore the environment afterwards."""
    old = os.environ.get("BITNET_KERNELS")
    if not native:
        os.environ["BITNET_KERNELS"] = "0"
    kernels.reload()
    try:
        return fn(*args)
    finally:
        if old is None:
            os.environ.pop("BITNET_KERNELS", None)
        else:
            os.environ["BITNET_KERNELS"] = old
        kernels.reload()


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


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_i2s_decode(path, n_decode):
    """bitnet_ref decode tokens/s (bitnet-cpp profile, after a 1-token prefill) and peak RSS."""
    with Model.load(path, "bitnet-cpp") as m:
        st = m.new_state()
        m.forward([1], st)
        t = time.perf_counter()
        for i in range(n_decode):
            m.forward([2 + i], st)
        return n_decode / (time.perf_counter() - t), _peak_rss_mib()


def bench_i2s_prefill(path, n_prefill):
    """bitnet_ref prefill tokens/s (bitnet-cpp profile) of n_prefill tokens in one forward."""
    with Model.load(path, "bitnet-cpp") as m:
        ids = [int(x) for x in np.random.default_rng(0).integers(0, 500, n_prefill)]
        t = time.perf_counter()
        m.forward(ids, m.new_state())
        return n_prefill / (time.perf_counter() - t)


def bench_bitnet_cpp(path, n_decode, threads, n_prompt=0):
    """bitnet.cpp's llama-bench tokens/s: tg (decode) of n_decode tokens, or pp (prefill) of n_prompt tokens when
    n_prompt > 0; None without BITNET_CPP_DIR."""
    d = os.environ.get("BITNET_CPP_DIR")
    if not d:
        return None
    exe = next((p for p in (Path(d) / "bin" / "llama-bench", Path(d) / "llama-bench") if p.exists()), None)
    if exe is None:
        return None
    p, n = (n_prompt, 0) if n_prompt > 0 else (0, n_decode)
    r = subprocess.run([str(exe), "-m", str(path), "-p", str(p), "-n", str(n), "-t", str(threads), "-r", "1",
                        "-o", "json"], capture_output=True, text=True, check=True)
    return float(json.loads(r.stdout)[0]["avg_ts"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,large-shapes")
    ap.add_argument("--format", default="tq2_0")
    ap.add_argument("--profile", default="llama-cpp")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--no-numpy", action="store_true", help="skip the numpy-only contrast run")
    ap.add_argument("--i2s", help="a bitnet.cpp I2_S GGUF: time bitnet_ref's decode (vs llama-bench)")
    ap.add_argument("--i2s-decode", type=int, default=4)
    ap.add_argument("--i2s-prefill", type=int, default=0, help="also time a prefill of this many tokens (--i2s)")
    args = ap.parse_args()
    threads = int(os.environ.get("BITNET_CPU_THREADS", "2"))
    native = f"bitnet_ref ({kernels.active()})"
    print(f"threads {threads}; native kernels: {kernels.active()}")
    print(f"{'preset':<14}{'engine':<26}{'prefill tok/s':>15}{'decode tok/s':>15}")
    with tempfile.TemporaryDirectory() as d:
        for preset in filter(None, args.presets.split(",")):
            path = synthesize(SynthSpec(preset=preset, arch="bitnet", format=args.format), d)
            prompt = [int(x) for x in np.random.default_rng(0).integers(0, 500, args.prefill)]
            ours = _with_kernels(True, bench_bitnet_ref, path, prompt, args.decode, args.profile)
            ref = bench_llama_cpp(path, prompt, args.decode, threads)
            print(f"{preset:<14}{native:<26}{ours[0]:>15.1f}{ours[1]:>15.1f}")
            if not args.no_numpy:
                slow = _with_kernels(False, bench_bitnet_ref, path, prompt, args.decode, args.profile)
                print(f"{preset:<14}{'bitnet_ref (numpy)':<26}{slow[0]:>15.1f}{slow[1]:>15.1f}")
                print(f"{preset:<14}{'ratio native/numpy':<26}{ours[0] / slow[0]:>15.3f}{ours[1] / slow[1]:>15.3f}")
            print(f"{preset:<14}{'llama.cpp':<26}{ref[0]:>15.1f}{ref[1]:>15.1f}")
            print(f"{preset:<14}{'ratio ours/llama.cpp':<26}{ours[0] / ref[0]:>15.3f}{ours[1] / ref[1]:>15.3f}")
            os.unlink(path)
    if args.i2s:
        size = os.path.getsize(args.i2s) / 2**20
        tps, peak = _with_kernels(True, bench_i2s_decode, args.i2s, args.i2s_decode)
        print(f"\nI2_S {Path(args.i2s).name} ({size:.0f} MiB)")
        print(f"{native:<26} decode {tps:8.3f} tok/s  peak RSS {peak:.0f} MiB ({peak / size:.2f}x file)")
        bc = bench_bitnet_cpp(args.i2s, max(args.i2s_decode, 16), threads)
        if bc is not None:
            print(f"{'bitnet.cpp llama-bench':<26} decode {bc:8.3f} tok/s  ratio ours/bitnet.cpp {tps / bc:.4f}")
        if args.i2s_prefill > 0:
            pps = _with_kernels(True, bench_i2s_prefill, args.i2s, args.i2s_prefill)
            print(f"{native:<26} prefill {pps:7.3f} tok/s  ({args.i2s_prefill} tokens)")
            bp = bench_bitnet_cpp(args.i2s, 0, threads, args.i2s_prefill)
            if bp is not None:
                print(f"{'bitnet.cpp llama-bench':<26} prefill {bp:7.3f} tok/s  ratio ours/bitnet.cpp {pps / bp:.4f}")


if __name__ == "__main__":
    main()
