"""Engine registry, discovery and receipts: what `--engine` accepts and what `bitnet-xval engines` says."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bitnet_ref.synth import SynthSpec, synthesize
from harness.cli import main
from harness.engines.base import EngineError, Receipt, require_receipt
from harness.engines.registry import open_engine, probe_all

EXAMPLE = Path(__file__).parent / "jsonl_example_engine.py"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synthesize(SynthSpec(arch="bitnet", format="tq2_0", layers=1), tmp_path_factory.mktemp("m"))


def test_a_comparison_without_receipt_is_an_error():
    with pytest.raises(EngineError, match="produced no receipt"):
        require_receipt("bitnet.cpp", None)
    with pytest.raises(EngineError, match="produced no receipt"):
        require_receipt("bitnet.cpp", Receipt(engine="bitnet.cpp", version="x", model="m", model_sha256=""))
    r = Receipt(engine="llama.cpp", version="x", model="m", model_sha256="ab")
    assert require_receipt("llama.cpp", r) is r


def test_open_engine_by_name(model):
    with open_engine("bitnet_ref", model, "llama-cpp") as e:
        assert e.receipt.engine == "bitnet_ref" and e.receipt.profile == "llama-cpp"
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")
    with open_engine("llama_cpp", model) as e:
        assert e.receipt.engine == "llama.cpp" and e.receipt.artifact.endswith("libllama.so")
        assert e.receipt.artifact_sha256 and e.receipt.model_sha256


def test_open_jsonl_engine_by_command(model):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the example engine wraps it) is not installed")
    with open_engine(f"jsonl:{sys.executable} {EXAMPLE} --model {{model}}", model) as e:
        assert e.info().name and len(e.tokenize("hello")) >= 2


def test_unknown_engine_and_missing_reference(model, monkeypatch):
    with pytest.raises(EngineError, match="unknown engine 'vllm'"):
        open_engine("vllm", model)
    with pytest.raises(EngineError, match="jsonl: needs a command"):
        open_engine("jsonl:", model)
    monkeypatch.delenv("BITNET_CPP_DIR", raising=False)
    for name in ("bitnet_cpp", "bitnet_cpp_cli"):
        with pytest.raises(EngineError, match="set BITNET_CPP_DIR"):
            open_engine(name, model)


def test_engines_command_names_what_to_set(monkeypatch, capsys):
    monkeypatch.delenv("BITNET_CPP_DIR", raising=False)
    assert main(["engines", "--format", "json"]) == 0
    found = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
    assert found["bitnet_ref"]["available"] is True
    assert found["bitnet_ref"]["detail"].startswith("kernels: ")
    assert found["bitnet_cpp"]["available"] is False and "BITNET_CPP_DIR" in found["bitnet_cpp"]["detail"]
    assert main(["engines"]) == 0
    assert "bitnet_cpp_cli" in capsys.readouterr().out


def test_bad_llama_lib_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_CPP_LIB", str(tmp_path / "nope.so"))
    status = {s.name: s for s in probe_all()}["llama_cpp"]
    assert not status.available and "LLAMA_CPP_LIB" in status.detail
