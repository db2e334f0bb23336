"""Inline SVG plots, drawn in Python: no JavaScript, no external assets.

Every string that reaches the SVG goes through `html.escape`; numbers are formatted here.
"""

from __future__ import annotations

import math
from html import escape

W, H = 560, 200  # viewBox of every plot
ML, MR, MT, MB = 62, 14, 12, 34  # margins: left (y labels), right, top, bottom (x labels)
MAX_POINTS = 1500  # longer series are reduced to per-bucket maxima (peaks survive)


def fmt(x: float) -> str:
    """A short, exact-enough number for labels and tables."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x)
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    a = abs(x)
    if a < 1e-2 or a >= 1e5:
        mant, ex = f"{x:.2e}".split("e")
        mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{int(ex)}"
    out = f"{x:.4g}"
    if float(out) != x and abs(abs(float(out)) - 1) < 1e-12:  # 0.999999 must not read as 1
        out = f"{x:.9g}"
    return out


def _finite(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _reduce(values: list[float]) -> list[tuple[int, float | None]]:
    """(position, value) pairs, at most MAX_POINTS; each bucket keeps its largest finite value."""
    n = len(values)
    if n <= MAX_POINTS:
        return [(i, _finite(v)) for i, v in enumerate(values)]
    out = []
    step = n / MAX_POINTS
    for b in range(MAX_POINTS):
        lo, hi = int(b * step), max(int((b + 1) * step), int(b * step) + 1)
        vals = [f for f in (_finite(v) for v in values[lo:hi]) if f is not None]
        best = max(vals) if vals else None
        idx = lo + (vals.index(best) if vals else 0)
        out.append((idx, best))
    return out


def _log_ticks(lo: float, hi: float) -> list[float]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    step = max(1, math.ceil((b - a) / 6))
    return [10.0**e for e in range(a, b + 1, step)]


def _lin_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _frame(title: str, body: list[str], xlabel: str, ylabel: str) -> str:
    return (
        f'<svg class="plot" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
        f'aria-label="{escape(title, quote=True)}">'
        f"<title>{escape(title)}</title>"
        f'<rect x="{ML}" y="{MT}" width="{W - ML - MR}" height="{H - MT - MB}" class="pbg"/>'
        + "".join(body)
        + f'<text x="{(ML + W - MR) / 2:.1f}" y="{H - 4}" class="axl" text-anchor="middle">{escape(xlabel)}</text>'
        f'<text x="12" y="{(MT + H - MB) / 2:.1f}" class="axl" text-anchor="middle" '
        f'transform="rotate(-90 12 {(MT + H - MB) / 2:.1f})">{escape(ylabel)}</text>'
        "</svg>"
    )


def line_plot(
    values: list[float],
    *,
    title: str,
    ylabel: str,
    xlabel: str = "position",
    log: bool = True,
    limit: float | None = None,
    mark: int | None = None,
) -> str:
    """Per-position series as a line with dots; optional horizontal limit line and a marked position.

    Log scale clamps values <= 0 to the bottom of the axis (drawn hollow); non-finite values are
    drawn as red ticks at the top edge so they cannot hide.
    """
    pts = _reduce(list(values))
    n = len(values)
    finite = [v for _, v in pts if v is not None]
    nonfinite = [i for i, v in pts if v is None]
    ys = finite + ([limit] if _finite(limit) is not None else [])
    if log:
        pos = [v for v in ys if v > 0]
        lo = min(pos) if pos else 1e-8
        hi = max(pos) if pos else 1.0
        lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
        if hi <= lo:
            hi = lo * 10

        def fy(v: float) -> float:
            v = max(v, lo)
            return MT + (H - MT - MB) * (1 - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)))

        ticks = _log_ticks(lo, hi)
    else:
        lo = min(ys + [0.0]) if ys else 0.0
        hi = max(ys) if ys else 1.0
        if hi <= lo:
            hi = lo + 1.0

        def fy(v: float) -> float:
            return MT + (H - MT - MB) * (1 - (v - lo) / (hi - lo))

        ticks = _lin_ticks(lo, hi)

    span = max(n - 1, 1)

    def fx(i: float) -> float:
        return ML + (W - ML - MR) * (i / span if n > 1 else 0.5)

    body = []
    for t in ticks:
        y = fy(t)
        body.append(f'<line x1="{ML}" x2="{W - MR}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        body.append(f'<text x="{ML - 4}" y="{y + 3:.1f}" class="tick" text-anchor="end">{escape(fmt(t))}</text>')
    for t in _lin_ticks(0, max(n - 1, 0), 6) if n > 1 else [0]:
        if t != int(t):
            continue
        x = fx(t)
        body.append(f'<text x="{x:.1f}" y="{H - MB + 13}" class="tick" text-anchor="middle">{int(t)}</text>')
    if mark is not None and 0 <= mark < max(n, 1):
        x = fx(mark)
        body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{MT}" y2="{H - MB}" class="mark"/>')
        body.append(f'<text x="{x + 3:.1f}" y="{MT + 10}" class="markt">first bad: {mark}</text>')
    lim = _finite(limit)
    if lim is not None and (not log or lim > 0):
        y = fy(lim)
        body.append(f'<line x1="{ML}" x2="{W - MR}" y1="{y:.1f}" y2="{y:.1f}" class="limit"/>')
        body.append(f'<text x="{W - MR - 3}" y="{y - 3:.1f}" class="limitt" text-anchor="end">limit {fmt(lim)}</text>')
    seg: list[str] = []
    for i, v in pts:
        if v is None:
            if len(seg) > 1:
                body.append(f'<polyline points="{" ".join(seg)}" class="series"/>')
            seg = []
            continue
        seg.append(f"{fx(i):.1f},{fy(v):.1f}")
    if len(seg) > 1:
        body.append(f'<polyline points="{" ".join(seg)}" class="series"/>')
    if len(pts) <= 200:
        for i, v in pts:
            if v is None:
                continue
            over = lim is not None and v > lim
            clamped = log and v <= 0
            cls = "dot over" if over else ("dot hollow" if clamped else "dot")
            body.append(
                f'<circle cx="{fx(i):.1f}" cy="{fy(v):.1f}" r="2.6" class="{cls}">'
                f"<title>position {i}: {escape(fmt(v))}</title></circle>"
            )
    for i in nonfinite:
        x = fx(i)
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{MT}" y2="{MT + 8}" class="nonfinite">'
            f"<title>position {i}: not finite</title></line>"
        )
    ylab = ylabel + (" (log)" if log else "")
    return _frame(title, body, xlabel, ylab)


def histogram_plot(edges: list[float], counts: list[float], *, title: str, xlabel: str = "|Δ|") -> str:
    """Bars over bin edges. The x axis is logarithmic when the edges are positive and span > 2 decades."""
    e = [_finite(v) for v in edges]
    c = [_finite(v) or 0.0 for v in counts]
    if len(e) != len(c) + 1 or any(v is None for v in e) or not c:
        return '<p class="muted">histogram malformed: edges and counts do not match</p>'
    # a first bin [0, e1) (exact zeros, as harness.metrics writes it) is drawn one bin-width left of e1
    zero_bin = len(e) > 2 and e[0] <= 0 < e[1] and all(b > a for a, b in zip(e, e[1:]))
    first = e[1] if zero_bin else e[0]
    log = first > 0 and e[-1] / first > 100
    if log and zero_bin:
        e = [e[1] * e[1] / e[2]] + e[1:]
    lo, hi = e[0], e[-1]
    if hi <= lo:
        hi = lo + 1.0

    def fx(v: float) -> float:
        if log:
            return ML + (W - ML - MR) * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
        return ML + (W - ML - MR) * (v - lo) / (hi - lo)

    top = (max(c) or 1.0) * 1.06

    def fy(v: float) -> float:
        return MT + (H - MT - MB) * (1 - v / top)

    body = []
    for t in _lin_ticks(0, top, 4):
        y = fy(t)
        body.append(f'<line x1="{ML}" x2="{W - MR}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        body.append(f'<text x="{ML - 4}" y="{y + 3:.1f}" class="tick" text-anchor="end">{escape(fmt(t))}</text>')
    for i, cnt in enumerate(c):
        x0, x1 = fx(e[i]), fx(e[i + 1])
        y = fy(cnt)
        span = f"[0, {fmt(e[1])})" if (i == 0 and log and zero_bin) else f"[{fmt(e[i])}, {fmt(e[i + 1])})"
        body.append(
            f'<rect x="{x0 + 0.5:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 0.8):.1f}" '
            f'height="{H - MB - y:.1f}" class="bar{" zero" if (i == 0 and log and zero_bin) else ""}">'
            f"<title>{escape(span)}: {escape(fmt(cnt))}</title></rect>"
        )
    if log and zero_bin:
        x = (fx(e[0]) + fx(e[1])) / 2
        body.append(f'<text x="{x:.1f}" y="{H - MB + 13}" class="tick" text-anchor="middle">0</text>')
    xt = _log_ticks(lo, hi) if log else _lin_ticks(lo, hi, 5)
    for t in xt:
        if t < (e[1] if (log and zero_bin) else lo) * (1 - 1e-9) or t > hi * (1 + 1e-9):
            continue
        x = fx(t)
        body.append(f'<text x="{x:.1f}" y="{H - MB + 13}" class="tick" text-anchor="middle">{escape(fmt(t))}</text>')
    return _frame(title, body, xlabel + (" (log)" if log else ""), "count")
