"""`bitnet-xval history`: how each case × reference metric moved across runs (a history directory written by
`pytest --history=DIR`, `nox -s crossval` or `bitnet-xval report --history DIR`).

Prints one row per series (case, SUT, reference, platform, rung, metric) and one column per run, and names the
runs where a series got worse than in the run before; --html writes the same as SVG line charts with the
engines' versions per run. Exit 0, or 1 when the latest run made a series worse, 2 when the history cannot be
read.
"""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("history", help="metrics of each case across runs, with the runs that made them worse",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", default="out/history", help="the history directory (default: out/history)")
    p.add_argument("--case", help="only this case id")
    p.add_argument("--metric", help="only this metric (e.g. max_abs, or all_logits.max_abs)")
    p.add_argument("--since", help="only runs from this date on (e.g. 2026-12-01)")
    p.add_argument("--html", help="also write the charts to this HTML file")
    p.set_defaults(func=run)


def run(args) -> int:
    from bitnet_ref.atomic import atomic_write_text
    from harness import history as H

    try:
        df = H.select(H.load(args.dir), args.case, args.metric, args.since)
    except (H.HistoryError, ValueError) as e:
        print(f"history: {e}", file=sys.stderr)
        return 2
    print(H.render_text(df))
    if args.html:
        charted = {args.metric.rsplit(".", 1)[-1]} if args.metric else None
        atomic_write_text(args.html, H.render_html(df, charted=charted))
        print(f"history: charts written to {args.html}", file=sys.stderr)
    wide = H.trend(df)
    if wide.empty:
        return 0
    latest = [c for c in wide.columns if c != "changed"][-1]
    worse = wide[wide["changed"].str.split(", ").apply(lambda runs: latest in runs)]
    if len(worse):
        print(f"history: {len(worse)} series got worse in the latest run ({latest})", file=sys.stderr)
        return 1
    return 0
