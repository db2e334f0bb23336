"""Building the references (harness/references.py, `bitnet-xval reference`): sources, the cache, TL2 kernel
generation with bitnet.cpp's own generator, errors that name what to install, and the builds themselves
where they exist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from harness import references as R
from harness.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TARBALL = ROOT.parent / "shared" / "references" / "bitnet.cpp-src.tar.xz"


def need_tarball() -> Path:
    if not TARBALL.is_file():
        pytest.skip(f"the bitnet.cpp source tarball is not at {TARBALL} (CI and the development machines have it "
                    "beside the checkout in shared/references/)")
    return TARBALL


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("BITNET_REFERENCE_CACHE", str(root))
    return root


# -- sources -------------------------------------------------------------------------------------------
def _tarball(tmp_path: Path, files: dict[str, str], provenance: str | None = None) -> Path:
    src = tmp_path / "tree" / "proj"
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    out = tmp_path / "dist" / "proj.tar.gz"
    out.parent.mkdir()
    with tarfile.open(out, "w:gz") as tf:
        tf.add(src, arcname="proj")
    if provenance is not None:
        (out.parent / "PROVENANCE.md").write_text(provenance)
    return out


def test_tarball_source_reads_commit_from_provenance(tmp_path):
    sha = "16da220ae2b510caff437d403288882687f44ae5"
    tb = _tarball(tmp_path, {"a.txt": "x"}, f"| rest | github.com/microsoft/BitNet at {sha} (2026-07-21) |\n")
    s = R.resolve_source(str(tb))
    assert (s.kind, s.commit) == ("tarball", sha)
    assert s.provenance.endswith("PROVENANCE.md") and len(s.digest) == 64
    tb.write_bytes(tb.read_bytes() + b"\0" * 512)  # another tarball, another digest
    assert R.resolve_source(str(tb)).digest != s.digest


def test_tree_digest_follows_content_and_skips_build_dirs(tmp_path):
    root = tmp_path / "src"
    (root / "build").mkdir(parents=True)
    (root / "a.c").write_text("int a;")
    d1 = R.resolve_source(str(root)).digest
    (root / "build" / "junk.o").write_text("object")
    assert R.resolve_source(str(root)).digest == d1
    (root / "a.c").write_text("int b;")
    assert R.resolve_source(str(root)).digest != d1
    assert R.resolve_source(str(root)).commit is None  # no git, no PROVENANCE.md


@pytest.mark.parametrize("kwargs, message", [
    ({}, "name the source"),
    ({"src": "/nonexistent/bitnet"}, "no such file or directory"),
    ({"git": "https://example.invalid/BitNet.git"}, "full 40-character commit"),
    ({"git": "https://example.invalid/BitNet.git", "commit": "main"}, "full 40-character commit"),
])
def test_bad_sources_say_what_is_wrong(kwargs, message):
    with pytest.raises(R.BuildError, match=message):
        R.resolve_source(**kwargs)


def test_a_file_that_is_not_a_tarball_is_refused(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(R.BuildError, match="not a directory and not a tar archive"):
        R.resolve_source(str(f))


# -- tools ---------------------------------------------------------------------------------------------
def test_missing_tools_name_their_debian_packages(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(R.BuildError) as e:
        R._require_tools(["cmake", "clang", "clang++"])
    assert "cmake, clang, clang++" in str(e.value)
    assert "apt-get install clang cmake" in str(e.value)


def test_openmp_check_names_libomp(tmp_path, monkeypatch):
    # a "compiler" that always fails stands for clang without libomp
    fake = tmp_path / "bin" / "fakecc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'fatal error: omp.h: No such file' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(R.BuildError, match="apt-get install libomp-dev"):
        R._require_openmp(str(fake), tmp_path / "w")


# -- TL2 kernel shapes ---------------------------------------------------------------------------------
def test_large_shapes_preset_tilings_are_bitnet_b1_58_large():
    assert R.tl2_tilings(R.preset_shapes("large-shapes")) == [
        (1536, 1536, 128, 192, 32), (1536, 4096, 256, 96, 32), (4096, 1536, 256, 96, 32)]


def test_unknown_shape_has_no_tiling():
    with pytest.raises(R.BuildError, match="no tiling for shape"):
        R.tl2_tilings([(1000, 768)])


def test_model_shapes_read_from_the_file(tmp_path):
    from bitnet_ref.synth import SynthSpec, synthesize

    path = synthesize(SynthSpec(preset="tiny", arch="bitnet-b1.58", format="i2_s"), tmp_path)
    # tiny: hidden 256, ffn 512, 4 heads / 2 KV heads of 64
    assert R.model_shapes(path) == [(128, 256), (256, 256), (256, 512), (512, 256)]
    with pytest.raises(R.BuildError, match="--model"):
        R.model_shapes(tmp_path / "missing.gguf")


def test_tl2_shapes_union_of_preset_and_models(tmp_path):
    from bitnet_ref.synth import SynthSpec, synthesize

    path = synthesize(SynthSpec(preset="tiny", arch="bitnet-b1.58", format="i2_s"), tmp_path)
    large = R.preset_shapes("large-shapes")
    assert R.tl2_shapes() == large
    assert R.tl2_shapes([path]) == sorted(set(large) | set(R.model_shapes(path)))
    assert R.tl2_shapes([path, path], preset="none") == R.model_shapes(path)
    with pytest.raises(R.BuildError, match="no shapes"):
        R.tl2_shapes([], preset="none")
    with pytest.raises(R.BuildError, match="--preset-shapes 'huge'"):
        R.tl2_shapes([], preset="huge")


def test_trained_model_shapes_have_tl2_tilings():
    from bitnet_ref.train import SHIPPED

    shapes = R.model_shapes(SHIPPED)
    assert shapes == [(128, 256), (256, 256), (256, 768), (768, 256)]
    assert [t[:2] for t in R.tl2_tilings(shapes)] == shapes


def test_generated_kernels_equal_the_generators_own_output(tmp_path):
    """Our driver of utils/codegen_tl2.py, given the shapes and tilings setup_env.py gives it for
    bitnet_b1_58-large, writes the very header and config the script's command line writes."""
    tb = need_tarball()
    with tarfile.open(tb) as tf:
        tf.extractall(tmp_path / "a", filter="data")
        tf.extractall(tmp_path / "b", filter="data")
    ours, theirs = tmp_path / "a" / "bitnet.cpp", tmp_path / "b" / "bitnet.cpp"
    R.generate_tl2_kernels(ours, [(1536, 4096, 256, 96, 32), (1536, 1536, 128, 192, 32), (4096, 1536, 256, 96, 32)])
    subprocess.run([sys.executable, "utils/codegen_tl2.py", "--model", "bitnet_b1_58-large", "--BM", "256,128,256",
                    "--BK", "96,192,96", "--bm", "32,32,32"], cwd=theirs, check=True, capture_output=True)
    h = "include/bitnet-lut-kernels.h"
    assert (ours / h).read_bytes() == (theirs / h).read_bytes()
    from bitnet_ref.formats.tl1 import load_kernel_config

    assert (load_kernel_config(ours / "include/kernel_config.ini")
            == load_kernel_config(theirs / "include/kernel_config.ini"))


