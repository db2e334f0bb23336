"""Mutation self-test: the harness catches bugs, not noise.

Planted-bug and legitimate variants of bitnet_ref (tests/mutants.py) run as JSON-lines engines
(tests/mutant_engine.py) against a reference, in `independent` mode with no other option: every bug
must FAIL (at first_logits or earlier where it shows there, localized where intermediates are exposed),
every legitimate variant must PASS. The reference is bitnet_ref in the reference's emulation profile
(bitnet-cpp for I2_S, llama-cpp for TQ2_0) and mainline llama.cpp for TQ2_0 on arch bitnet.

The default run covers every bug (the int8 clamp is slow) and two legitimate variants on two models (I2_S
bitnet-b1.58 vs bitnet_ref:bitnet-cpp, TQ2_0 bitnet vs llama.cpp: both archs, both formats); `-m slow` runs
the rest of the matrix. One bug is judged in `bit-exact` mode, as the README's table says: the int8 clamp at
±126 (inside the reference's own quantization noise: only an engine that claims the reference's arithmetic can
be held to it). The greedy rung generates after every prompt: the KV position bug flips tokens beyond the
reference's tie spread after the code prompt on arch bitnet (after the other two, only near-ties).

    python tests/test_mutation.py      # the whole matrix as the README's markdown table (minutes)
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import mutants  # noqa: E402

from harness.cases import CASES_DIR, Case  # noqa: E402
from harness.crossval import run_ladder  # noqa: E402
from harness.engines.registry import open_engine  # noqa: E402
from harness.tolerances import resolve  # noqa: E402

pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")

ENGINE = Path(__file__).parent / "mutant_engine.py"
LONG = next(c for c in tomllib.loads((CASES_DIR / "default.toml").read_text(encoding="utf-8"))["case"]
            if c["id"] == "tq2_0-bitnet-tiny-long-context")["prompts"][0]  # 403 tokens: RoPE errors grow with it
PROMPTS = ["The quick brown fox jumps over the lazy dog.", LONG, "def add(a, b):\n    return a + b  # 2024-11-26\n"]
MODELS = {  # (format, arch) -> reference
    ("i2_s", "bitnet-b1.58"): "bitnet_ref:bitnet-cpp",
    ("i2_s", "bitnet"): "bitnet_ref:bitnet-cpp",
    ("tq2_0", "bitnet"): "llama_cpp",
    ("tq2_0", "bitnet-b1.58"): "bitnet_ref:llama-cpp",
}
# the default run's representative subset (both archs, both formats, every bug once); `-m slow`: all of it
DEFAULT = {("i2_s", "bitnet-b1.58"): {"silu-relu2-swapped", "sub-norm-skipped", "rope-normal-pairing",
                                      "rope-base-off-10pct", "kv-position-off-by-one", "i2s-other-flavour",
                                      "attention-scale-1-over-d", "bos-not-added", "lm-head-row-plus-one",
                                      "float-activations"},
           ("tq2_0", "bitnet"): {"tq2-scale-offset", "silu-relu2-swapped", "rope-base-off-10pct", "bf16-embedding"}}


def judged_mode(variant: str, arch: str) -> str:
    """independent, except the int8 clamp bug: it lives inside the reference's own quantization, so only an
    engine that claims the reference's arithmetic (bit-exact) can be held to it."""
    return "bit-exact" if variant == "int8-clamp-126" else "independent"


class Memo:
    """A reference engine whose answers are kept (it is deterministic), shared by the variants of one model."""

    def __init__(self, engine):
        self.engine, self.receipt, self._memo = engine, engine.receipt, {}

    def __getattr__(self, name):
        attr = getattr(self.engine, name)
        if name not in ("tokenize", "logits", "generate", "perplexity", "intermediates"):
            return attr

        def call(*args, **kw):
            key = (name, repr(args), repr(sorted(kw.items())))
            if key not in self._memo:
                self._memo[key] = attr(*args, **kw)
            return self._memo[key]
        return call

    def close(self):  # kept open for the next variant
        pass


_REFS: dict = {}


