"""A fake tool that dies by SIGSEGV after printing a little."""

import os
import signal
import sys

if "--version" in sys.argv:
    sys.stderr.write("version: 1 (segv)\n")
    sys.exit(0)
sys.stderr.write("llm_load_tensors: about to crash\n")
sys.stderr.flush()
os.kill(os.getpid(), signal.SIGSEGV)
