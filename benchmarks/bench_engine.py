"""Engine benchmark: prefill and decode tokens per second of the Python engine (bitnet_ref, with its native
kernels and, for contrast, with numpy only) and of mainline llama.cpp (through llama-cpp-python) on the same
synthesized file, in the same run, printed with their ratio. Measured, never asserted.

    python -m benchmarks.bench_engine [--presets tiny,large-shapes] [--format tq2_0] [--prefill 128] [--decode 32]
    python -m benchmarks.bench_engine --presets '' --i2s FILE.gguf [--i2s-prefill 512] [--i2s-decode 128]
                                      [--tq2 FILE.gguf | --tq2 synth]

--i2s times bitnet_ref (bitnet-cpp profile, native kernels) on a bitnet.cpp I2_S file (e.g. the 2b-4t preset):
a prefill of --i2s-prefill tokens, --i2s-decode decoded tokens from an empty context and as many again after
that prompt, all asking for the last logits only as llama-bench does, against bitnet.cpp when BITNET_CPP_DIR
names a build: its llama-bench (pp N, tg M from an empty context) and a timed llama-cli run (a prompt of N
tokens, then M tokens; its "eval time" line: decode after the prompt, which this fork's llama-bench cannot
measure on its own: it has no -d, and -pg reports prompt and generation together). Rounds alternate between
the two engines; medians, and the median of the per-round ratios (the machine's load drifts). Peak RSS is
the process's, after the I2_S runs.

--tq2 FILE (or `synth`: the 2b-4t TQ2_0 file written next to the --i2s file once) times bitnet_ref's llama-cpp
profile against mainline llama.cpp on that TQ2_0 file, the same pp/tg sizes, --repeat alternating rounds with
each engine in its own process (peak RSS per engine): mainline through llama-cpp-python with an F32 KV cache and
flash attention off (the profile's setting), and llama-bench from LLAMA_CPP_DIR (-fa 0; its -ctk has no f32)
beside it.

--exact FILE times the exact profile (the mathematical definition, native kernels) on FILE (e.g. the 2b-4t TQ2_0
file): a prefill of --exact-prefill tokens (last logits only) and --exact-decode decoded tokens, --repeat rounds,
medians, each round in a fresh subprocess whose peak RSS (VmHWM) is reported against the file's size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bitnet_ref import kernels
from bitnet_ref.generate import SamplingParams, stream
from bitnet_ref.model import Model
from bitnet_ref.synth import SynthSpec, synthesize


def _with_kernels(native: bool, fn, *args):
    """Run fn with the native kernels on (when built) or forced off (kernels.numpy_only)."""
    if not native:
        with kernels.numpy_only():
            return fn(*args)
    kernels.reload()
    return fn(*args)


def bench_bitnet_ref(path, prompt, n_decode, profile):
    """prefill and decode tok/s, and what ran the layers where a ggml profile's one-call layer kernel did not"""
    with Model.load(path, profile) as m:
        times = []
        t = time.perf_counter()
        for _ in stream(m, prompt, n_decode, SamplingParams()):
            now = time.perf_counter()
            times.append(now - t)
            t = now
        op_by_op = m.profile.ggml_cpu and kernels.available() and not m._layer_plans()
        note = (f"the {m.profile.name} profile's layer kernel does not apply to this model (head_dim "
                f"{m.cfg.head_dim}; it needs a multiple of 64 and packed weights of the profile's formats): its "
                f"layers ran op by op in numpy") if op_by_op else None
    return len(prompt) / times[0], (n_decode - 1) / sum(times[1:]), note


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _decode_rate(m, st, n_decode) -> float:
    t = time.perf_counter()
    for i in range(n_decode):
        m.forward([2 + i], st, last_only=True)
    return n_decode / (time.perf_counter() - t)


def bench_i2s(m, n_prefill, n_decode, after_prompt=True):
    """bitnet_ref tokens/s on a loaded model (last logits only, as llama-bench): a prefill of n_prefill tokens,
    n_decode tokens one at a time from a one-token state, and (after_prompt, else NaN) n_decode tokens after the
    prompt: (pp, tg, tg after the prompt)."""
    ids = [int(x) for x in np.random.default_rng(0).integers(0, 500, n_prefill)]
    # warm-up, as llama-bench's: the same prefill once (starts the thread pool, grows the scratch buffers and
    # faults in the activations' pages), and one token
    m.forward(ids, m.new_state(), last_only=True)
    m.forward([1], m.new_state(), last_only=True)
    st = m.new_state()
    t = time.perf_counter()
    m.forward(ids, st, last_only=True)
    pp = n_prefill / (time.perf_counter() - t)
    tg_ctx = _decode_rate(m, st, n_decode) if after_prompt else float("nan")
    st = m.new_state()
    m.forward([1], st, last_only=True)
    return pp, _decode_rate(m, st, n_decode), tg_ctx


