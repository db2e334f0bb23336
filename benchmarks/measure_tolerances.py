"""Measure what harness/tolerances.py's defaults are written beside: bitnet_ref in each numerics profile against
each reference, on the shipped trained models, with every limit opened wide so every metric is reported.

    python -m benchmarks.measure_tolerances [--greedy 64] [--only llama-cpp/tq2_0,...]

Runs `bitnet-xval crossval` on generated cases (the references found: llama_cpp always, bitnet_cpp when
BITNET_CPP_DIR is set) and prints one line per profile/format/rung with the worst value of each metric over
the prompts. Measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CASES_DIR = Path(__file__).resolve().parent.parent / "cases"
PROMPTS = ["A dictionary display is a possibly empty series of", "Generic (shallow and deep) copying operations."]
# (profile, format, trained model's arch, reference)
PAIRS = [("llama-cpp", f, "bitnet", "llama_cpp") for f in ("f32", "f16", "tq1_0", "tq2_0")]
PAIRS += [("exact", f, "bitnet", "llama_cpp") for f in ("f32", "f16", "tq2_0")]
PAIRS += [("bitnet-cpp", "i2_s", "bitnet-b1.58", "bitnet_cpp"), ("exact", "i2_s", "bitnet-b1.58", "bitnet_cpp")]
WIDE = ("max_abs = 100, max_rel = 10, nmse = 10, kl_mean = 100, kl_max = 100, ppl_rel_diff = 10, "
        "cosine_min = 1e-9, top1_agreement = 1e-9, topk_a_in_b = 1e-9, greedy_match_rate = 1e-9")
SHOWN = [("max_abs", max), ("max_rel", max), ("nmse", max), ("one_minus_cosine_max", max), ("kl_mean", max),
         ("kl_max", max), ("top1_agreement", min), ("topk_a_in_b", min), ("match_rate", min), ("ppl_rel_diff", max)]


def case_toml(profile: str, fmt: str, arch: str, reference: str, greedy: int) -> str:
    return "\n".join([
        "[[case]]", f'id = "{profile}-{fmt}"', f'model = {{ trained = {{ format = "{fmt}", arch = "{arch}" }} }}',
        f'references = ["{reference}"]', f'profile = "{profile}"', f"prompts = {json.dumps(PROMPTS)}",
        f'corpus = "{CASES_DIR / "corpus" / "heldout.txt"}"', "ctx = 256", f"greedy_tokens = {greedy}",
        f"tolerances = {{ {WIDE} }}", ""])


def worst_per_rung(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per rung, the worst value of each shown metric over the rung's entries (one per prompt)."""
    out: dict[str, dict[str, float]] = {}
    for rec in records:
        for rung in rec["rungs"]:
            worst = out.setdefault(rung["rung"], {})
            for key, agg in SHOWN:
                if key in rung["metrics"]:
                    v = rung["metrics"][key]
                    worst[key] = v if key not in worst else agg(worst[key], v)
    return {k: v for k, v in out.items() if v}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--greedy", type=int, default=64)
    ap.add_argument("--only", default="", help="comma-separated profile/format pairs")
    a = ap.parse_args()
    only = set(filter(None, a.only.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        for profile, fmt, arch, ref in PAIRS:
            if only and f"{profile}/{fmt}" not in only:
                continue
            if ref == "bitnet_cpp" and not os.environ.get("BITNET_CPP_DIR"):
                print(f"{profile}/{fmt} vs {ref}: skipped, BITNET_CPP_DIR is not set")
                continue
            path = Path(tmp) / f"{profile}-{fmt}.toml"
            path.write_text(case_toml(profile, fmt, arch, ref, a.greedy))
            run = subprocess.run([sys.executable, "-m", "harness", "crossval", "--cases", str(path), "--format",
                                  "json", "--records", str(Path(tmp) / "records")], capture_output=True, text=True)
            try:
                records = json.loads(run.stdout)["records"]
            except (json.JSONDecodeError, KeyError):
                print(f"{profile}/{fmt} vs {ref}: crossval gave no records (exit {run.returncode}):\n{run.stderr}")
                continue
            for rung, metrics in worst_per_rung(records).items():
                print(f"{profile:10} {fmt:6} vs {ref:10} {rung:12} "
                      + " ".join(f"{k}={v:.3g}" for k, v in metrics.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
