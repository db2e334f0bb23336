"""pytest plugin: the cross-validation suites as parametrized tests.

Registered through the `pytest11` entry point (and loaded by the root conftest.py for in-repo runs).
Each (case, reference) pair becomes one test with a readable id, e.g.
`test_crossval[tl2-bitnet-b1.58-large-shapes-vs-bitnet_cpp_tl2]`, marked with the case's format and
architecture (i2s, tl1, tl2, tq1, tq2, f16, f32, bitnet, bitnet_b1_58) and `crossval`, so that
`pytest -k tl2 --tolerance 1e-4` runs exactly the TL2 cases with max |Δ| ≤ 1e-4.

Records (one JSON per test) go to --records; with pytest-xdist every worker writes its own files
(atomically) and the controller merges them into the HTML report at the end, so nothing is lost.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

MARKERS = {
    "crossval": "a cross-validation case (system under test vs a reference)",
    "i2s": "I2_S weights", "tl1": "TL1 weights", "tl2": "TL2 weights", "tq1": "TQ1_0 weights",
    "tq2": "TQ2_0 weights", "f16": "F16 weights", "f32": "F32 weights",
    "bitnet": "architecture bitnet (SiLU)", "bitnet_b1_58": "architecture bitnet-b1.58 (ReLU²)",
    "gpu": "needs a CUDA device", "slow": "long-running; excluded from the default run",
}


def _tolerance(text: str) -> float:
    from .tolerances import ToleranceError, check_value

    try:
        v = float(text)
    except ValueError:
        raise pytest.UsageError(f"--tolerance {text!r} is not a number") from None
    try:
        return check_value("max_abs", v, "--tolerance")
    except ToleranceError as e:
        raise pytest.UsageError(str(e)) from None


def pytest_addoption(parser) -> None:
    g = parser.getgroup("bitnet-crossval")
    g.addoption("--tolerance", type=_tolerance, default=None,
                help="primary logits tolerance (max |Δ|) for the selected cases")
    g.addoption("--engine", default="bitnet_ref", help="system under test (default bitnet_ref)")
    g.addoption("--reference", action="append", default=None,
                help="reference engine (repeatable); default: each case's references")
    g.addoption("--model", default=None, help="run the cases on this GGUF instead of the cases' models")
    g.addoption("--validation", default=None, choices=("bit-exact", "independent"),
                help="how the system under test is judged: bit-exact (the reference's arithmetic reproduced: "
                     "tight limits) or independent (its own numerics: limits a multiple of a measured noise "
                     "floor). Default: the case's, else bit-exact for bitnet_ref with an emulation profile, "
                     "independent for any other engine")
    g.addoption("--profile", default=None, help="numerics profile of the system under test (default: the case's)")
    g.addoption("--platform", default=None, help="platform id for baselines (default: detected)")
    g.addoption("--update-baselines", action="store_true", help="rewrite the platform's baselines")
    g.addoption("--baselines", choices=("gate", "report"), default="gate",
                help="gate (default): a regression against the platform's baseline fails the test; "
                     "report: it is only reported")
    g.addoption("--baselines-dir", default=None, help="default: ./baselines")
    g.addoption("--report-html", default=None, help="write the HTML regression report here")
    g.addoption("--records", default=None, help="directory for the JSON records (default: beside the report)")
    g.addoption("--cases", action="append", default=None, help="case file (repeatable; default: cases/*.toml)")
    g.addoption("--history", default=None,
                help="append this run's records to a history directory (bitnet-xval history DIR shows the trends)")
    g.addoption("--min-comparisons", type=int, default=0,
                help="fail the session when fewer cross-validations than this compared anything (CI: a job whose "
                     "every case skipped must not pass)")


def pytest_configure(config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    if config.getoption("--platform"):
        from .baselines import check_platform

        try:
            check_platform(config.getoption("--platform"))
        except ValueError as e:
            raise pytest.UsageError(f"--platform: {e}") from None
    from .runner import RunError, platform_tolerances

    try:
        config._crossval_platform_tolerances = platform_tolerances(run_options(config))
    except RunError as e:
        raise pytest.UsageError(str(e)) from None
    records = config.getoption("--records")
    report = config.getoption("--report-html")
    if records is None and report is not None:
        records = str(Path(report).with_suffix("")) + "-records"
    if records is None and config.getoption("--history") is not None:
        records = tempfile.mkdtemp(prefix="crossval-records-")
    config._crossval_records = Path(records) if records else None
    if config._crossval_records and not hasattr(config, "workerinput"):
        _clear_records(config._crossval_records)  # controller only, before any worker writes


def run_options(config):
    """The plugin's options as the runner takes them (harness/runner.py)."""
    from .runner import RunOptions

    return RunOptions(engine=config.getoption("--engine"), references=config.getoption("--reference"),
                      model=config.getoption("--model"), cases=config.getoption("--cases"),
                      profile=config.getoption("--profile"), validation=config.getoption("--validation"),
                      tolerance=config.getoption("--tolerance"), platform=config.getoption("--platform"),
                      baselines_dir=config.getoption("--baselines-dir"),
                      baselines_mode=config.getoption("--baselines"),
                      update_baselines=config.getoption("--update-baselines"))