def exact_child(path, n_prefill, n_decode) -> None:
    """One exact-profile round in this (fresh) process: prints JSON {pp, tg, load_s, peak_rss_mib}."""
    t = time.perf_counter()
    with Model.load(path, "exact") as m:
        load_s = time.perf_counter() - t
        pp, tg, _ = bench_i2s(m, n_prefill, n_decode, after_prompt=False)
    print(json.dumps({"pp": pp, "tg": tg, "load_s": load_s, "peak_rss_mib": _peak_rss_mib(),
                      "isa": kernels.active()}))


def bench_exact(path, n_prefill, n_decode, repeat, with_llama: bool) -> None:
    """The exact profile on `path`: `repeat` rounds, each in a subprocess (so that its peak RSS is its own),
    alternating with mainline llama.cpp on the same file (with_llama; a yardstick for the machine's load)."""
    size = os.path.getsize(path) / 2**20
    print(f"\nexact profile on {Path(path).name} ({size:.0f} MiB), pp {n_prefill}, tg {n_decode}, "
          f"{kernels.threads()} threads; {repeat} rounds, each in a fresh process, medians")
    rows, ref = [], []
    for i in range(repeat):
        if with_llama:
            ref.append(bench_llama_cpp(path, n_prefill, n_decode, kernels.threads()))
            print(f"  round {i + 1}: llama.cpp prefill {ref[-1][0]:.2f} tok/s, decode {ref[-1][1]:.2f} tok/s")
        r = subprocess.run([sys.executable, "-m", "benchmarks.bench_engine", "--exact-child", str(path),
                            "--exact-prefill", str(n_prefill), "--exact-decode", str(n_decode)],
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"  round {i + 1}: prefill {row['pp']:.2f} tok/s, decode {row['tg']:.2f} tok/s, load "
              f"{row['load_s']:.1f} s, peak RSS {row['peak_rss_mib']:.0f} MiB")
    pp, tg, peak = (float(np.median([r[key] for r in rows])) for key in ("pp", "tg", "peak_rss_mib"))
    print(f"{'engine':<34}{'prefill tok/s':>15}{'decode tok/s':>15}")
    print(f"{'bitnet_ref exact (' + rows[0]['isa'] + ')':<34}{pp:>15.2f}{tg:>15.2f}   peak RSS {peak:.0f} MiB "
          f"({peak / size:.2f}x file)")
    if ref:
        lp, lt = (float(np.median([r[i] for r in ref])) for i in (0, 1))
        print(f"{'llama.cpp (its own profile)':<34}{lp:>15.2f}{lt:>15.2f}")
        print(f"{'ratio exact/llama.cpp':<34}{pp / lp:>15.3f}{tg / lt:>15.3f}")


def bench_llama_cpp(path, n_prefill, n_decode, threads, kv_f32=False):
    """mainline llama.cpp (llama-cpp-python) as llama-bench measures: pp of n_prefill tokens in one batch and tg
    of n_decode tokens, last logits only. kv_f32: an F32 KV cache and flash attention off (the llama-cpp
    profile's setting; llama-bench's -ctk takes no f32)."""
    import llama_cpp

    kv = {"type_k": 0, "type_v": 0, "flash_attn": False} if kv_f32 else {}  # 0: GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_prefill + n_decode + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=n_prefill, logits_all=False, verbose=False, **kv)
    try:
        ids = [int(x) for x in np.random.default_rng(0).integers(0, 500, n_prefill)]
        llm.eval(ids[:1])
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        pp = n_prefill / (time.perf_counter() - t)
        llm.reset()
        llm.eval([1])
        t = time.perf_counter()
        for i in range(n_decode):
            llm.eval([2 + i])
        tg = n_decode / (time.perf_counter() - t)
    finally:
        llm.close()
    return pp, tg


def _bitnet_cpp_tool(name):
    d = os.environ.get("BITNET_CPP_DIR")
    if not d:
        return None
    return next((p for p in (Path(d) / "bin" / name, Path(d) / name) if p.exists()), None)


