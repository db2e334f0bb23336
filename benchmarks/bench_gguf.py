"""Model-layer benchmark: write the full-size `2b-4t` synthetic I2_S file (once; it is cached), then open
and validate it in a fresh process. Prints wall time and peak RSS of each step.

    python -m benchmarks.bench_gguf [--dir DIR] [--format i2_s]

Each step runs in its own child process so that its peak RSS (ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

STEP = r"""
import json, resource, sys, time
t = time.perf_counter()
step, arg, fmt = sys.argv[1], sys.argv[2], sys.argv[3]
if step == "synth":
    from bitnet_ref.synth import SynthSpec, synthesize
    path = str(synthesize(SynthSpec(preset="2b-4t", arch="bitnet-b1.58", format=fmt), arg))
    extra = {"path": path}
else:
    from bitnet_ref.gguf import open_gguf
    from bitnet_ref.gguf.validate import validate
    with open_gguf(arg) as gf:
        findings = validate(gf)
    extra = {"findings": [f.code for f in findings]}
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}))
"""


def run_step(step: str, arg: str, fmt: str) -> dict:
    r = subprocess.run([sys.executable, "-c", STEP, step, arg, fmt], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        sys.exit(f"{step} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=os.environ.get("BITNET_BENCH_DIR", ".nox/bench-models"))
    ap.add_argument("--format", default="i2_s")
    args = ap.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"synth-2b-4t-bitnet-b1.58-{args.format}-llama3-L30-s0.gguf"
    if path.exists():
        print(f"synth 2b-4t {args.format}: cached at {path}")
    else:
        r = run_step("synth", str(out), args.format)
        print(f"synth 2b-4t {args.format}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"file {path.stat().st_size / 2**20:.0f} MiB")
    r = run_step("validate", str(path), args.format)
    print(f"open + validate: {r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
          f"(file {path.stat().st_size / 2**20:.0f} MiB; findings: {r['findings'] or 'none'})")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(this driver process: {baseline:.0f} MB)")


if __name__ == "__main__":
    main()
