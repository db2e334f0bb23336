"""Finding reference builds (harness/engines/discovery.py) on real directories, and the one exception that
means "this reference is not here" everywhere (base.ReferenceUnavailable: a skip with its reason)."""

from __future__ import annotations

import pytest

from harness.engines import discovery
from harness.engines.base import EngineError, ReferenceUnavailable
from harness.engines.discovery import find_build
from harness.engines.registry import open_engine, probe_all


def _exe(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_a_cmake_build_layout_is_found(tmp_path, monkeypatch):
    lib = tmp_path / "3rdparty/llama.cpp/src/libllama.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"\x7fELF")
    ggml = tmp_path / "3rdparty/llama.cpp/ggml/src/libggml.so"
    ggml.parent.mkdir(parents=True)
    ggml.write_bytes(b"\x7fELF")
    cli = _exe(tmp_path / "bin/llama-cli")
    (tmp_path / "bin/llama-bench").write_text("not executable")
    monkeypatch.setenv("BITNET_CPP_DIR", str(tmp_path))
    b = find_build()
    assert b.library("llama") == lib and b.library("ggml") == ggml and b.tool("llama-cli") == cli
    assert "llama-bench" not in b.tools  # present but not executable
    with pytest.raises(ReferenceUnavailable, match="llama-perplexity is not in .*BITNET_CPP_DIR"):
        b.tool("llama-perplexity")


@pytest.mark.parametrize("setup, message", [
    (lambda tmp: None, "set BITNET_CPP_DIR"),
    (lambda tmp: str(tmp / "nowhere"), "is not a directory"),
    (lambda tmp: str(tmp), "holds neither libllama.so nor bin/llama-cli"),
])
def test_a_missing_build_says_what_to_set(tmp_path, monkeypatch, setup, message):
    value = setup(tmp_path)
    if value is None:
        monkeypatch.delenv("BITNET_CPP_DIR", raising=False)
    else:
        monkeypatch.setenv("BITNET_CPP_DIR", value)
    with pytest.raises(ReferenceUnavailable, match=message):
        find_build()


def test_tools_only_build_has_no_library(tmp_path, monkeypatch):
    _exe(tmp_path / "bin/llama-cli")
    monkeypatch.setenv("BITNET_CPP_DIR", str(tmp_path))
    with pytest.raises(ReferenceUnavailable, match="libllama.so is not under"):
        find_build().library("llama")


def test_one_exception_means_reference_unavailable(tmp_path, monkeypatch):
    """Every adapter raises the same ReferenceUnavailable (an EngineError) for a reference that is not
    here; there is no second exception to translate."""
    assert not hasattr(discovery, "ReferenceMissing")
    assert issubclass(ReferenceUnavailable, EngineError)
    monkeypatch.delenv("BITNET_CPP_DIR", raising=False)
    monkeypatch.delenv("BITNET_CPP_TL2_DIR", raising=False)
    model = tmp_path / "m.gguf"
    for spec, variable in (("bitnet_cpp", "BITNET_CPP_DIR"), ("bitnet_cpp_tl2", "BITNET_CPP_TL2_DIR"),
                           ("bitnet_cpp_cli", "BITNET_CPP_DIR")):
        with pytest.raises(ReferenceUnavailable, match=variable):
            open_engine(spec, model)
    monkeypatch.setenv("LLAMA_CPP_LIB", str(tmp_path / "no-such-lib.so"))
    with pytest.raises(ReferenceUnavailable, match="LLAMA_CPP_LIB"):
        open_engine("llama_cpp", model)
    status = {s.name: s for s in probe_all()}
    assert not status["bitnet_cpp"].available and "BITNET_CPP_DIR" in status["bitnet_cpp"].detail
    assert not status["llama_cpp"].available and "LLAMA_CPP_LIB" in status["llama_cpp"].detail
