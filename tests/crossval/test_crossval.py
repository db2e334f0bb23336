"""The cross-validation suites: one test per (case, reference) from cases/*.toml (see harness/pytest_plugin.py).

    pytest                                  # every default case against its references
    pytest -k tl2 --tolerance 1e-4          # only the TL2 cases, primary logits tolerance 1e-4
    pytest --model my.gguf --reference bitnet_cpp --report-html out/report.html
"""

import pytest

from harness.pytest_plugin import regression_message


class CrossvalError(Exception):
    """The comparison could not be made (an engine broke, or the reference left no receipt)."""


def test_crossval(crossval_pair, crossval_run):
    record = crossval_run(crossval_pair)
    if record.status == "skip":
        pytest.skip(record.reason)
    if record.status == "error":
        raise CrossvalError(record.reason)
    # "xfail" (the case's known reference bug showed) fails here too: the case's strict xfail mark expects it
    mode = record.validation.get("mode", "?")
    assert record.status == "pass", f"failed at rung {record.failed_rung!r} ({mode} validation): {record.reason}"
    regression = regression_message(record)  # correct, but worse than this platform's baseline
    if regression:
        pytest.fail(regression)
