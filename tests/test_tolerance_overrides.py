"""One validator for tolerance overrides (harness.tolerances.check_overrides) behind case files, the command
line and platform overrides; and platform overrides that reach a run (<baselines-dir>/tolerances.toml)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cases import CaseError, load_case_file
from harness.tolerances import resolve

ROOT = Path(__file__).resolve().parents[1]
HEAD = ('[[case]]\nid = "c"\nmodel = { synth = { preset = "tiny", arch = "bitnet", format = "tq2_0" } }\n'
        'references = ["llama_cpp"]\nprofile = "llama-cpp"\nprompts = ["hi"]\n')


def case_with(tmp_path, tolerances: str):
    f = tmp_path / "c.toml"
    f.write_text(HEAD + "[case.tolerances]\n" + tolerances)
    return f


@pytest.mark.parametrize("table, message", [
    ("max_abs = 0\n", "'max_abs' = 0 is not a positive finite number"),
    ("max_abz = 1e-3\n", "unknown tolerance metric 'max_abz'"),
    ("top1_agreement = 1.5\n", "is a fraction and must be <= 1"),
    ("max_abs = true\n", "is not a number"),
    ('[case.tolerances."llama-kpp/tq2_0"]\nmax_abs = 1e-3\n', "unknown profile table 'llama-kpp/tq2_0'"),
])
def test_a_bad_case_tolerance_is_a_case_error(tmp_path, table, message):
    with pytest.raises(CaseError, match=r"c\.toml, case 'c', field 'tolerances'.*" + message.replace(".", r"\.")
                       .replace("(", r"\(").replace(")", r"\)")):
        load_case_file(case_with(tmp_path, table))


def test_profile_and_format_sub_tables_in_a_case(tmp_path):
    f = case_with(tmp_path, 'max_abs = 2e-4\n[case.tolerances."llama-cpp/tq2_0"]\nmax_abs = 3e-4\n'
                            '[case.tolerances."exact"]\nnmse = 1e-3\n')
    (c,) = load_case_file(f)
    t = resolve("llama-cpp", c.format, case_overrides=c.tolerances, case_file=c.file)
    assert t["max_abs"].limit == 3e-4 and t["max_abs"].source == f"case:{f}"
    assert resolve("exact", c.format, case_overrides=c.tolerances, case_file=c.file)["nmse"].limit == 1e-3


def pytest_run(*args):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("value", ["0", "nan", "inf", "-1e-3"])
def test_the_command_line_uses_the_same_rule(value):
    r = pytest_run("--co", "-q", f"--tolerance={value}")
    assert r.returncode != 0 and "--tolerance: tolerance 'max_abs'" in r.stderr + r.stdout
    assert "is not a positive finite number" in r.stderr + r.stdout


def test_platform_overrides_reach_the_run(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")
    bdir, records = tmp_path / "baselines", tmp_path / "records"
    bdir.mkdir()
    (bdir / "tolerances.toml").write_text('["linux-x86_64-avx512"]\nkl_max = 5e-7\n'
                                          '["linux-x86_64-avx512"."llama-cpp/tq1_0"]\nmax_abs = 5e-5\n'
                                          '["linux-aarch64-neon"]\nmax_abs = 1.0\n')
    r = pytest_run("-q", "-k", "tq1_0-bitnet-tiny", f"--baselines-dir={bdir}", "--platform=linux-x86_64-avx512",
                   f"--records={records}")
    assert r.returncode == 0, r.stdout[-2000:]
    (doc,) = [json.loads(p.read_text()) for p in records.glob("*.json")]
    checks = {c["metric"]: c for rung in doc["rungs"] for c in rung["checks"]}
    assert checks["max_abs"]["limit"] == 5e-5 and checks["kl_max"]["limit"] == 5e-7
    assert checks["max_abs"]["source"] == "platform:linux-x86_64-avx512"
    (bdir / "tolerances.toml").write_text('["linux-x86_64-avx512"]\nmax_abs = -1\n')
    r = pytest_run("--co", "-q", f"--baselines-dir={bdir}")
    assert r.returncode != 0 and "tolerances.toml [linux-x86_64-avx512]" in r.stderr + r.stdout
