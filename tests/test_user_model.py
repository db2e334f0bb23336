"""`pytest --model=PATH` (the user's own model): architecture and format come from the file, so the
tolerances, skips and markers are the file's, not the profile's catch-all defaults."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet_ref.synth import SynthSpec, synthesize
from harness.cases import load_case_file
from harness.crossval import unavailable_reason
from harness.runner import RunError
from harness.runner import user_model_pairs as _user_model_cases
from harness.tolerances import resolve

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("user-models")
    return {fmt: synthesize(SynthSpec(preset="tiny", arch=arch, format=fmt), d)
            for fmt, arch in (("f32", "bitnet"), ("tq2_0", "bitnet"), ("i2_s", "bitnet-b1.58"))}


@pytest.mark.parametrize("fmt, arch, marker, arch_marker, refs", [
    ("f32", "bitnet", "f32", "bitnet", ["llama_cpp", "bitnet_cpp"]),
    ("tq2_0", "bitnet", "tq2", "bitnet", ["llama_cpp", "bitnet_cpp"]),
    ("i2_s", "bitnet-b1.58", "i2s", "bitnet_b1_58", ["bitnet_cpp"]),
])
def test_format_and_arch_come_from_the_file(models, fmt, arch, marker, arch_marker, refs):
    pairs = _user_model_cases(str(models[fmt]), None)
    assert [r for _, r in pairs] == refs  # llama.cpp cannot read I2_S: it is not offered one
    for case, _ in pairs:
        assert (case.format, case.arch) == (fmt, arch)
        assert marker in case.all_markers() and arch_marker in case.all_markers()


def test_exact_profile_on_an_f32_file_gets_the_f32_tolerances(models):
    """`--profile exact` on an F32 file: max |Δ| 1e-4 (exact/f32), not the quantized formats' 1.0."""
    case, _ = _user_model_cases(str(models["f32"]), ["llama_cpp"])[0]
    tol = resolve("exact", case.format)
    assert tol["max_abs"].limit == 1e-4 and tol["max_abs"].source == "default:exact/f32"
    case, _ = _user_model_cases(str(models["i2_s"]), ["bitnet_cpp"])[0]
    assert resolve("exact", case.format)["max_abs"].source == "default:exact/i2_s"


def test_markers_select_the_user_model_tests(models):
    def collect(*args):
        r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--co", "-q",
                            f"--model={models['i2_s']}", "tests/crossval", *args],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        return [line for line in r.stdout.splitlines() if "::" in line]

    assert len(collect("-m", "i2s and bitnet_b1_58")) == 1
    assert collect("-m", "f32") == []


def test_a_path_case_reads_its_file(models, tmp_path):
    f = tmp_path / "cases.toml"
    f.write_text(f'[[case]]\nid = "mine"\nmodel = {{ path = "{models["tq2_0"]}" }}\nreferences = ["llama_cpp"]\n'
                 'prompts = ["hi"]\n')
    (case,) = load_case_file(f)
    assert (case.format, case.arch) == ("tq2_0", "bitnet") and "tq2" in case.all_markers()


@pytest.mark.skipif(platform.machine() in ("aarch64", "arm64"), reason="this machine is ARM: TL1 can run here")
def test_tl1_user_model_is_skipped_with_the_reason(tmp_path):
    path = synthesize(SynthSpec(preset="large-shapes", arch="bitnet-b1.58", format="tl1", layers=1), tmp_path)
    (case, ref), = _user_model_cases(str(path), None)
    assert case.format == "tl1" and ref == "bitnet_cpp"
    assert "ARM-only" in (unavailable_reason(case, ref) or "")


def test_an_unreadable_model_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(RunError, match="bad.gguf"):
        _user_model_cases(str(bad), None)
