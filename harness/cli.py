"""`bitnet-xval`: the command line of bitnet-crossval. (Each subcommand lives in harness/commands/<name>.py,
whose `add_parser(subparsers)` registers it and sets `func(args) -> exit code`.)"""

from __future__ import annotations

import argparse
import sys

from .commands import COMMANDS

DESCRIPTION = """\
Cross-validation and conformance for BitNet b1.58 inference: check a model file, synthesize or download
models, build the reference engines (bitnet.cpp, llama.cpp's tools), run and score with the Python engine.
`bitnet-xval COMMAND --help` explains each command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitnet-xval", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
