"""What `nox -s crossval` runs until the cross-validation suites land (issue #5): synthesize the default
tiny models, validate each, and load each in the references present. Exit 1 if any step fails.

    python -m harness.preview_crossval [--out DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

from bitnet_ref.gguf.validate import errors, validate_file
from bitnet_ref.synth import SynthSpec, synthesize
from harness.engines.discovery import ReferenceMissing, find_build

MODELS = [("bitnet", "f32"), ("bitnet", "tq1_0"), ("bitnet", "tq2_0"), ("bitnet-b1.58", "i2_s")]
PROMPT = "The quick brown fox jumps over the lazy dog."


def mainline_logits(path: Path) -> str:
    try:
        import llama_cpp
    except ImportError:
        return "skipped: llama-cpp-python is not installed"
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=2, verbose=False)
    try:
        toks = llm.tokenize(PROMPT.encode(), add_bos=True)
        llm.eval(toks)
        logits = np.asarray(llm.scores[: len(toks)])
    finally:
        llm.close()
    if not np.isfinite(logits).all():
        raise RuntimeError("non-finite logits")
    return f"{len(toks)} positions, finite, logit std {logits.std(axis=1).mean():.2f}"


def bitnet_cpp_run(path: Path) -> str:
    try:
        cli = find_build().tool("llama-cli")
    except ReferenceMissing as e:
        return f"skipped: {e}"
    r = subprocess.run([str(cli), "-m", str(path), "-p", PROMPT, "-n", "8", "--temp", "0", "-t", "2"],
                       capture_output=True, text=True, errors="replace", timeout=300, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"llama-cli exited {r.returncode}: {r.stderr[-500:]}")
    return "loaded and generated 8 tokens"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/crossval")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for arch, fmt in MODELS:
        path = synthesize(SynthSpec(arch=arch, format=fmt), out)
        bad = errors(validate_file(path))
        print(f"{path.name}: validation {'FAILED: ' + '; '.join(map(str, bad)) if bad else 'clean'}")
        failed += bool(bad)
        run = mainline_logits if arch == "bitnet" else bitnet_cpp_run
        name = "mainline llama.cpp" if arch == "bitnet" else "bitnet.cpp"
        try:
            print(f"  {name}: {run(path)}")
        except Exception as e:  # noqa: BLE001 - report every reference failure, then exit non-zero
            print(f"  {name}: FAILED: {e}")
            failed += 1
    print("the logits/greedy/perplexity comparisons and the HTML report arrive with the suites (issue #5)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
