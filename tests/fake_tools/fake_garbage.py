"""A fake tool that exits 0 having printed nothing any parser can use."""

import sys

if "--version" in sys.argv:
    sys.stderr.write("version: 1 (garbage)\n")
    sys.exit(0)
sys.stdout.write("\x00\x01 blorp {not json [ nope\n]]] Final estimate: PPL = banana\n")
sys.stderr.write("GARBAGE-TAIL-MARKER zzz\n")