def bitnet_cpp_decode_after_prompt(path, n_prompt, n_gen, threads):
    """bitnet.cpp's decode tokens/s after a prompt of n_prompt tokens (BOS and n_prompt - 1 times " the": one
    llama3 token each), from a timed llama-cli run (greedy, EOS ignored, n_gen tokens): its "eval time" line,
    which leaves out the prompt and the sampling. The prompt's token count as llama-cli reports it is checked."""
    exe = _bitnet_cpp_tool("llama-cli")
    if exe is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write(" the" * (n_prompt - 1))
        f.flush()
        r = subprocess.run([str(exe), "-m", str(path), "-f", f.name, "-n", str(n_gen), "--ignore-eos", "-t",
                            str(threads), "-c", str(n_prompt + n_gen + 64), "-b", str(n_prompt), "--temp", "0",
                            "-s", "1"], capture_output=True, text=True, stdin=subprocess.DEVNULL, check=True)
    prompt = re.search(r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens", r.stderr)
    ev = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", r.stderr.replace("prompt eval time", ""))
    if not prompt or not ev:
        raise RuntimeError(f"llama-cli printed no timings ({exe}); its stderr ends:\n{r.stderr[-2000:]}")
    if int(prompt.group(1)) != n_prompt:
        raise RuntimeError(f"llama-cli's prompt has {prompt.group(1)} tokens, not {n_prompt}: the model's "
                           "tokenizer does not make one token of ' the'; bench with a llama3-tokenizer file")
    return int(ev.group(2)) * 1000.0 / float(ev.group(1))


def bench_bitnet_cpp(path, n_prompt, n_gen, threads):
    """bitnet.cpp's tokens/s, {"pp": .., "tg": .., "tg_ctx": ..}: llama-bench's pp n_prompt and tg n_gen (from an
    empty context), and decode after a prompt of n_prompt tokens (`bitnet_cpp_decode_after_prompt`, NaN without
    llama-cli); None without BITNET_CPP_DIR or its llama-bench."""
    exe = _bitnet_cpp_tool("llama-bench")
    if exe is None:
        return None
    r = subprocess.run([str(exe), "-m", str(path), "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads),
                        "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    out = {}
    for row in json.loads(r.stdout):
        out["pp" if row["n_prompt"] > 0 else "tg"] = float(row["avg_ts"])
    tg_ctx = bitnet_cpp_decode_after_prompt(path, n_prompt, n_gen, threads)
    out["tg_ctx"] = float("nan") if tg_ctx is None else tg_ctx
    return out


def bench_llama_bench(exe, path, n_prompt, n_gen, threads, extra=()):
    """llama-bench tokens/s {"pp": .., "tg": ..} (pp n_prompt, tg n_gen, one repetition) and its peak RSS (MiB)."""
    proc = subprocess.Popen([str(exe), "-m", str(path), "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads),
                             "-r", "1", "-o", "json", *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    out_text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{exe} failed (exit {proc.returncode})")
    out = {}
    for row in json.loads(out_text):
        out["pp" if row["n_prompt"] > 0 else "tg"] = float(row["avg_ts"])
    return out, usage.ru_maxrss / 1024


def _worker(engine: str, path: str, n_prefill: int, n_decode: int) -> None:
    """One measurement in this (child) process, printed as JSON: pp, tg, peak RSS in MiB."""
    if engine == "bitnet_ref":
        with Model.load(path, "llama-cpp") as m:
            pp, tg, _ = bench_i2s(m, n_prefill, n_decode, after_prompt=False)
    else:
        pp, tg = bench_llama_cpp(path, n_prefill, n_decode, kernels.threads(), kv_f32=True)
    print(json.dumps({"pp": pp, "tg": tg, "rss": _peak_rss_mib()}))


def _in_child(engine: str, path, n_prefill: int, n_decode: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_engine", "--worker", engine, str(path),
                        str(n_prefill), str(n_decode)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_tq2(path, n_prefill, n_decode, repeat, threads) -> None:
    """bitnet_ref's llama-cpp profile (native kernels) against mainline llama.cpp on one TQ2_0 file: alternating
    rounds, each engine in its own process (peak RSS per engine), medians and ratios. Mainline runs through
    llama-cpp-python with an F32 KV cache and flash attention off (the profile's setting); llama-bench (from
    LLAMA_CPP_DIR, -fa 0, its default f16 KV cache) is shown beside it when built."""
    size = os.path.getsize(path) / 2**20
    exe = None
    if os.environ.get("LLAMA_CPP_DIR"):
        exe = next((p for p in (Path(os.environ["LLAMA_CPP_DIR"]) / "bin" / "llama-bench",
                                Path(os.environ["LLAMA_CPP_DIR"]) / "llama-bench") if p.exists()), None)
    print(f"\nTQ2_0 {Path(path).name} ({size:.0f} MiB), pp {n_prefill}, tg {n_decode}, {threads} threads; "
          f"{repeat} rounds alternating, medians")
    rows = {"bitnet_ref llama-cpp (native)": [], "llama.cpp (py, f32 KV, no FA)": [], "llama-bench (f16 KV, -fa 0)": []}
    names = list(rows)
    for r in range(repeat):
        rows[names[0]].append(_in_child("bitnet_ref", path, n_prefill, n_decode))
        rows[names[1]].append(_in_child("llama_cpp", path, n_prefill, n_decode))
        if exe is not None:
            res, rss = bench_llama_bench(exe, path, n_prefill, n_decode, threads, ("-fa", "0"))
            rows[names[2]].append({"pp": res["pp"], "tg": res["tg"], "rss": rss})
        print(f"  round {r + 1}: " + ", ".join(f"{n.split(' (')[0]} {v[-1]['pp']:.2f} / {v[-1]['tg']:.2f}"
                                               for n, v in rows.items() if v))
    med = {n: {k: float(np.median([x[k] for x in v])) for k in ("pp", "tg", "rss")} for n, v in rows.items() if v}
    print(f"{'engine':<44}{'prefill tok/s':>15}{'decode tok/s':>15}{'peak RSS MiB':>15}")
    for n, m in med.items():
        print(f"{n:<44}{m['pp']:>15.2f}{m['tg']:>15.2f}{m['rss']:>15.0f}")
    ours = med[names[0]]
    for n in names[1:]:
        if n in med:
            print(f"{'ratio ours/' + n.split(' (')[0] + ' (' + n.split(' (')[1]:<44}"
                  f"{ours['pp'] / med[n]['pp']:>15.3f}{ours['tg'] / med[n]['tg']:>15.3f}")


def tq2_equivalent(i2s_path) -> Path:
    """The TQ2_0 file of the 2b-4t preset's shapes (mainline arch `bitnet`), written next to the I2_S file once."""
    spec = SynthSpec(preset="2b-4t", arch="bitnet", format="tq2_0", tokenizer="llama3")
    d = Path(i2s_path).parent
    existing = sorted(d.glob("synth-2b-4t-bitnet-tq2_0-*.gguf"))
    return existing[0] if existing else Path(synthesize(spec, d))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,large-shapes")
    ap.add_argument("--format", default="tq2_0")
    ap.add_argument("--profile", default="llama-cpp")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--no-numpy", action="store_true", help="skip the numpy-only contrast run")
    ap.add_argument("--i2s", help="a bitnet.cpp I2_S GGUF: time bitnet_ref's decode (vs llama-bench)")
    ap.add_argument("--i2s-decode", type=int, default=128)
    ap.add_argument("--i2s-prefill", type=int, default=512)
    ap.add_argument("--tq2", help="the TQ2_0 file of the same shapes for mainline llama.cpp, or `synth`")
    ap.add_argument("--repeat", type=int, default=3, help="alternating rounds of bitnet_ref and bitnet.cpp (--i2s)")
    ap.add_argument("--exact", help="a GGUF (e.g. the 2b-4t TQ2_0 file), or `synth` (--i2s's TQ2_0 equivalent): "
                    "time the exact profile on it")
    ap.add_argument("--exact-prefill", type=int, default=128)
    ap.add_argument("--exact-decode", type=int, default=16)
    ap.add_argument("--exact-child", help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=4, metavar=("ENGINE", "FILE", "PREFILL", "DECODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.exact_child:
        exact_child(args.exact_child, args.exact_prefill, args.exact_decode)
        return
    if args.worker:
        engine, path, n_prefill, n_decode = args.worker
        _worker(engine, path, int(n_prefill), int(n_decode))
        return
    threads = kernels.threads()
    native = f"bitnet_ref ({kernels.active()})"
    print(f"threads {threads}; native kernels: {kernels.active()}")
    print(f"{'preset':<14}{'engine':<26}{'prefill tok/s':>15}{'decode tok/s':>15}")
    with tempfile.TemporaryDirectory() as d:
        for preset in filter(None, args.presets.split(",")):
            path = synthesize(SynthSpec(preset=preset, arch="bitnet", format=args.format), d)
            prompt = [int(x) for x in np.random.default_rng(0).integers(0, 500, args.prefill)]
            ours = _with_kernels(True, bench_bitnet_ref, path, prompt, args.decode, args.profile)
            ref = bench_llama_cpp(path, args.prefill, args.decode, threads)
            print(f"{preset:<14}{native:<26}{ours[0]:>15.1f}{ours[1]:>15.1f}")
            if not args.no_numpy:
                slow = _with_kernels(False, bench_bitnet_ref, path, prompt, args.decode, args.profile)
                print(f"{preset:<14}{'bitnet_ref (numpy)':<26}{slow[0]:>15.1f}{slow[1]:>15.1f}")
                print(f"{preset:<14}{'ratio native/numpy':<26}{ours[0] / slow[0]:>15.3f}{ours[1] / slow[1]:>15.3f}")
            print(f"{preset:<14}{'llama.cpp':<26}{ref[0]:>15.1f}{ref[1]:>15.1f}")
            print(f"{preset:<14}{'ratio ours/llama.cpp':<26}{ours[0] / ref[0]:>15.3f}{ours[1] / ref[1]:>15.3f}")
            if ours[2]:
                print(f"{preset:<14}note: {ours[2]}")
            os.unlink(path)
    if args.i2s:
        size = os.path.getsize(args.i2s) / 2**20
        print(f"\nI2_S {Path(args.i2s).name} ({size:.0f} MiB), pp {args.i2s_prefill}, tg {args.i2s_decode} from an "
              f"empty context and after the {args.i2s_prefill}-token prompt, {threads} threads; {args.repeat} rounds, "
              f"bitnet_ref and bitnet.cpp alternating, medians; load average {os.getloadavg()[0]:.1f} at the start")
        ours, theirs = [], []

        def rounds():
            with Model.load(args.i2s, "bitnet-cpp") as m:
                for _ in range(args.repeat):
                    ours.append(bench_i2s(m, args.i2s_prefill, args.i2s_decode))
                    bc = bench_bitnet_cpp(args.i2s, args.i2s_prefill, args.i2s_decode, threads)
                    if bc is not None:
                        theirs.append((bc["pp"], bc["tg"], bc["tg_ctx"]))
                    print(f"  round {len(ours)}: bitnet_ref " + " / ".join(f"{x:.2f}" for x in ours[-1]) +
                          (", bitnet.cpp " + " / ".join(f"{x:.2f}" for x in theirs[-1]) if bc else "") +
                          f" (pp / tg / tg after the prompt); load average {os.getloadavg()[0]:.1f}", flush=True)
            return _peak_rss_mib()

        peak = _with_kernels(True, rounds)
        med = [float(np.median([r[i] for r in ours])) for i in range(3)]
        heads = ("prefill tok/s", "decode tok/s", f"decode@{args.i2s_prefill}")
        print(f"{'engine':<34}" + "".join(f"{h:>15}" for h in heads))
        print(f"{native:<34}" + "".join(f"{x:>15.2f}" for x in med) +
              f"   peak RSS {peak:.0f} MiB ({peak / size:.2f}x file)")
        if theirs:
            bmed = [float(np.median([r[i] for r in theirs])) for i in range(3)]
            print(f"{'bitnet.cpp (llama-bench, llama-cli)':<34}" + "".join(f"{x:>15.2f}" for x in bmed))
            print(f"{'ratio of the medians':<34}" + "".join(f"{a / b:>15.3f}" for a, b in zip(med, bmed)))
            rr = [float(np.median([o[i] / t[i] for o, t in zip(ours, theirs)])) for i in range(3)]
            print(f"{'median of the per-round ratios':<34}" + "".join(f"{x:>15.3f}" for x in rr))
        else:
            print("bitnet.cpp: not measured (set BITNET_CPP_DIR to a build with bin/llama-bench)")
    if args.tq2:
        if args.tq2 == "synth" and not args.i2s:
            ap.error("--tq2 synth writes the file next to the --i2s file: give --i2s, or --tq2 FILE")
        tq2 = tq2_equivalent(args.i2s) if args.tq2 == "synth" else Path(args.tq2)
        bench_tq2(tq2, args.i2s_prefill, args.i2s_decode, args.repeat, threads)
    if args.exact:
        if args.exact == "synth" and not args.i2s:
            ap.error("--exact synth needs --i2s (the TQ2_0 file is written next to it)")
        exact = tq2_equivalent(args.i2s) if args.exact == "synth" else Path(args.exact)
        try:
            import llama_cpp  # noqa: F401
            with_llama = True
        except ImportError:
            with_llama = False
        bench_exact(exact, args.exact_prefill, args.exact_decode, args.repeat, with_llama)

if __name__ == "__main__":
    main()
