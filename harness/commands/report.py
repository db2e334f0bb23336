"""`bitnet-xval report`: one HTML report (and one history entry) from the records of several runs, e.g. the
jobs of a CI matrix that each uploaded their `--records` directory. Each record keeps its own platform and
receipts. Exit 0, 2 when a directory holds no record or cannot be read.
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="merge the records of several runs into one HTML report (and history)",
                       description=__doc__)
    p.add_argument("dirs", nargs="+", help="record directories (each holds one JSON file per record)")
    p.add_argument("-o", "--output", default="out/crossval/merged.html", help="the HTML report to write")
    p.add_argument("--history", help="also append the merged run to this history directory")
    p.add_argument("--title", default="bitnet-crossval report")
    p.set_defaults(func=run)


def run(args) -> int:
    from harness.records import read_records
    from harness.report import write_report

    records: list[dict] = []
    for d in args.dirs:
        if not Path(d).is_dir():
            print(f"report: {d} is not a directory of records", file=sys.stderr)
            return 2
        try:
            found = read_records(d)
        except (OSError, ValueError) as e:
            print(f"report: cannot read the records in {d}: {e}", file=sys.stderr)
            return 2
        if not found:
            print(f"report: {d} holds no record (*.json with a case_id)", file=sys.stderr)
            return 2
        records += found
    records.sort(key=lambda r: (r.get("test_id") or r.get("case_id", ""), str(r.get("environment", {}))))
    path = write_report(records, args.output, title=args.title, history=args.history)
    print(f"report: {len(records)} records from {len(args.dirs)} directories -> {path}")
    if args.history:
        from harness import history as H

        run_id = H.append_run(args.history, records)
        H.write_html(args.history)
        print(f"report: history {args.history}: run {run_id}")
    return 0
