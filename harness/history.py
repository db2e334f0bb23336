"""The run history: every run's records kept, and each case × reference metric followed across runs.

A history directory holds
  runs/<run-id>/<record>.json   the records of each run, as the plugin or `bitnet-xval report` wrote them
  metrics.csv                   one row per run × case × SUT × reference × rung metric (pandas reads it)

`append_run` adds a run (atomically: a failed append leaves the history as it was); `load` reads the table;
`trend` pivots it to one row per series and one column per run and flags the changes; `render_html` draws a
line chart per series. A change is what the baselines call a regression (harness/baselines.py): an error
metric more than 10 % and 1e-7 worse than in the run before, or an agreement rate that dropped, or a status
that got worse.
"""

from __future__ import annotations

import datetime as _dt
import html as _html
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from .records import write_json_atomic

COLUMNS = ["run", "time", "case", "sut", "reference", "platform", "status", "rung", "metric", "value",
           "sut_version", "reference_version", "reference_source"]
# rates where higher is better; every other metric is an error where lower is better
HIGHER_IS_BETTER = {"top1_agreement", "topk_containment", "match_rate", "match_rate_excl_ties", "cosine",
                    "spearman", "greedy_match_rate"}
# the series the HTML charts by default (every metric is in the table and in `history --metric`)
CHARTED = {"status", "max_abs", "nmse", "kl_mean", "top1_agreement", "match_rate", "match_rate_excl_ties",
           "greedy_match_rate", "ppl_rel_diff"}
STATUS_ORDER = {"pass": 0, "xfail": 0, "skip": 1, "not_supported": 1, "fail": 2, "error": 3}
REL_WORSE, ABS_WORSE = 0.10, 1e-7


class HistoryError(Exception):
    """The history directory cannot be read or written; the message names the file."""


def _platform(rec: dict) -> str:
    bl = rec.get("baseline") if isinstance(rec.get("baseline"), dict) else {}
    return str(bl.get("platform") or (rec.get("environment") or {}).get("platform") or "")


