"""The run history (harness/history.py, `bitnet-xval history`) and the merge of several runs' records into one
report (`bitnet-xval report`), on records of real runs of the crossval suite."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import history as H
from harness.cli import main

ROOT = Path(__file__).resolve().parents[1]


def crossval_records(tmp: Path, select: str) -> Path:
    """Runs the crossval suite on one selection, its records in tmp/records-<select>."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")
    out = tmp / f"records-{select}"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/crossval", "-k", select,
                        f"--records={out}", f"--history={tmp / 'plugin-history'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:]
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("runs")
    return crossval_records(tmp, "tq1_0-bitnet-tiny"), crossval_records(tmp, "f32-bitnet")


def _records(d: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))]


def _worsen(records: list[dict], factor: float) -> list[dict]:
    out = copy.deepcopy(records)
    for rec in out:
        for rung in rec["rungs"]:
            if "max_abs" in rung.get("metrics", {}):
                rung["metrics"]["max_abs"] = rung["metrics"]["max_abs"] * factor + 1e-3
    return out


def test_three_runs_show_a_planted_regression(two_runs, tmp_path, capsys):
    recs = _records(two_runs[0])
    hist = tmp_path / "history"
    runs = [H.append_run(hist, recs, when=f"2026-12-0{i}T00:00:00Z") for i in (1, 2)]
    runs.append(H.append_run(hist, _worsen(recs, 10.0), when="2026-12-03T00:00:00Z"))
    assert len(set(runs)) == 3 and len(list((hist / "runs").iterdir())) == 3
    wide = H.trend(H.load(hist))
    flagged = wide[wide["changed"] != ""]
    assert len(flagged) and set(flagged.index.get_level_values("metric")) == {"max_abs"}
    assert all(c == runs[2] for c in flagged["changed"])  # only the third run, not the second
    html_path = tmp_path / "h.html"
    assert main(["history", str(hist), "--metric", "max_abs", "--html", str(html_path)]) == 1
    out, err = capsys.readouterr()
    assert "max_abs" in out and "got worse in the latest run" in err
    html = html_path.read_text()
    assert "<svg" in html and f"got worse in {runs[2]}" in html and "Versions per run" in html
    # a quieter fourth run: nothing got worse in the latest run
    H.append_run(hist, _worsen(recs, 10.0), when="2026-12-04T00:00:00Z")
    assert main(["history", str(hist), "--since", "2026-12-03"]) == 0


def test_an_append_that_fails_leaves_the_history_as_it_was(two_runs, tmp_path):
    recs = _records(two_runs[0])
    hist = tmp_path / "history"
    H.append_run(hist, recs)
    before = (hist / "metrics.csv").read_bytes()
    with pytest.raises(TypeError):
        H.append_run(hist, recs + [{"case_id": "bad", "rungs": [], "seconds": object()}])
    assert (hist / "metrics.csv").read_bytes() == before
    assert len([p for p in (hist / "runs").iterdir() if not p.name.startswith(".")]) == 1
    assert not [p for p in (hist / "runs").iterdir() if p.name.startswith(".")]


def test_the_plugins_history_option_appends_each_run(two_runs):
    hist = two_runs[0].parent / "plugin-history"
    df = H.load(hist)
    assert len(df["run"].unique()) == 2 and set(df["case"]) == {r["case_id"] for d in two_runs for r in _records(d)}
    assert (hist / "history.html").is_file()


def test_a_table_that_is_not_a_history_is_named(tmp_path, capsys):
    (tmp_path / "metrics.csv").write_text("a,b\n1,2\n")
    assert main(["history", str(tmp_path)]) == 2
    assert "metrics.csv" in capsys.readouterr().err


def test_records_of_separate_runs_merge_into_one_report_and_history(two_runs, tmp_path, capsys):
    out = tmp_path / "merged.html"
    hist = tmp_path / "history"
    assert main(["report", str(two_runs[0]), str(two_runs[1]), "-o", str(out), "--history", str(hist)]) == 0
    merged = json.loads(out.with_suffix(".json").read_text())["records"]
    assert {r["case_id"] for r in merged} == {r["case_id"] for d in two_runs for r in _records(d)}
    assert len({r["case_id"] for r in merged}) >= 2
    assert all(r["environment"].get("platform") and r["receipts"]["reference"] for r in merged)
    html = out.read_text()
    assert 'class="history" href="history/history.html#' in html
    assert (hist / "history.html").is_file() and len(H.load(hist)["run"].unique()) == 1
    assert main(["report", str(tmp_path / "nothing-here"), "-o", str(tmp_path / "x.html")]) == 2
