"""Benchmarks: measured and printed, never asserted (run with `nox -s bench`)."""