def _clear_records(directory: Path) -> None:
    """Remove the records of a previous run (only files that are records) so the report is this run's."""
    import json

    if not directory.is_dir():
        return
    for p in directory.glob("*.json"):
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except ValueError:
            continue
        if isinstance(doc, dict) and "case_id" in doc and "schema_version" in doc:
            p.unlink()


def _pairs(config):
    from .runner import RunError, pairs

    try:
        return pairs(run_options(config))
    except RunError as e:
        raise pytest.UsageError(str(e)) from None


def pytest_generate_tests(metafunc) -> None:
    if "crossval_pair" not in metafunc.fixturenames:
        return
    params = []
    for case, ref in _pairs(metafunc.config):
        marks = [pytest.mark.crossval] + [getattr(pytest.mark, m) for m in case.all_markers()]
        if case.xfail:
            marks.append(pytest.mark.xfail(reason=case.xfail, strict=True, raises=AssertionError))
        params.append(pytest.param((case, ref), id=case.param_id(ref), marks=marks))
    metafunc.parametrize("crossval_pair", params)


@pytest.fixture(scope="session")
def crossval_models_dir(tmp_path_factory) -> Path:
    """Synthesized models, shared by the session (and reused across runs when BITNET_MODELS_CACHE is set)."""
    cache = os.environ.get("BITNET_MODELS_CACHE")
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
        return Path(cache)
    return Path(tempfile.mkdtemp(prefix="crossval-models-", dir=tmp_path_factory.getbasetemp()))


@pytest.fixture
def crossval_run(request, crossval_models_dir):
    """Runs the ladder for the test's (case, reference) (harness/runner.py); writes its record; returns it."""
    from .records import write_json_atomic
    from .runner import record_filename, run_pair

    config = request.config

    def run(pair):
        case, reference = pair
        record = run_pair(case, reference, run_options(config), crossval_models_dir,
                          test_id=request.node.nodeid.split("::")[-1],
                          platform_overrides=config._crossval_platform_tolerances)
        if config._crossval_records is not None:
            write_json_atomic(config._crossval_records / record_filename(record), record.to_json())
        return record

    return run


def pytest_sessionfinish(session, exitstatus) -> None:
    config = session.config
    wanted = config.getoption("--min-comparisons")
    if wanted and not hasattr(config, "workerinput") and len(_COMPARED) < wanted:
        tr = config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"crossval: {len(_COMPARED)} cross-validations compared anything, fewer than "
                          f"--min-comparisons={wanted}: the run fails (nothing ran is not a pass)", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    report, history = config.getoption("--report-html"), config.getoption("--history")
    if hasattr(config, "workerinput") or config._crossval_records is None:
        return
    from .records import read_records
    from .report import write_report

    records = read_records(config._crossval_records) if config._crossval_records.is_dir() else []
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if history is not None and records:
        from . import history as H

        run = H.append_run(history, records)
        H.write_html(history)
        if tr is not None:
            tr.write_line(f"crossval history: {Path(history).resolve()} (run {run}; bitnet-xval history {history})")
    if report is not None:
        path = write_report(records, report, history=history)
        if tr is not None:
            tr.write_line(f"crossval report: {Path(path).resolve()} ({len(records)} records)")


# -- runs that must not pass by comparing nothing ------------------------------------------------------
# BITNET_XVAL_REQUIRE names variables (comma-separated, e.g. BITNET_CPP_DIR,LLAMA_CPP_DIR) that this run has
# set on purpose (.ci/run builds the references and sets it): a test that skips for want of one of them is a
# failure, not a skip.
def _required_variables() -> list[str]:
    return [v.strip() for v in os.environ.get("BITNET_XVAL_REQUIRE", "").split(",") if v.strip()]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    required = _required_variables()
    if not (required and rep.skipped and not hasattr(rep, "wasxfail")):
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    named = [v for v in required if v in reason]
    if named:
        rep.outcome = "failed"
        rep.longrepr = (f"skipped for want of {', '.join(named)}, which BITNET_XVAL_REQUIRE says this run provides: "
                        f"{reason}")


_COMPARED: list[str] = []  # node ids of the cross-validations that compared something (this process)


def pytest_runtest_logreport(report) -> None:
    """Counts the cross-validations that compared something (passed, failed or a known bug shown)."""
    if report.when == "call" and "test_crossval[" in report.nodeid and (
            report.outcome in ("passed", "failed") or hasattr(report, "wasxfail")):
        _COMPARED.append(report.nodeid)