def ladder(fmt: str, arch: str, variant: str, models_dir: Path, operations: str | None = None):
    v = mutants.VARIANTS[variant]
    mode = judged_mode(variant, arch)
    case = Case(id=f"mutant-{variant}", file="(tests/test_mutation.py)",
                model={"synth": {"preset": "tiny", "arch": arch, "format": fmt}}, references=[MODELS[fmt, arch]],
                profile=mutants.profile_for(v, fmt) if mode == "bit-exact" else "exact", prompts=PROMPTS,
                corpus=str(CASES_DIR / "corpus" / "small.txt"), greedy_tokens=64,
                validation=None if mode == "independent" else "bit-exact")
    reference = MODELS[fmt, arch]
    sut = f"jsonl:{sys.executable} {ENGINE} {variant} --model {{model}} --format {fmt}"
    if operations:
        sut += f" --operations {operations}"

    def open_fn(name, model, profile, options):
        if name == reference:
            key = (str(model), name)
            if key not in _REFS:
                _REFS[key] = Memo(open_engine(name, model, profile, options))
            return _REFS[key]
        return open_engine(name, model, profile, options)

    tol = resolve(case.profile, fmt)
    return run_ladder(case, reference, tol, models_dir, sut=sut, open_fn=open_fn)


def _params():
    out = []
    for fmt, arch in MODELS:
        for name, v in mutants.VARIANTS.items():
            if fmt in v.formats:
                marks = [] if name in DEFAULT.get((fmt, arch), ()) else [pytest.mark.slow]
                out.append(pytest.param(fmt, arch, name, id=f"{fmt}-{arch}-{name}", marks=marks))
    return out


def check(record, variant: str) -> None:
    v = mutants.VARIANTS[variant]
    assert record.validation["mode"] == judged_mode(variant, record.model["spec"]["arch"])
    if v.kind == "legit":
        assert record.status == "pass", f"legitimate variant {variant} {record.status}: {record.reason}"
        return
    assert record.status == "fail", f"bug {variant} was not caught: {record.status} {record.reason}"
    earliest = {"bos-not-added": "tokens", "kv-position-off-by-one": "greedy", "rope-normal-pairing": "all_logits",
                "rope-base-off-10pct": "all_logits", "attention-scale-1-over-d": "all_logits"}
    assert record.failed_rung == earliest.get(variant, "first_logits"), (record.failed_rung, record.reason)
    loc = record.rungs[-1].localization
    expected = {"silu-relu2-swapped": "ffn_sub_out-0", "sub-norm-skipped": "ffn_sub_norm-0",
                "rope-normal-pairing": "Qcur-0", "rope-base-off-10pct": "Qcur-0",
                "attention-scale-1-over-d": "kqv_out-0",
                "i2s-other-flavour": "Qcur-0", "tq2-scale-offset": "Qcur-0", "lm-head-row-plus-one": "result_output"}
    if variant in expected:
        assert loc is not None and loc["reproduced"], (record.reason, loc)
        if record.reference.startswith("bitnet_ref"):  # llama.cpp's graph names some nodes differently
            assert loc["op"] == expected[variant], loc


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    yield tmp_path_factory.mktemp("mutation-models")
    for memo in _REFS.values():  # the shared references, kept open for the module
        memo.engine.close()
    _REFS.clear()


@pytest.mark.parametrize("fmt,arch,variant", _params())
def test_mutation(fmt, arch, variant, models_dir):
    check(ladder(fmt, arch, variant, models_dir), variant)


def table(models_dir: Path) -> str:
    rows = ["| model | reference | variant | expected | mode | verdict | rung | localization |",
            "|---|---|---|---|---|---|---|---|"]
    caught = legit_ok = bugs = legits = 0
    for (fmt, arch), reference in MODELS.items():
        for name, v in mutants.VARIANTS.items():
            if fmt not in v.formats:
                continue
            r = ladder(fmt, arch, name, models_dir)
            loc = (r.rungs[-1].localization or {}).get("op") if r.rungs and r.status == "fail" else None
            expected = "FAIL" if v.kind == "bug" else "PASS"
            ok = (r.status == "fail") if v.kind == "bug" else (r.status == "pass")
            bugs += v.kind == "bug"
            legits += v.kind == "legit"
            caught += ok and v.kind == "bug"
            legit_ok += ok and v.kind == "legit"
            if r.status == "fail" and r.rungs[-1].localization and not loc:
                loc = "output norm / lm_head"
            rows.append(f"| {fmt} {arch} | {reference} | {v.what} | {expected} | {r.validation.get('mode')} | "
                        f"{r.status.upper()}{'' if ok else ' (!)'} | {r.failed_rung or '-'} | {loc or '-'} |")
    rows.append(f"\nBugs caught: {caught}/{bugs}; legitimate variants failed: {legits - legit_ok}/{legits}.")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    print(table(Path(tempfile.mkdtemp(prefix="mutation-"))))