# -- the cache -----------------------------------------------------------------------------------------
def _fake_make(calls: list, fail: bool = False):
    def make(dest: Path) -> R.Build:
        calls.append(dest)
        (dest / "build.log").write_text("step 1\nerror: something broke\n")
        if fail:
            raise R.BuildError("the cmake build step failed")
        (dest / "build").mkdir()
        b = R.Build("bitnet.cpp", "i2_s", str(dest / "build"), {"kind": "tree"}, str(dest / "src"), "k", "clang",
                    [], [])
        return R._finish(dest, b)

    return make


def test_second_call_is_served_from_the_cache(cache):
    calls: list = []
    first = R._build_in_cache("bitnet.cpp-i2_s", {"x": 1}, _fake_make(calls))
    second = R._build_in_cache("bitnet.cpp-i2_s", {"x": 1}, _fake_make(calls))
    assert len(calls) == 1 and not first.cached and second.cached
    assert second.directory == first.directory
    assert json.loads((Path(first.directory) / R.MANIFEST).read_text())["variant"] == "i2_s"
    R._build_in_cache("bitnet.cpp-i2_s", {"x": 2}, _fake_make(calls))  # other inputs: another build
    assert len(calls) == 2


def test_failed_build_leaves_only_its_log(cache):
    calls: list = []
    with pytest.raises(R.BuildError):
        R._build_in_cache("bitnet.cpp-i2_s", {"x": 1}, _fake_make(calls, fail=True))
    left = sorted(p.name for p in cache.iterdir())
    assert [n for n in left if not n.endswith((".lock", ".failed.log"))] == []
    assert any(n.endswith(".failed.log") for n in left)
    R._build_in_cache("bitnet.cpp-i2_s", {"x": 1}, _fake_make(calls))
    assert len(calls) == 2  # retried, not served a half build


def test_unfinished_build_is_made_again(cache):
    calls: list = []
    b = R._build_in_cache("bitnet.cpp-i2_s", {"x": 1}, _fake_make(calls))
    os.remove(Path(b.directory) / R.MANIFEST)  # as if the process died before the manifest
    R._build_in_cache("bitnet.cpp-i2_s", {"x": 1}, _fake_make(calls))
    assert len(calls) == 2


