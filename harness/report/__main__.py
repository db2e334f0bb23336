"""python -m harness.report RECORDS_DIR OUT.html [--title TITLE]: render records written by the plugin."""

from __future__ import annotations

import argparse
import sys

from ..records import read_records
from .html import write_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__)
    ap.add_argument("records_dir", help="directory of record JSON files (one per test)")
    ap.add_argument("out", help="HTML file to write; <name>.json with all records goes beside it")
    ap.add_argument("--title", default="bitnet-crossval report")
    args = ap.parse_args(argv)
    records = read_records(args.records_dir)
    path = write_report(records, args.out, title=args.title)
    print(f"{path}: {len(records)} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
