"""`bitnet-xval crossval` gives the verdicts `pytest --model=... --reference=...` gives (one runner behind
both), with records, a report and exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from bitnet_ref.synth import SynthSpec, synthesize

    return synthesize(SynthSpec(preset="tiny", arch="bitnet", format="f32"), tmp_path_factory.mktemp("m"))


def pytest_outcomes(model, tmp: Path, tolerance: str) -> dict[str, str]:
    records = tmp / f"pytest-records-{tolerance}"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/crossval",
                        f"--model={model}", "--reference=llama_cpp", f"--tolerance={tolerance}",
                        "--baselines=report", f"--records={records}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert r.returncode in (0, 1), r.stdout[-2000:]
    return {json.loads(p.read_text())["test_id"].split("[", 1)[1].rstrip("]"): json.loads(p.read_text())["status"]
            for p in records.glob("*.json")}


@pytest.mark.llama_cpp
@pytest.mark.parametrize("tolerance, code", [("1e-4", 0), ("1e-9", 1)])
def test_same_verdicts_as_pytest(model, tmp_path, capsys, tolerance, code):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")
    report = tmp_path / "r.html"
    got = main(["crossval", "--model", str(model), "--reference", "llama_cpp", "--tolerance", tolerance,
                "--baselines", "report", "--report-html", str(report), "--format", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert got == code == doc["exit_code"]
    ours = {p["pair"]: p["outcome"] for p in doc["pairs"]}
    assert ours == pytest_outcomes(model, tmp_path, tolerance)
    assert set(ours.values()) == ({"pass"} if code == 0 else {"fail"})
    if code:
        assert all(p["failed_rung"] == "first_logits" for p in doc["pairs"])
    assert report.is_file() and len(list(Path(doc["records_dir"]).glob("*.json"))) == 1


def test_nothing_compared_is_exit_2(model, capsys, monkeypatch):
    monkeypatch.delenv("BITNET_CPP_DIR", raising=False)
    assert main(["crossval", "--model", str(model), "--reference", "bitnet_cpp"]) == 2
    out = capsys.readouterr().out
    assert "SKIP" in out and "BITNET_CPP_DIR" in out and "nothing compared" in out


def test_bad_arguments_are_exit_2(tmp_path, capsys):
    assert main(["crossval", "--model", str(tmp_path / "missing.gguf")]) == 2
    assert "cannot read the model" in capsys.readouterr().err
    assert main(["crossval", "--tolerance", "-1", "--model", str(tmp_path / "x.gguf")]) == 2
