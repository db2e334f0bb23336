"""Tolerance defaults, override precedence and sources, checks, and errors for bad input."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from harness.metrics import compare_greedy, compare_logits
from harness.records import Check
from harness.tolerances import DEFAULTS, METRICS, ToleranceError, load_platform_overrides, resolve


def test_every_default_is_a_known_positive_metric_with_a_justification():
    for profile, table in DEFAULTS.items():
        assert {"max_abs", "nmse", "cosine_min", "kl_mean", "top1_agreement", "greedy_match_rate",
                "ppl_rel_diff"} <= set(table["*"]), profile
        for fmt, entries in table.items():
            for name, d in entries.items():
                assert name in METRICS and math.isfinite(d.value) and d.value > 0, (profile, fmt, name)
                # every default stands on a measurement (a number), not on "unmeasured"
                assert re.search(r"(?<!un)measured (<= |~)?[0-9]", d.why), (profile, fmt, name, d.why)


def test_defaults_per_profile_and_format():
    t = resolve("llama-cpp", "tq2_0")
    assert t.max_abs == 1e-4 and t["max_abs"].source == "default:llama-cpp/tq2_0"
    assert t["nmse"].source == "default:llama-cpp/*"
    assert resolve("bitnet-cpp", "i2_s").max_abs == 1e-4
    assert resolve("exact", "f32").max_abs == 1e-4
    assert resolve("exact", "TQ1_0")["max_abs"].limit == 1.0  # format names are case-insensitive
    assert resolve("exact", "i2_s")["max_abs"].source == "default:exact/i2_s"
    assert resolve("exact", "tl2")["max_abs"].source == "default:exact/*"
    assert resolve("exact", "f32")["greedy_match_rate"].limit == 1.0
    assert resolve("exact", "tq2_0")["greedy_match_rate"].limit < 1.0


def test_precedence_default_platform_case_cli():
    plat = {"linux-aarch64-neon": {"max_abs": 2e-4, "nmse": 1e-9, "kl_mean": 1e-7,
                                   "llama-cpp": {"kl_mean": 2e-7}, "llama-cpp/tq2_0": {"kl_mean": 3e-7}},
            "other": {"max_abs": 9.0}}
    case = {"nmse": 5e-9, "min_cosine": 0.9999}
    t = resolve("llama-cpp", "tq2_0", case_overrides=case, case_file="cases/x.toml",
                platform="linux-aarch64-neon", platform_overrides=plat, cli_max_abs=3e-3)
    assert (t.max_abs, t["max_abs"].source) == (3e-3, "cli:--tolerance")
    assert (t["nmse"].limit, t["nmse"].source) == (5e-9, "case:cases/x.toml")
    assert (t["cosine_min"].limit, t["cosine_min"].source) == (0.9999, "case:cases/x.toml")
    assert (t["kl_mean"].limit, t["kl_mean"].source) == (3e-7, "platform:linux-aarch64-neon")
    assert t["top1_agreement"].source == "default:llama-cpp/*"
    # without the CLI, the platform's max_abs applies; another platform's table does not
    t2 = resolve("llama-cpp", "f32", platform="linux-aarch64-neon", platform_overrides=plat)
    assert (t2.max_abs, t2["max_abs"].source) == (2e-4, "platform:linux-aarch64-neon")
    assert t2["kl_mean"].limit == 2e-7  # the profile sub-table, not the tq2_0 one
    assert resolve("llama-cpp", "f32", platform="linux-x86_64-avx512", platform_overrides=plat).max_abs == 1e-4
    # case beats platform
    t3 = resolve("llama-cpp", "f32", {"max_abs": 5e-5}, "cases/y.toml", "linux-aarch64-neon", plat)
    assert (t3.max_abs, t3["max_abs"].source) == (5e-5, "case:cases/y.toml")


def test_platform_overrides_from_toml(tmp_path):
    p = tmp_path / "tolerances.toml"
    p.write_text('["linux-x86_64-avx2"]\nmax_abs = 2e-4\n["linux-x86_64-avx2"."exact/i2_s"]\nmax_abs = 1.5\n')
    plat = load_platform_overrides(p)
    assert resolve("exact", "i2_s", platform="linux-x86_64-avx2", platform_overrides=plat).max_abs == 1.5
    assert resolve("exact", "f32", platform="linux-x86_64-avx2", platform_overrides=plat).max_abs == 2e-4
    (tmp_path / "bad.toml").write_text("max_abs = [")
    with pytest.raises(ToleranceError, match="bad.toml"):
        load_platform_overrides(tmp_path / "bad.toml")


@pytest.mark.parametrize("value", [0, -1e-4, math.inf, math.nan, "1e-4", True, None])
def test_bad_values_name_the_field_and_where(value):
    with pytest.raises(ToleranceError, match=r"cases/x\.toml.*'nmse'"):
        resolve("llama-cpp", "f32", {"nmse": value}, "cases/x.toml")


def test_bad_input_errors():
    with pytest.raises(ToleranceError, match=r"platform overrides \[p1\].*'max_abz'"):
        resolve("llama-cpp", "f32", platform="p1", platform_overrides={"p1": {"max_abz": 1e-4}})
    with pytest.raises(ToleranceError, match=r"cases/x\.toml \[tolerances\]\.exact/tq2_0.*'max_abs'"):
        resolve("exact", "tq2_0", {"exact/tq2_0": {"max_abs": -1.0}}, "cases/x.toml")
    with pytest.raises(ToleranceError, match="fraction"):
        resolve("exact", "f32", {"top1_agreement": 1.5}, "cases/x.toml")
    with pytest.raises(ToleranceError, match="--tolerance"):
        resolve("exact", "f32", cli_max_abs=0.0)
    with pytest.raises(ToleranceError, match="profile"):
        resolve("fast", "f32")
    with pytest.raises(ToleranceError, match="unknown profile table"):
        resolve("exact", "f32", {"exactt": {"max_abs": 1.0}}, "cases/x.toml")
    assert issubclass(ToleranceError, ValueError)


def test_check_builds_records_and_fails_nan():
    rng = np.random.default_rng(0)
    b = rng.standard_normal((8, 100)).astype(np.float32)
    a = b.copy()
    a[5, 3] += np.float32(1e-3)  # breaks max_abs 1e-4 at position 5 only
    m = compare_logits(a, b, targets=rng.integers(0, 100, 8))
    t = resolve("llama-cpp", "f32", case_file="c.toml", cli_max_abs=None)
    checks = t.check(m)
    assert all(isinstance(c, Check) for c in checks)
    by = {c.metric: c for c in checks}
    assert "greedy_match_rate" not in by  # not this rung's metric
    assert not by["max_abs"].passed and by["max_abs"].op == "<=" and by["max_abs"].source == "default:llama-cpp/f32"
    assert by["top1_agreement"].passed and by["top1_agreement"].op == ">="
    assert t.first_bad_position(m["max_abs_per_position"]) == 5
    g = t.check(compare_greedy([1, 2, 3], [1, 2, 4]))
    assert [(c.metric, c.passed) for c in g] == [("greedy_match_rate", False)]
    nan = t.check({"max_abs": math.nan, "cosine_min": math.nan})
    assert [c.passed for c in nan] == [False, False]
    assert resolve("llama-cpp", "f32", cli_max_abs=1e-2).check(m)[0].passed
    assert t.limit("max_abs") == 1e-4 and t.limit("min_cosine") == t["cosine_min"].limit and t.limit("x") is None
    assert set(t.to_json()["max_abs"]) == {"limit", "op", "source", "why"}
