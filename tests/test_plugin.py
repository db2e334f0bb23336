"""The pytest plugin as users run it: selection by -k, --tolerance, records and the report, xdist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_run(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_k_tl2_selects_exactly_the_tl2_cases():
    r = pytest_run("--co", "-q", "-k", "tl2")
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    assert ids and all("tl2" in i for i in ids), r.stdout
    from harness.cases import load_cases

    tl2 = {f"tests/crossval/test_crossval.py::test_crossval[{c.param_id(ref)}]"
           for c in load_cases(None) if c.format == "tl2" for ref in c.references}
    assert len(tl2) >= 3 and set(ids) == tl2  # the large-shapes pair and the trained model's


def test_bad_tolerance_is_a_usage_error():
    r = pytest_run("--co", "-q", "--tolerance=-1")
    out = r.stderr + r.stdout
    assert r.returncode != 0 and "--tolerance: tolerance 'max_abs' = -1.0 is not a positive finite number" in out


def test_tolerance_applies_and_is_recorded(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")
    records = tmp_path / "records"
    r = pytest_run("-q", "-k", "tq1_0-bitnet-tiny", "--tolerance=5e-5", f"--records={records}")
    assert r.returncode == 0, r.stdout[-2000:]
    docs = [json.loads(p.read_text()) for p in records.glob("*.json")]
    assert len(docs) == 1 and docs[0]["status"] == "pass"
    checks = [c for rung in docs[0]["rungs"] for c in rung["checks"] if c["metric"] == "max_abs"]
    assert checks and all(c["limit"] == 5e-5 and c["source"].startswith("cli") for c in checks)


def test_xdist_workers_lose_no_record_and_the_report_has_them_all(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    report = tmp_path / "report.html"
    r = pytest_run("-q", "-n", "2", "-k", "bitnet-tiny", f"--report-html={report}")
    assert r.returncode == 0, r.stdout[-2000:]
    collected = pytest_run("--co", "-q", "-k", "bitnet-tiny").stdout
    n = sum(1 for line in collected.splitlines() if "::" in line)
    records = list((tmp_path / "report-records").glob("*.json"))
    assert n >= 5 and len(records) == n
    combined = json.loads((tmp_path / "report.json").read_text())
    html = report.read_text()
    assert "<html" in html and all(json.loads(p.read_text())["case_id"] in html for p in records)
    assert len(combined["records"]) == n


def test_a_baseline_regression_fails_the_test_unless_report(tmp_path):
    """The plugin's baseline path, end to end, with a system under test whose engine spec holds spaces and
    "--" (a string key would split it wrongly): new key reported, --update-baselines writes, a match passes,
    a regression fails naming the metric and the file, --baselines=report only reports it."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")
    sut = f"jsonl:{sys.executable} -m harness.engines.serve bitnet_ref --model {{model}} --profile llama-cpp"
    bdir, records = tmp_path / "baselines", tmp_path / "records"

    def run(*extra):
        r = pytest_run("-q", "-k", "f32-bitnet-tiny", f"--engine={sut}", f"--baselines-dir={bdir}",
                       "--platform=linux-x86_64-avx512", f"--records={records}", *extra)
        (doc,) = [json.loads(p.read_text()) for p in records.glob("*.json")]
        return r, doc

    r, doc = run()
    assert r.returncode == 0 and doc["baseline"]["status"] == "new", r.stdout[-2000:]
    r, doc = run("--update-baselines")
    assert r.returncode == 0 and doc["baseline"]["status"] == "updated", r.stdout[-2000:]
    (path,) = (bdir / "linux-x86_64-avx512").glob("*.json")
    written = json.loads(path.read_text())
    assert written["key"] == {"case_id": "f32-bitnet-tiny", "sut": sut, "reference": "llama_cpp"}
    assert written["reference_topk"]["ids"]  # the reference's top-k, to tell later whether it moved
    written["rungs"]["all_logits"]["metrics"]["max_abs"] = 0.0  # the baseline was better than this run
    written["reference_topk"]["logits"][0][0] += 1.0  # and the reference has moved since
    path.write_text(json.dumps(written))
    r, doc = run()
    assert r.returncode == 1 and doc["status"] == "pass" and doc["baseline"]["status"] == "regression"
    assert "all_logits.max_abs 0.0 ->" in r.stdout and path.name in r.stdout, r.stdout[-3000:]
    assert "the reference itself moved: reference_topk[0].logits[0]" in r.stdout
    r, doc = run("--baselines=report")
    assert r.returncode == 0 and doc["baseline"]["status"] == "regression", r.stdout[-2000:]


def _env_without_bitnet_cpp(**extra) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("BITNET_CPP_DIR", "BITNET_XVAL_REQUIRE")}
    env.update(extra)
    return env


def test_a_required_reference_that_is_missing_fails_instead_of_skipping():
    sel = ("-k", "i2_s-bitnet-b1.58-tiny-vs-bitnet_cpp")
    r = pytest_run("-q", *sel, env=_env_without_bitnet_cpp())
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout[-1500:]
    r = pytest_run("-q", *sel, env=_env_without_bitnet_cpp(BITNET_XVAL_REQUIRE="LLAMA_CPP_DIR, BITNET_CPP_DIR"))
    assert r.returncode == 1 and "1 failed" in r.stdout, r.stdout[-1500:]
    assert "skipped for want of BITNET_CPP_DIR" in r.stdout


def test_min_comparisons_fails_a_run_that_compared_nothing():
    r = pytest_run("-q", "-k", "i2_s-bitnet-b1.58-tiny-vs-bitnet_cpp", "--min-comparisons=1",
                   env=_env_without_bitnet_cpp())
    assert r.returncode == 1 and "nothing ran is not a pass" in r.stdout, r.stdout[-1500:]
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")
    r = pytest_run("-q", "-k", "tq1_0-bitnet-tiny", "--min-comparisons=1", env=_env_without_bitnet_cpp())
    assert r.returncode == 0, r.stdout[-1500:]


def test_a_known_reference_bug_is_an_xfail_and_its_fix_shows(tmp_path):
    """A case's `xfail` (a known reference bug): when the ladder fails, the record says xfail with the
    reason and pytest counts an expected failure; when it passes, strict xfail makes the run fail (XPASS)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")
    cases, records = tmp_path / "cases.toml", tmp_path / "records"
    common = ('model = { synth = { preset = "tiny", arch = "bitnet", format = "tq1_0", layers = 1 } }\n'
              'references = ["llama_cpp"]\nprofile = "llama-cpp"\nprompts = ["Hello there."]\n'
              'rungs = ["first_logits"]\nxfail = "planted: a limit no engine pair meets"\n')
    cases.write_text(f'[[case]]\nid = "known-bug"\n{common}tolerances = {{ max_abs = 1e-12 }}\n'
                     f'[[case]]\nid = "fixed-bug"\n{common}')
    r = pytest_run("-q", "-rxX", "tests/crossval", f"--cases={cases}", f"--records={records}",
                   f"--baselines-dir={tmp_path / 'baselines'}")
    docs = {d["case_id"]: d for d in (json.loads(p.read_text()) for p in records.glob("*.json"))}
    assert docs["known-bug"]["status"] == "xfail" and docs["known-bug"]["failed_rung"] == "first_logits"
    assert docs["known-bug"]["reason"].startswith("known reference bug: planted: a limit no engine pair meets")
    assert docs["fixed-bug"]["status"] == "pass"
    assert r.returncode == 1 and "1 failed" in r.stdout and "1 xfailed" in r.stdout, r.stdout[-2000:]
    assert "XPASS(strict)" in r.stdout and "fixed-bug" in r.stdout