# -- the command ---------------------------------------------------------------------------------------
def test_command_reports_a_bad_source_on_stderr_only(capsys, cache):
    assert cli_main(["reference", "bitnet.cpp", "--src", "/nonexistent/x"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no such file or directory" in err


def test_command_refuses_tl1_off_arm(capsys, cache, tmp_path):
    if os.uname().machine in ("aarch64", "arm64"):
        pytest.skip("TL1 is refused only off ARM")
    (tmp_path / "src").mkdir()
    assert cli_main(["reference", "bitnet.cpp", "--src", str(tmp_path / "src"), "--variant", "tl1"]) == 2
    assert "ARM-only" in capsys.readouterr().err


def test_llama_cpp_python_pin_matches_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'"llama-cpp-python=={R.LLAMA_CPP_PYTHON}"' in text


# -- the builds this machine has (CI builds them from the tarball in .ci/run) --------------------------
@pytest.mark.parametrize("variable, variant", [("BITNET_CPP_DIR", "i2_s"), ("BITNET_CPP_TL2_DIR", "tl2")])
def test_configured_build_has_a_manifest_when_we_built_it(variable, variant):
    d = os.environ.get(variable)
    if not d:
        pytest.skip(f"{variable} is not set (eval \"$(bitnet-xval reference bitnet.cpp --src ...)\" sets it)")
    m = R.read_manifest(d)
    if m is None:
        pytest.skip(f"{variable}={d} was not built by `bitnet-xval reference` (no {R.MANIFEST})")
    assert m["variant"] == variant and m["reference"] == "bitnet.cpp"
    assert Path(m["directory"]) == Path(d)
    if variant == "tl2":
        assert [1536, 4096, 256, 96, 32] in m["kernels"]
        ini = Path(m["source_tree"]) / "include" / "kernel_config.ini"
        assert "m = 1536" in ini.read_text()


# -- version drift -------------------------------------------------------------------------------------
def test_version_drift_names_both_commits():
    proven = R.PROVEN_SOURCES["bitnet.cpp"][0]
    assert R.version_drift({"engine": "bitnet.cpp", "source": proven}) is None
    msg = R.version_drift({"engine": "bitnet.cpp", "source": "a" * 40})
    assert "aaaaaaaaaaaa" in msg and proven[:12] in msg and "bitnet-cpp profile" in msg
    assert "unknown" in R.version_drift({"engine": "bitnet.cpp", "source": None})
    assert R.version_drift({"engine": "llama.cpp", "source": None}) is None  # no proven source recorded
    assert R.version_drift(None) is None


def test_report_shows_drift(tmp_path):
    from harness.report.html import render_html

    rec = {"case_id": "c", "sut": "bitnet_ref", "reference": "bitnet_cpp", "profile": "bitnet-cpp", "status": "pass",
           "rungs": [], "receipts": {"sut": {"engine": "bitnet_ref", "version": "1"},
                                     "reference": {"engine": "bitnet.cpp", "version": "x", "source": "b" * 40}}}
    html = render_html([rec], "t")
    assert "Version drift" in html and "bbbbbbbbbbbb" in html
    rec["receipts"]["reference"]["source"] = R.PROVEN_SOURCES["bitnet.cpp"][0]
    assert "Version drift" not in render_html([rec], "t")


def test_build_from_tarball_records_its_commit(monkeypatch):
    """find_build reads the manifest of a build `bitnet-xval reference` made: the receipt's source."""
    d = os.environ.get("BITNET_CPP_DIR")
    if not d or R.read_manifest(d) is None:
        pytest.skip("BITNET_CPP_DIR is not set to a build made by `bitnet-xval reference` (CI's .ci/run makes one)")
    from harness.engines.discovery import find_build

    m = R.read_manifest(d)
    assert find_build("BITNET_CPP_DIR").source_commit == m["source"]["commit"]
    if m["source"]["kind"] == "tarball":
        assert m["source"]["commit"] == R.PROVEN_SOURCES["bitnet.cpp"][0]


def test_log_flush_fix_applies_once_and_only_to_a_leaked_logger(tmp_path):
    root = tmp_path / "llama.cpp"
    (root / "common").mkdir(parents=True)
    log_cpp = root / "common" / "log.cpp"
    leaked = ("// We intentionally leak (i.e. do not delete) the logger singleton\n"
              "    std::call_once(init_flag, [&]() {\n        log = new common_log;\n        "
              + R.LOG_INIT + "\n    });\n")
    log_cpp.write_text(leaked)
    assert R._drain_log_at_exit(root)
    text = log_cpp.read_text()
    assert text.count("std::atexit") == 1 and text.index(R.LOG_INIT) < text.index("std::atexit")
    log_cpp.write_text("// a logger that is destroyed at exit\n" + R.LOG_INIT)
    assert not R._drain_log_at_exit(root)
    assert "atexit" not in log_cpp.read_text()


@pytest.mark.parametrize("isolate", [False, True])
def test_receipt_carries_the_source_commit_in_process_and_isolated(tmp_path, isolate):
    d = os.environ.get("BITNET_CPP_DIR")
    if not d or R.read_manifest(d) is None:
        pytest.skip("BITNET_CPP_DIR is not set to a build made by `bitnet-xval reference` (CI's .ci/run makes one)")
    from bitnet_ref.synth import SynthSpec, synthesize
    from harness.engines.registry import open_engine

    model = synthesize(SynthSpec(preset="tiny", arch="bitnet-b1.58", format="i2_s"), tmp_path)
    with open_engine("bitnet_cpp", model, isolate=isolate) as engine:
        assert engine.receipt.source == R.read_manifest(d)["source"]["commit"]
