"""One self-contained HTML page from cross-validation records (see harness/records.py for the schema).

Self-contained: inline CSS, inline SVG plots, a few lines of inline JS for expand/collapse all; no
external assets. Every string taken from a record is escaped: case ids, reasons and commands come
from files and from tools.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform as _platform
import re
import sys
from collections import Counter
from html import escape
from pathlib import Path

from bitnet_ref.atomic import atomic_write_text

from ..records import RECORD_SCHEMA, RUNGS, STATUSES
from .svg import fmt, histogram_plot, line_plot

PRIMARY_RUNG = "all_logits"
PRIMARY_METRIC = "max_abs"
RECEIPT_FIELDS = (
    "engine",
    "version",
    "artifact",
    "artifact_sha256",
    "model",
    "model_sha256",
    "profile",
    "threads",
    "device",
    "command",
    "timings",
    "host",
)
# failures first, then errors, then passes that regressed against the baseline, skips, passes
_ORDER = {"fail": 0, "error": 1, "regression": 2, "xfail": 3, "skip": 4, "pass": 5}


def e(x) -> str:
    """Escape anything for HTML text or a quoted attribute."""
    return escape("" if x is None else str(x), quote=True)


# ---------------------------------------------------------------------------------------------------
# reading records defensively: they come from files, possibly from older or hand-written producers


def _d(x) -> dict:
    return x if isinstance(x, dict) else {}


def _l(x) -> list:
    return x if isinstance(x, list) else []


def effective_status(rec: dict) -> tuple[str, str]:
    """(status, reason) as the report shows it.

    An unknown status is an error, and so is a pass whose reference has no receipt (DESIGN: a
    comparison whose reference has no receipt is an error, never a pass).
    """
    status = rec.get("status")
    reason = str(rec.get("reason") or "")
    if status not in STATUSES:
        return "error", f"record has an invalid status {status!r}" + (f"; {reason}" if reason else "")
    if status == "pass" and not _d(_d(rec.get("receipts")).get("reference")):
        return "error", "claims a pass, but the reference has no receipt" + (f"; {reason}" if reason else "")
    return status, reason


def is_regression(rec: dict) -> bool:
    return _d(rec.get("baseline")).get("status") == "regression"


def _rung(rec: dict, name: str) -> dict | None:
    for r in _l(rec.get("rungs")):
        if isinstance(r, dict) and r.get("rung") == name:
            return r
    return None


def primary_check(rec: dict) -> dict | None:
    """The check of max |Δ| over all positions, teacher-forced."""
    r = _rung(rec, PRIMARY_RUNG)
    if r is None:
        return None
    for c in _l(r.get("checks")):
        if isinstance(c, dict) and c.get("metric") == PRIMARY_METRIC:
            return c
    v = _d(r.get("metrics")).get(PRIMARY_METRIC)
    return (
        {"metric": PRIMARY_METRIC, "value": v, "limit": None, "op": "", "source": "", "passed": None}
        if v is not None
        else None
    )


def _sort_key(item: tuple[int, dict]):
    i, rec = item
    st, _ = effective_status(rec)
    k = "regression" if st == "pass" and is_regression(rec) else st
    return (_ORDER.get(k, 1), str(rec.get("case_id", "")), str(rec.get("sut", "")), str(rec.get("reference", "")), i)


def _anchor(i: int, rec: dict) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{rec.get('case_id', '')}-{rec.get('reference', '')}").strip("-")[:60]
    return f"r{i}-{slug}" if slug else f"r{i}"


def _num_ok(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------
# pieces


def _badge(status: str, reason: str = "", long: bool = False) -> str:
    label = {"pass": "PASS", "fail": "FAIL", "skip": "SKIPPED", "error": "ERROR",
             "xfail": "KNOWN BUG"}.get(status, status.upper())
    text = label
    if status == "skip" and long:
        text = f"skipped: {reason}" if reason else "skipped: (no reason given)"
    return f'<span class="badge b-{e(status)}" title="{e(reason)}">{e(text)}</span>'


def _baseline_badge(bl: dict) -> str:
    st = str(bl.get("status") or "none")
    cls = {"match": "bl-match", "regression": "bl-regression", "new": "bl-new", "updated": "bl-new"}.get(st, "bl-none")
    label = "REGRESSION" if st == "regression" else st
    plat = bl.get("platform")
    title = f"baseline for {plat}" if plat else "no baseline platform"
    return f'<span class="badge {cls}" title="{e(title)}">{e(label)}</span>'


def _check_cell(c: dict | None) -> str:
    if c is None:
        return '<span class="muted">not reached</span>'
    op = {"<=": "≤", ">=": "≥"}.get(str(c.get("op")), str(c.get("op") or ""))
    lim = c.get("limit")
    passed = c.get("passed")
    cls = "ok" if passed is True else ("bad" if passed is False else "")
    if not _num_ok(c.get("value")):
        cls = "bad"
    limit_txt = f" {e(op)} {e(fmt(lim))}" if lim is not None else ""
    return f'<span class="num {cls}">{e(fmt(c.get("value")))}</span><span class="muted">{limit_txt}</span>'


def _header(records: list[dict], title: str, generated_at: str, environment: dict) -> str:
    statuses = [effective_status(r)[0] for r in records]
    n = Counter(statuses)
    regressions = sum(1 for r in records if is_regression(r))
    total = len(records)
    if total == 0:
        verdict, vcls = "NOTHING RAN: the report has no records.", "v-skip"
    elif n["fail"] or n["error"]:
        bits = []
        if n["fail"]:
            bits.append(f"{n['fail']} of {total} pairs disagree with their reference")
        if n["error"]:
            bits.append(f"{n['error']} could not be compared (error)")
        if regressions:
            bits.append(f"{regressions} regressed against the baseline")
        verdict, vcls = "FAIL: " + "; ".join(bits) + ".", "v-fail"
    elif n["pass"] == 0:
        verdict, vcls = f"NOT VERIFIED: all {total} pairs were skipped; nothing was compared.", "v-skip"
    elif regressions:
        verdict, vcls = (
            f"REGRESSION: every comparison is within tolerance, but {regressions} regressed against the baseline.",
            "v-regr",
        )
    else:
        verdict = f"PASS: {n['pass']} of {total} pairs agree with their reference"
        if n["xfail"]:
            verdict += f"; {n['xfail']} reproduced a known reference bug"
        verdict += f"; {n['skip']} skipped (not verified)." if n["skip"] else "."
        vcls = "v-pass"
    plats = sorted(
        {str(_d(r.get("environment")).get("platform")) for r in records if _d(r.get("environment")).get("platform")}
    )
    plat = environment.get("platform") or (", ".join(plats) if plats else "unknown")
    bl_plats = sorted(
        {str(_d(r.get("baseline")).get("platform")) for r in records if _d(r.get("baseline")).get("platform")}
    )
    counts = "".join(
        f'<span class="count n-{k}"><b>{n[k]}</b> {lbl}</span>'
        for k, lbl in (("pass", "pass"), ("fail", "fail"), ("xfail", "known bug"), ("skip", "skip"), ("error", "error"))
    )
    if regressions:
        counts += f'<span class="count n-regr"><b>{regressions}</b> regression{"s" if regressions != 1 else ""}</span>'
    meta = f"<span>platform <b>{e(plat)}</b></span>"
    if bl_plats:
        meta += f"<span>baselines <b>{e(', '.join(bl_plats))}</b></span>"
    meta += f"<span>generated <b>{e(generated_at)}</b></span><span>{total} case × engine pairs</span>"
    return (
        f'<header><h1>{e(title)}</h1><div class="counts">{counts}</div>'
        f'<div class="meta">{meta}</div><p class="verdict {vcls}" id="verdict">{e(verdict)}</p></header>'
    )


def _summary(ordered: list[tuple[int, dict]]) -> str:
    rows = []
    for i, rec in ordered:
        st, reason = effective_status(rec)
        bl = _d(rec.get("baseline"))
        cls = [f"row-{st}"]
        if is_regression(rec):
            cls.append("row-regr")
        failed = rec.get("failed_rung")
        why = ""
        if st != "pass" and reason:
            why = f'<div class="why">{e(reason)}</div>'
        status_cell = _badge(st, reason, long=True) if st == "skip" else _badge(st, reason) + why
        rows.append(
            f'<tr class="{" ".join(cls)}" data-status="{e(st)}">'
            f'<td><a href="#{_anchor(i, rec)}">{e(rec.get("case_id", "?"))}</a></td>'
            f"<td>{e(rec.get('sut', ''))}</td><td>{e(rec.get('reference', ''))}</td>"
            f"<td>{e(rec.get('profile', ''))}</td><td>{_mode(rec)}</td><td>{status_cell}</td>"
            f"<td>{e(failed) if failed else '<span class=muted>—</span>'}</td>"
            f"<td>{_check_cell(primary_check(rec))}</td><td>{_baseline_badge(bl)}</td></tr>"
        )
    if not rows:
        rows.append('<tr><td colspan="9" class="muted">no records</td></tr>')
    return (
        '<section id="summary"><h2>Summary</h2><table class="summary" id="summary-table"><thead><tr>'
        "<th>case</th><th>SUT</th><th>reference</th><th>profile</th><th>validation</th><th>status</th>"
        "<th>failed rung</th>"
        "<th>max |Δ| all positions vs limit</th><th>baseline</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></section>"
    )


def _ladder(rec: dict) -> str:
    rungs = {r.get("rung"): r for r in _l(rec.get("rungs")) if isinstance(r, dict)}
    names = list(RUNGS) + [k for k in rungs if k not in RUNGS]
    items = []
    for name in names:
        r = rungs.get(name)
        if r is None:
            items.append(
                f'<li class="rung r-notrun"><span class="rn">{e(name)}</span><span class="rs">not run</span></li>'
            )
            continue
        st = str(r.get("status") or "?")
        detail = r.get("detail") or ""
        fbp = r.get("first_bad_position")
        extra = f' <span class="muted">(first bad position {e(fbp)})</span>' if fbp is not None else ""
        items.append(
            f'<li class="rung r-{e(st)}"><span class="rn">{e(name)}</span>'
            f'<span class="rs">{e(st.replace("_", " "))}</span>'
            f'<span class="rd">{e(detail)}{extra}</span></li>'
        )
    loc = _localization(rec)
    if loc:
        items.append(
            f'<li class="rung r-fail"><span class="rn">localization</span><span class="rs">found</span>'
            f'<span class="rd">{e(loc)}</span></li>'
        )
    return '<h3>Check ladder</h3><ol class="ladder">' + "".join(items) + "</ol>"


def _localization(rec: dict) -> str:
    for r in _l(rec.get("rungs")):
        loc = _d(r).get("localization") if isinstance(r, dict) else None
        if isinstance(loc, dict) and loc:
            parts = []
            if loc.get("layer") is not None:
                parts.append(f"layer {loc.get('layer')}")
            if loc.get("op"):
                parts.append(f"op {loc.get('op')}")
            if loc.get("max_abs") is not None:
                parts.append(f"max |Δ| {fmt(loc.get('max_abs'))}")
            if not parts and loc.get("note"):
                return str(loc["note"])
            return "first diverging: " + ", ".join(parts) if parts else "localization recorded (no layer/op)"
    return ""


def _localization_detail(rec: dict) -> str:
    for r in _l(rec.get("rungs")):
        loc = _d(r).get("localization") if isinstance(r, dict) else None
        if not (isinstance(loc, dict) and loc):
            continue
        head = f'<h3>Localization <span class="muted">(from rung {e(r.get("rung"))})</span></h3>' + (
            f'<p class="loc">First diverging layer <b>{e(loc.get("layer", "?"))}</b>, '
            f"operation <b>{e(loc.get('op', '?'))}</b>, max |Δ| <b>{e(fmt(loc.get('max_abs')))}</b></p>"
            if loc.get("op") else f'<p class="loc">{e(loc.get("note", "no operation named"))}</p>')
        nodes = _l(loc.get("nodes"))
        if not nodes:
            return head
        keys: list[str] = []
        for nd in nodes[:200]:
            for k in _d(nd):
                if k not in keys:
                    keys.append(k)
        rows = "".join(
            "<tr>"
            + "".join(
                f"<td>{e(fmt(_d(nd).get(k)) if isinstance(_d(nd).get(k), float) else _d(nd).get(k))}</td>" for k in keys
            )
            + "</tr>"
            for nd in nodes[:200]
        )
        more = f'<p class="muted">{len(nodes) - 200} more nodes not shown</p>' if len(nodes) > 200 else ""
        if not keys:
            rows = "".join(f"<tr><td>{e(nd)}</td></tr>" for nd in nodes[:200])
            keys = ["node"]
        return (
            head
            + '<details><summary>nodes compared</summary><table class="kv"><thead><tr>'
            + "".join(f"<th>{e(k)}</th>" for k in keys)
            + f"</tr></thead><tbody>{rows}</tbody></table>{more}</details>"
        )
    return ""


def _metrics(rec: dict) -> str:
    bl = _d(rec.get("baseline"))
    regs = {str(_d(x).get("metric")): _d(x) for x in _l(bl.get("regressions"))}
    bl_metrics = _d(bl.get("metrics"))
    rows = []
    seen_regs = set()
    for r in _l(rec.get("rungs")):
        if not isinstance(r, dict):
            continue
        rung = r.get("rung", "?")
        checked = set()
        for c in _l(r.get("checks")):
            if not isinstance(c, dict):
                continue
            m = str(c.get("metric"))
            checked.add(m)
            reg = regs.get(m) or regs.get(f"{rung}.{m}")
            if reg:
                seen_regs.add(m if m in regs else f"{rung}.{m}")
            base = reg.get("baseline") if reg else bl_metrics.get(f"{rung}.{m}", bl_metrics.get(m))
            passed = c.get("passed")
            cls = "row-fail" if passed is False else ""
            if reg:
                cls += " row-regr"
            op = {"<=": "≤", ">=": "≥"}.get(str(c.get("op")), str(c.get("op") or ""))
            res = (
                '<span class="ok">ok</span>'
                if passed is True
                else ('<span class="bad">FAIL</span>' if passed is False else "—")
            )
            bcell = e(fmt(base)) if base is not None else '<span class="muted">—</span>'
            if reg:
                bcell += ' <span class="badge bl-regression">regressed</span>'
            rows.append(
                f'<tr class="{cls.strip()}"><td>{e(rung)}</td><td>{e(m)}</td>'
                f'<td class="num">{e(fmt(c.get("value")))}</td>'
                f'<td>{e(op)}</td><td class="num">{e(fmt(c.get("limit")))}</td><td>{e(c.get("source", ""))}</td>'
                f'<td>{res}</td><td class="num">{bcell}</td></tr>'
            )
        for m, v in _d(r.get("metrics")).items():
            if m in checked:
                continue
            base = bl_metrics.get(f"{rung}.{m}", bl_metrics.get(m))
            rows.append(
                f'<tr class="info"><td>{e(rung)}</td><td>{e(m)}</td><td class="num">{e(fmt(v))}</td>'
                '<td></td><td class="muted">no limit</td><td></td><td class="muted">info</td>'
                f'<td class="num">{e(fmt(base)) if base is not None else "<span class=muted>—</span>"}</td></tr>'
            )
    for key, reg in regs.items():
        if key in seen_regs:
            continue
        rows.append(
            f'<tr class="row-regr"><td>baseline</td><td>{e(key)}</td><td class="num">{e(fmt(reg.get("now")))}</td>'
            '<td></td><td></td><td></td><td><span class="badge bl-regression">regressed</span></td>'
            f'<td class="num">{e(fmt(reg.get("baseline")))}</td></tr>'
        )
    if not rows:
        return '<h3>Metrics</h3><p class="muted">no metrics recorded</p>'
    return (
        '<h3>Metrics</h3><table class="metrics"><thead><tr><th>rung</th><th>metric</th><th>value</th><th></th>'
        "<th>limit</th><th>limit source</th><th>result</th><th>baseline</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _plots(rec: dict) -> str:
    out = []
    for r in _l(rec.get("rungs")):
        if not isinstance(r, dict):
            continue
        series = _d(r.get("series"))
        rung = str(r.get("rung", "?"))
        mx = _l(series.get("max_abs_per_position"))
        limit = None
        for c in _l(r.get("checks")):
            if isinstance(c, dict) and c.get("metric") == PRIMARY_METRIC:
                limit = c.get("limit")
        fbp = r.get("first_bad_position")
        fbp = fbp if isinstance(fbp, int) else None
        if mx:
            out.append(
                "<figure>"
                + line_plot(mx, title=f"{rung}: max |Δ| per position", ylabel="max |Δ|", limit=limit, mark=fbp)
                + f"<figcaption>{e(rung)}: max |Δ| per position ({len(mx)} positions)</figcaption></figure>"
            )
        kl = _l(series.get("kl_per_position"))
        if kl:
            kl_limit = None
            for c in _l(r.get("checks")):
                if isinstance(c, dict) and str(c.get("metric", "")).startswith("kl"):
                    kl_limit = c.get("limit")
                    break
            out.append(
                "<figure>"
                + line_plot(kl, title=f"{rung}: KL divergence per position", ylabel="KL", limit=kl_limit, mark=fbp)
                + f"<figcaption>{e(rung)}: KL(reference ‖ SUT) per position</figcaption></figure>"
            )
        for name, vals in series.items():
            if name in ("max_abs_per_position", "kl_per_position") or not _l(vals):
                continue
            if name == "cosine_per_position":  # near 1 everywhere: 1 - cosine on a log axis shows the change
                one_minus = [1.0 - float(v) if _num_ok(v) else v for v in _l(vals)]
                plot = line_plot(one_minus, title=f"{rung}: 1 - cosine per position", ylabel="1 - cosine", mark=fbp)
                caption = f"{rung}: 1 − cosine similarity per position"
            else:
                plot = line_plot(_l(vals), title=f"{rung}: {name}", ylabel=str(name), log=False)
                caption = f"{rung}: {name}"
            out.append(f"<figure>{plot}<figcaption>{e(caption)}</figcaption></figure>")
        hist = _d(r.get("histogram"))
        if hist.get("edges") and hist.get("counts"):
            out.append(
                "<figure>"
                + histogram_plot(_l(hist.get("edges")), _l(hist.get("counts")), title=f"{rung}: |Δ| histogram")
                + f"<figcaption>{e(rung)}: histogram of |Δ| over all logits</figcaption></figure>"
            )
    if not out:
        return ""
    return '<h3>Plots</h3><div class="plots">' + "".join(out) + "</div>"


def _receipt_value(k: str, v) -> str:
    if v is None or v == "" or v == [] or v == {}:
        return '<span class="muted">—</span>'
    if k == "command" and isinstance(v, list):
        return "<code>" + e(" ".join(str(a) for a in v)) + "</code>"
    if k == "timings" and isinstance(v, dict):
        return ", ".join(f"{e(op)} {e(fmt(s))} s" for op, s in v.items())
    if k.endswith("sha256") or k in ("artifact", "model"):
        return f'<code class="hash">{e(v)}</code>'
    if isinstance(v, (dict, list)):
        return f"<code>{e(json.dumps(v, sort_keys=True, default=str))}</code>"
    return e(fmt(v) if isinstance(v, float) else v)


def _receipts(rec: dict, status: str) -> str:
    rc = _d(rec.get("receipts"))
    sut, ref = rc.get("sut"), rc.get("reference")
    keys = list(RECEIPT_FIELDS)
    for side in (sut, ref):
        for k in _d(side):
            if k not in keys:
                keys.append(k)

    def col(side, who: str) -> list[str]:
        if not isinstance(side, dict) or not side:
            msg = "no receipt"
            cls = "bad" if (who == "reference" and status not in ("skip",)) else "muted"
            return [f'<span class="{cls}">{msg}</span>'] + [""] * (len(keys) - 1)
        return [_receipt_value(k, side.get(k)) for k in keys]

    a, b = col(sut, "sut"), col(ref, "reference")
    rows = "".join(f"<tr><th>{e(k)}</th><td>{x}</td><td>{y}</td></tr>" for k, x, y in zip(keys, a, b))
    model = _d(rec.get("model"))
    mrow = ""
    if model:
        spec = model.get("spec")
        mrow = (
            '<table class="kv"><tbody>'
            f"<tr><th>model path</th><td><code>{e(model.get('path', ''))}</code></td></tr>"
            f'<tr><th>model sha256</th><td><code class="hash">{e(model.get("sha256", ""))}</code></td></tr>'
            + (
                f"<tr><th>spec</th><td><code>{e(json.dumps(spec, sort_keys=True, default=str))}</code></td></tr>"
                if spec
                else ""
            )
            + "</tbody></table>"
        )
    from harness.references import version_drift

    drift = version_drift(ref if isinstance(ref, dict) else None)
    return (
        '<h3>Receipts</h3>'
        + (f'<p class="drift"><b>Version drift:</b> {e(drift)}</p>' if drift else "")
        + '<table class="kv receipts"><thead><tr><th></th>'
        f"<th>SUT: {e(rec.get('sut', ''))}</th><th>reference: {e(rec.get('reference', ''))}</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>{mrow}"
    )


def _kv(d: dict) -> str:
    if not d:
        return '<p class="muted">not recorded</p>'
    rows = "".join(
        f"<tr><th>{e(k)}</th><td>{e(v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str))}</td></tr>"
        for k, v in d.items()
    )
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _mode(rec: dict) -> str:
    v = _d(rec.get("validation"))
    mode = v.get("mode")
    return (f'<span title="{e(v.get("source", ""))}">{e(mode)}</span>' if mode else '<span class="muted">—</span>')


def _validation(rec: dict) -> str:
    """The validation mode and, in independent mode, the measured noise floor and the rules on it."""
    v = _d(rec.get("validation"))
    if not v.get("mode"):
        return ""
    out = [f'<h3>Validation</h3><p class="info">mode <b>{e(v.get("mode"))}</b> <span class="muted">'
           f'({e(v.get("source", ""))})</span></p>']
    floor = _d(v.get("noise_floor"))
    if floor:
        over = _d(floor.get("overall"))
        rows = [("measured", f"{floor.get('how', '')}" + (" (cached)" if floor.get("cached") else "")),
                ("tie gap (greedy, top-1)", fmt(floor.get("tie_gap")))]
        rows += [(f"floor {k}", fmt(x)) for k, x in over.items()]
        corpus = _d(floor.get("corpus"))
        rows += [(f"corpus {k}", fmt(x)) for k, x in corpus.items()]
        rows += [(f"rule {k}", f"x {fmt(r.get('multiplier'))}, absolute {fmt(r.get('absolute'))}: "
                               f"{r.get('why', '')}") for k, r in _d(floor.get("rules")).items() if isinstance(r, dict)]
        if floor.get("note"):
            rows.append(("note", floor["note"]))
        body = "".join(f"<tr><th>{e(k)}</th><td>{e(x)}</td></tr>" for k, x in rows)
        out.append(f'<table class="kv"><tbody>{body}</tbody></table>')
    return "".join(out)


def _case(i: int, rec: dict, history_href: str | None = None) -> str:
    st, reason = effective_status(rec)
    bl = _d(rec.get("baseline"))
    anchor = f"{rec.get('case_id', '')}--{rec.get('reference', '')}"
    head = (
        f'<summary><span class="ctitle">{e(rec.get("case_id", "?"))}</span> '
        f'<span class="muted">{e(rec.get("sut", ""))} vs {e(rec.get("reference", ""))} · '
        f"profile {e(rec.get('profile', ''))}</span> {_badge(st, reason, long=True)}"
        + (' <span class="badge bl-regression">REGRESSION</span>' if is_regression(rec) else "")
        + (f' <a class="history" href="{e(history_href)}#{e(anchor)}">history</a>' if history_href else "")
        + "</summary>"
    )
    parts = []
    if reason:
        parts.append(f'<p class="reason reason-{e(st)}"><b>{e("skipped" if st == "skip" else st)}:</b> {e(reason)}</p>')
    info = [f"test <code>{e(rec.get('test_id', ''))}</code>"] if rec.get("test_id") else []
    if rec.get("failed_rung"):
        info.append(f"failed rung <b>{e(rec.get('failed_rung'))}</b>")
    if _num_ok(rec.get("seconds")) and float(rec.get("seconds")) > 0:
        info.append(f"{e(fmt(rec.get('seconds')))} s")
    info.append(
        f"baseline {_baseline_badge(bl)}"
        + (f" <span class='muted'>({e(bl.get('platform'))})</span>" if bl.get("platform") else "")
    )
    if rec.get("schema_version") not in (None, RECORD_SCHEMA):
        info.append(
            f'<span class="bad">record schema {e(rec.get("schema_version"))}, report knows {RECORD_SCHEMA}</span>'
        )
    parts.append('<p class="info">' + " · ".join(info) + "</p>")
    if bl.get("path"):
        parts.append(f'<p class="info muted">baseline file <code>{e(bl.get("path"))}</code></p>')
    changes = [str(c) for c in _l(bl.get("engine_changes"))]
    drift = [str(_d(x).get("metric")) for x in _l(bl.get("reference_drift"))]
    if changes:
        parts.append("<p class='info'>since the baseline: " + "; ".join(e(c) for c in changes) + "</p>")
    if drift:
        parts.append("<p class='info bad'>the reference itself moved since the baseline: "
                     + ", ".join(e(d) for d in drift) + "</p>")
    parts.append(_ladder(rec))
    parts.append(_validation(rec))
    parts.append(_metrics(rec))
    parts.append(_plots(rec))
    parts.append(_localization_detail(rec))
    parts.append(_receipts(rec, st))
    parts.append("<h3>Environment</h3>" + _kv(_d(rec.get("environment"))))
    opened = " open" if st in ("fail", "error") or is_regression(rec) else ""
    regr = " c-regr" if is_regression(rec) else ""
    return (
        f'<details class="case c-{e(st)}{regr}" id="{_anchor(i, rec)}"{opened}>{head}'
        f'<div class="cbody">{"".join(parts)}</div></details>'
    )


CSS = """
:root{--pass:#1b7f3b;--passbg:#e8f5ec;--fail:#b3261e;--failbg:#fdecea;--err:#fff;--errbg:#8e0f0f;
--skip:#5f6368;--skipbg:#eceff1;--regr:#8a5300;--regrbg:#fff3cd;--line:#d0d7de;--muted:#6a737d}
*{box-sizing:border-box}
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Liberation Sans",sans-serif;
color:#1f2328;margin:0;padding:20px 28px;background:#fff}
h1{font-size:22px;margin:0 0 8px}h2{font-size:18px;margin:22px 0 8px}h3{font-size:15px;margin:16px 0 6px}
code{font:12px/1.4 ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;word-break:break-all}
header{border-bottom:1px solid var(--line);padding-bottom:10px}
.counts{display:flex;gap:8px;flex-wrap:wrap;margin:4px 0 8px}
.count{padding:3px 10px;border-radius:12px;border:1px solid var(--line);font-size:13px}
.n-pass{background:var(--passbg);color:var(--pass)}.n-fail{background:var(--failbg);color:var(--fail)}
.n-skip{background:var(--skipbg);color:var(--skip)}.n-error{background:var(--errbg);color:var(--err)}
.n-regr{background:var(--regrbg);color:var(--regr)}
.meta{display:flex;gap:18px;flex-wrap:wrap;color:var(--muted);font-size:13px}
.verdict{font-weight:600;font-size:15px;padding:8px 12px;border-radius:6px;margin:10px 0 0}
.v-pass{background:var(--passbg);color:var(--pass)}
.v-fail{background:var(--failbg);color:var(--fail);border-left:5px solid var(--fail)}
.v-skip{background:var(--skipbg);color:var(--skip)}.v-regr{background:var(--regrbg);color:var(--regr)}
table{border-collapse:collapse;width:100%;margin:4px 0}
th,td{border-bottom:1px solid var(--line);padding:5px 8px;text-align:left;vertical-align:top}
thead th{background:#f6f8fa;font-weight:600;font-size:13px;white-space:nowrap}
table.summary td:first-child a{font-weight:600}
tr.row-fail td{background:var(--failbg)}tr.row-error td{background:#f9e0e0}
tr.row-error td:first-child{box-shadow:inset 5px 0 0 var(--errbg)}
tr.row-fail td:first-child{box-shadow:inset 5px 0 0 var(--fail)}
tr.row-regr td{background:var(--regrbg)}tr.row-regr td:first-child{box-shadow:inset 5px 0 0 #d08c00}
tr.row-skip td{color:var(--skip)}tr.info td{color:#444}
.badge{display:inline-block;padding:1px 7px;border-radius:4px;font-size:12px;font-weight:600;white-space:nowrap;
border:1px solid transparent}
.b-pass{background:var(--passbg);color:var(--pass);border-color:#a6d8b5}
.b-fail{background:#fff;color:var(--fail);border-color:var(--fail)}
.b-error{background:var(--errbg);color:var(--err)}
.b-skip{background:var(--skipbg);color:var(--skip);border-color:#cfd4d8;white-space:normal;font-weight:500}
.b-xfail{background:#fff4e5;color:#8a4b00;border-color:#e0a050}.n-xfail{background:#fff4e5;color:#8a4b00}
.bl-match{background:var(--passbg);color:var(--pass)}.bl-regression{background:#d08c00;color:#fff}
.bl-new{background:#e7f0fd;color:#1a56b0}.bl-none{background:#f1f3f4;color:var(--muted)}
.why{font-size:12px;color:#5a1a16;margin-top:2px}
.num{font-variant-numeric:tabular-nums;font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12.5px}
.ok{color:var(--pass);font-weight:600}.bad{color:var(--fail);font-weight:600}.muted{color:var(--muted)}
.history{font-size:12px;margin-left:6px}
.drift{border-left:3px solid var(--fail);padding:4px 8px;margin:6px 0}
.toolbar{margin:18px 0 6px;display:flex;gap:8px;align-items:center}
.toolbar button{font:inherit;font-size:12px;padding:3px 10px;
border:1px solid var(--line);background:#f6f8fa;border-radius:4px;cursor:pointer}
details.case{border:1px solid var(--line);border-radius:6px;margin:10px 0;background:#fff}
details.case>summary{padding:8px 12px;cursor:pointer;background:#f6f8fa;border-radius:6px;list-style-position:inside}
details.case.c-fail{border-left:5px solid var(--fail)}details.case.c-error{border-left:5px solid var(--errbg)}
details.case.c-skip{border-left:5px solid #b0b6bb}details.case.c-pass{border-left:5px solid var(--pass)}
details.case.c-regr{border-left:5px solid #d08c00}
.ctitle{font-weight:600}
.cbody{padding:4px 14px 14px}
.reason{padding:6px 10px;border-radius:4px}.reason-fail{background:var(--failbg)}.reason-error{background:#f9e0e0}
.reason-skip{background:var(--skipbg);color:#3c4043}
ol.ladder{list-style:none;padding:0;margin:0;display:grid;grid-template-columns:1fr;gap:2px}
.rung{display:grid;grid-template-columns:130px 70px 1fr;gap:8px;padding:3px 8px;border-radius:3px}
.rn{font-weight:600}.rs{font-size:12px;font-weight:600;text-transform:uppercase}
.r-pass{background:var(--passbg)}.r-pass .rs{color:var(--pass)}
.r-fail{background:var(--failbg)}.r-fail .rs{color:var(--fail)}
.r-error{background:#f9e0e0}.r-error .rs{color:#8e0f0f}
.r-skip,.r-notrun,.r-not_supported{background:#f6f8fa;color:var(--muted)}
.plots{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;border:1px solid var(--line);border-radius:4px;padding:4px}
figcaption{font-size:12px;color:var(--muted);padding:0 4px}
svg.plot{display:block;max-width:100%;height:auto}
.pbg{fill:#fbfcfd;stroke:#d0d7de}.grid{stroke:#e6e9ec;stroke-width:1}
.tick{font-size:10px;fill:#57606a;font-family:inherit}.axl{font-size:11px;fill:#57606a}
.series{fill:none;stroke:#1a56b0;stroke-width:1.4}.dot{fill:#1a56b0}.dot.over{fill:#b3261e}
.dot.hollow{fill:#fff;stroke:#1a56b0}
.limit{stroke:#b3261e;stroke-width:1.2;stroke-dasharray:5 3}.limitt{font-size:10px;fill:#b3261e}
.mark{stroke:#d08c00;stroke-width:1.2;stroke-dasharray:2 2}.markt{font-size:10px;fill:#8a5300}
.nonfinite{stroke:#b3261e;stroke-width:2}.bar{fill:#5b8bd0}.bar.zero{fill:#9aa5b1}
table.kv th{width:170px;background:#fafbfc;font-weight:600;font-size:13px}
table.receipts th{width:auto}table.receipts td{width:42%}
code.hash{font-size:11.5px}
footer{margin-top:24px;color:var(--muted);font-size:12px;border-top:1px solid var(--line);padding-top:8px}
"""

JS = """
function setAll(o){document.querySelectorAll('details.case').forEach(function(d){d.open=o;});}
document.querySelectorAll('table.summary a').forEach(function(a){a.addEventListener('click',function(){
var d=document.getElementById(a.getAttribute('href').slice(1));if(d){d.open=true;}});});
"""


def _default_environment() -> dict:
    return {
        "python": sys.version.split()[0],
        "platform": _platform.platform(),
        "machine": _platform.machine(),
        "hostname": _platform.node(),
    }


def render_html(
    records: list[dict],
    title: str,
    generated_at: str | None = None,
    environment: dict | None = None,
    history_href: str | None = None,
) -> str:
    """The report as one self-contained HTML document (str); `history_href` links each case to its charts in
    a history page (harness/history.py)."""
    records = [r for r in records if isinstance(r, dict)]
    if generated_at is None:
        generated_at = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    env = dict(environment) if environment is not None else {}
    ordered = sorted(enumerate(records), key=_sort_key)
    body = [
        _header(records, title, generated_at, env),
        _summary(ordered),
        '<div class="toolbar"><h2 style="margin:0">Cases</h2>'
        '<button type="button" onclick="setAll(true)">expand all</button>'
        '<button type="button" onclick="setAll(false)">collapse all</button></div>',
        "".join(_case(i, rec, history_href) for i, rec in ordered),
        "<h2>Environment of the report</h2>" + _kv(env or _default_environment()),
        f"<footer>bitnet-crossval report · record schema {RECORD_SCHEMA} · {len(records)} records</footer>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
        + "".join(body)
        + f"<script>{JS}</script></body></html>\n"
    )


def write_report(
    records: list[dict],
    path: str | os.PathLike,
    title: str = "bitnet-crossval report",
    generated_at: str | None = None,
    environment: dict | None = None,
    history: str | os.PathLike | None = None,
) -> Path:
    """Write the HTML report to `path` and every record combined to `<stem>.json` beside it; with `history`
    (a history directory) each case links to its charts in `<history>/history.html`.

    Both writes are atomic (temp file in the same directory, then os.replace). Returns the HTML path.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        raise ValueError(f"{path}: the report is HTML; the combined records go to <name>.json beside it")
    if generated_at is None:
        generated_at = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    href = None
    if history is not None:
        href = os.path.relpath(Path(history).resolve() / "history.html", path.resolve().parent)
    html = render_html(records, title, generated_at=generated_at, environment=environment, history_href=href)
    doc = {
        "schema_version": RECORD_SCHEMA,
        "title": title,
        "generated_at": generated_at,
        "environment": environment or _default_environment(),
        "counts": dict(Counter(effective_status(r)[0] for r in records if isinstance(r, dict))),
        "records": list(records),
    }
    json_path = path.with_suffix(".json")
    atomic_write_text(json_path, json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    atomic_write_text(path, html)
    return path