def rows_of(run: str, when: str, records: list[dict]) -> list[dict]:
    """The table rows of one run: one per rung metric (NaN kept), plus a `status` row per record so that a
    record with no metric still shows."""
    out = []
    for rec in records:
        receipts = rec.get("receipts") if isinstance(rec.get("receipts"), dict) else {}
        sut, ref = receipts.get("sut") or {}, receipts.get("reference") or {}
        base = {"run": run, "time": when, "case": rec.get("case_id", ""), "sut": rec.get("sut", ""),
                "reference": rec.get("reference", ""), "platform": _platform(rec), "status": rec.get("status", ""),
                "sut_version": sut.get("version"), "reference_version": ref.get("version"),
                "reference_source": ref.get("source")}
        out.append({**base, "rung": "", "metric": "status",
                    "value": float(STATUS_ORDER.get(rec.get("status", ""), 3))})
        for rung in rec.get("rungs") or []:
            for metric, value in (rung.get("metrics") or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out.append({**base, "rung": rung.get("rung", ""), "metric": metric, "value": float(value)})
    return out


def load(history: str | os.PathLike) -> pd.DataFrame:
    """The metrics table (empty, with the columns, when the history has no run yet)."""
    path = Path(history) / "metrics.csv"
    if not path.exists():
        return pd.DataFrame(columns=COLUMNS)
    try:
        df = pd.read_csv(path, dtype={"run": str, "reference_source": str, "sut_version": str,
                                      "reference_version": str})
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise HistoryError(f"{path}: cannot read the history table ({e}); move it away to start a new one") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise HistoryError(f"{path}: columns {missing} missing: not a bitnet-crossval history table")
    for c in ("case", "sut", "reference", "platform", "status", "rung", "metric"):  # CSV reads "" as NaN
        df[c] = df[c].fillna("").astype(str)
    return df


def append_run(history: str | os.PathLike, records: list[dict], run: str | None = None,
               when: str | None = None) -> str:
    """Add one run's records. Returns the run id (default: the UTC time, made unique)."""
    history = Path(history)
    when = when or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    run = run or when.replace(":", "").replace("-", "")
    runs = history / "runs"
    existing = load(history)
    base, n = run, 1
    while (runs / run).exists() or run in set(existing["run"].astype(str)):
        n += 1
        run = f"{base}-{n}"
    runs.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{run}.", dir=runs))
    try:
        for i, rec in enumerate(records):
            name = f"{i:04d}-{rec.get('case_id', 'case')}-vs-{rec.get('reference', 'ref')}.json"
            write_json_atomic(staging / "".join(c if c.isalnum() or c in "-_." else "_" for c in name), rec)
        new = pd.DataFrame(rows_of(run, when, records), columns=COLUMNS)
        table = new if existing.empty else pd.concat([existing, new], ignore_index=True)
        tmp = history / ".metrics.csv.tmp"
        table.to_csv(tmp, index=False)
        os.replace(staging, runs / run)  # the records first: a table row never names a run without its records
        os.replace(tmp, history / "metrics.csv")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if run not in set(load(history)["run"].astype(str)):
            shutil.rmtree(runs / run, ignore_errors=True)
        raise
    return run


def select(df: pd.DataFrame, case: str | None = None, metric: str | None = None,
           since: str | None = None) -> pd.DataFrame:
    if case:
        df = df[df["case"] == case]
    if metric:
        df = df[(df["metric"] == metric) | (df["rung"] + "." + df["metric"] == metric)]
    if since:
        df = df[pd.to_datetime(df["time"], utc=True) >= pd.to_datetime(since, utc=True)]
    return df


def _worse(metric: str, before: float, now: float) -> bool:
    if pd.isna(before) or pd.isna(now):
        return pd.isna(now) and not pd.isna(before)
    if metric == "status":
        return now > before
    if metric in HIGHER_IS_BETTER:
        return now < before
    return now > before * (1 + REL_WORSE) and now - before > ABS_WORSE


def trend(df: pd.DataFrame) -> pd.DataFrame:
    """One row per series (case, sut, reference, platform, rung, metric), one column per run in time order,
    plus `changed`: the runs where the series got worse than in the run before."""
    if df.empty:
        return pd.DataFrame()
    order = df.drop_duplicates("run").sort_values(["time", "run"])["run"].tolist()
    keys = ["case", "sut", "reference", "platform", "rung", "metric"]
    wide = df.pivot_table(index=keys, columns="run", values="value", aggfunc="last")  # only the series that exist
    wide = wide.reindex(columns=[r for r in order if r in wide.columns])

    def changes(row) -> str:
        metric, vals = row.name[-1], row.tolist()
        runs = [r for r, a, b in zip(wide.columns[1:], vals, vals[1:]) if _worse(metric, a, b)]
        return ", ".join(runs)

    wide["changed"] = wide.apply(changes, axis=1) if len(wide.columns) > 1 else ""
    return wide


def versions(df: pd.DataFrame) -> pd.DataFrame:
    """Per run: the engines' versions and the reference's source commit."""
    cols = ["run", "time", "sut", "sut_version", "reference", "reference_version", "reference_source"]
    return df[cols].drop_duplicates().sort_values(["time", "run", "sut", "reference"])


def render_html(df: pd.DataFrame, title: str = "bitnet-crossval history", charted: set[str] | None = None) -> str:
    """A self-contained page: per case × reference, an SVG chart per metric (of `charted`, default CHARTED)
    over the runs, with the changed runs listed, and the versions of each run."""
    from .report.html import CSS
    from .report.svg import line_plot

    charted = CHARTED if charted is None else charted

    wide = trend(df)
    esc = _html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
             + CSS +
             "body{font-family:system-ui,sans-serif;margin:24px;color:#202124}h2{margin-top:28px}"
             ".changed{color:#b3261e;font-weight:600}.plots{display:flex;flex-wrap:wrap;gap:12px}"
             "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 6px;font-size:12px}"
             "</style></head><body>", f"<h1>{esc(title)}</h1>"]
    if wide.empty:
        parts.append("<p>No runs in this history yet.</p></body></html>")
        return "".join(parts)
    runs = [c for c in wide.columns if c != "changed"]
    parts.append(f"<p>{len(runs)} runs: {esc(runs[0])} … {esc(runs[-1])}</p>")
    for (case, sut, ref), group in wide.groupby(level=["case", "sut", "reference"], sort=True):
        parts.append(f"<h2 id='{esc(case)}--{esc(ref)}'>{esc(case)}: {esc(sut)} vs {esc(ref)}</h2>")
        changed = group[group["changed"] != ""]
        for idx, row in changed.iterrows():
            parts.append(f"<p class='changed'>{esc(idx[4] + '.' if idx[4] else '')}{esc(idx[5])} "
                         f"({esc(idx[3])}) got worse in {esc(row['changed'])}</p>")
        plots = []
        for idx, row in group.iterrows():
            values = [float(v) for v in row[runs].tolist()]
            if idx[5] not in charted or all(v != v for v in values):
                continue
            name = f"{idx[4]}.{idx[5]}" if idx[4] else idx[5]
            positive = all(v > 0 for v in values if v == v)
            plots.append(line_plot(values, title=f"{name} ({idx[3]})", ylabel=idx[5], xlabel="run",
                                   log=positive and idx[5] not in HIGHER_IS_BETTER and idx[5] != "status"))
        parts.append("<div class='plots'>" + "".join(plots) + "</div>")
    parts.append("<h2>Versions per run</h2>" + versions(df).to_html(index=False, na_rep="—", escape=True))
    parts.append("</body></html>")
    return "".join(parts)


def render_text(df: pd.DataFrame) -> str:
    wide = trend(df)
    if wide.empty:
        return "no runs in this history"
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
        return wide.to_string(float_format=lambda v: f"{v:.4g}")



def write_html(history: str | os.PathLike) -> Path:
    """`<history>/history.html`: the charts of the whole history (the reports link each case into it)."""
    from bitnet_ref.atomic import atomic_write_text

    return atomic_write_text(Path(history) / "history.html", render_html(load(history)))
