"""Subcommands of bitnet-xval, in the order `--help` lists them."""

from . import compat_check, crossval, download_model, engines, history, reference, report, run, score, synth

COMMANDS = [crossval, compat_check, synth, download_model, run, score, engines, reference, report, history]
