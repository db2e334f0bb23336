"""harness.metrics against hand-computed and naively computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from harness.metrics import compare_greedy, compare_logits, scalar_metrics, series


def naive(a, b, targets=None):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    la = a64 - np.log(np.exp(a64 - a64.max(1, keepdims=True)).sum(1, keepdims=True)) - a64.max(1, keepdims=True)
    lb = b64 - np.log(np.exp(b64 - b64.max(1, keepdims=True)).sum(1, keepdims=True)) - b64.max(1, keepdims=True)
    kl = (np.exp(lb) * (lb - la)).sum(1)
    d = a64 - b64
    cos = (a64 * b64).sum(1) / np.sqrt((a64 * a64).sum(1) * (b64 * b64).sum(1))
    out = {"kl": kl, "cos": cos, "nmse": (d * d).sum() / (b64 * b64).sum(),
           "max_abs_pp": np.abs(d).max(1), "rel": np.abs(d).max(1) / np.abs(b64).max(1)}
    if targets is not None:
        pos = np.arange(len(targets))
        out["dp"] = np.exp(la[pos, targets]) - np.exp(lb[pos, targets])
        out["ppl_a"] = math.exp(-la[pos, targets].mean())
        out["ppl_b"] = math.exp(-lb[pos, targets].mean())
    return out


def test_identical_logits_give_zero_and_one():
    rng = np.random.default_rng(1)
    b = rng.standard_normal((7, 50)).astype(np.float32)
    r = compare_logits(b.copy(), b, targets=rng.integers(0, 50, 7), k=3)
    for key in ("max_abs", "max_rel", "nmse", "kl_mean", "kl_max", "kl_min", "dp_mean", "dp_rms", "dp_max_abs",
                "ppl_rel_diff", "ln_ppl_ratio", "one_minus_cosine_max"):
        assert r[key] == 0.0, key
    for key in ("cosine_min", "cosine_mean", "top1_agreement", "topk_a_in_b", "topk_b_in_a"):
        assert r[key] == 1.0, key
    assert r["first_top1_mismatch"] == -1.0
    assert r["histogram"]["counts"] == [7 * 50] and r["histogram"]["edges"][0] == 0.0
    assert r["ppl_sut"] == r["ppl_ref"]


def test_against_naive_float64_computation():
    rng = np.random.default_rng(2)
    b = (rng.standard_normal((33, 1000)) * 4).astype(np.float32)
    a = (b + rng.standard_normal(b.shape) * 0.3).astype(np.float32)
    tg = rng.integers(0, 1000, 33)
    r = compare_logits(a, b, tg, chunk_rows=5)  # chunks that do not divide T, on threads
    n = naive(a, b, tg)
    np.testing.assert_allclose(r["kl_per_position"], n["kl"], rtol=1e-9)
    np.testing.assert_allclose(r["cosine_per_position"], n["cos"], rtol=1e-12)
    np.testing.assert_allclose(r["max_abs_per_position"], n["max_abs_pp"], rtol=0)
    assert r["nmse"] == pytest.approx(n["nmse"], rel=1e-10)
    assert r["max_rel"] == pytest.approx(n["rel"].max(), rel=1e-12)
    assert r["kl_mean"] == pytest.approx(n["kl"].mean(), rel=1e-9)
    assert r["kl_median"] == pytest.approx(np.median(n["kl"]), rel=1e-9)
    assert r["kl_p99"] == pytest.approx(np.percentile(n["kl"], 99), rel=1e-9)
    assert r["dp_mean"] == pytest.approx(n["dp"].mean(), rel=1e-8, abs=1e-15)
    assert r["dp_rms"] == pytest.approx(np.sqrt((n["dp"] ** 2).mean()), rel=1e-8)
    assert r["dp_p0_1"] == pytest.approx(np.percentile(n["dp"], 0.1), rel=1e-8, abs=1e-15)
    assert r["ppl_sut"] == pytest.approx(n["ppl_a"], rel=1e-10)
    assert r["ppl_rel_diff"] == pytest.approx(abs(n["ppl_a"] / n["ppl_b"] - 1), rel=1e-8)
    same = a.argmax(1) == b.argmax(1)
    assert r["top1_agreement"] == same.mean()
    assert sum(r["histogram"]["counts"]) == a.size
    assert all(len(r[key]) == 33 for key in series(r))
    assert all(isinstance(v, float) for v in scalar_metrics(r).values())


def test_known_kl_of_two_point_distributions():
    # reference p = (0.5, 0.5); SUT q = softmax(ln 3, 0) = (0.75, 0.25): KL = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25)
    b = np.zeros((1, 2), np.float32)
    a = np.array([[math.log(3.0), 0.0]], np.float32)
    r = compare_logits(a, b, targets=[0])
    expect = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0)
    assert r["kl_mean"] == pytest.approx(expect, rel=1e-7)
    assert r["dp_mean"] == pytest.approx(0.25, rel=1e-7)  # p_sut(tok 0) - p_ref(tok 0)
    assert r["ppl_sut"] == pytest.approx(4 / 3, rel=1e-7) and r["ppl_ref"] == pytest.approx(2.0)


def test_shift_of_a_whole_row_is_not_a_distribution_change():
    b = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    r = compare_logits(b + np.float32(0.5), b)
    assert r["kl_max"] < 1e-14 and r["max_abs"] == pytest.approx(0.5)


def test_tiny_differences_are_resolved_not_rounded_away():
    rng = np.random.default_rng(4)
    b = (rng.standard_normal((3, 4096)) * 3).astype(np.float32)
    a = b.copy()
    a[:, 7] = np.nextafter(a[:, 7], np.float32(np.inf))
    r = compare_logits(a, b)
    # cosine itself rounds to 1.0 at this size; 1 - cos is kept separately
    assert 0 < r["kl_min"] and 0 < r["nmse"] < 1e-12 and 0 < r["one_minus_cosine_max"] < 1e-15


def test_extreme_mismatch_uses_the_fallback():
    b = np.zeros((2, 8), np.float32)
    a = b.copy()
    a[0, 3] = 2000.0  # exp overflow in the expm1 form
    r = compare_logits(a, b)
    # p = uniform over 8; q puts ~all mass on index 3: KL = 7/8 * 2000 - ln 8
    assert r["kl_per_position"][0] == pytest.approx(7 / 8 * 2000.0 - math.log(8), rel=1e-9)
    assert r["kl_per_position"][1] == 0.0


def test_nan_propagates_and_is_counted():
    b = np.zeros((2, 8), np.float32)
    a = b.copy()
    a[1, 2] = np.nan
    r = compare_logits(a, b)
    assert math.isnan(r["max_abs"]) and r["n_nonfinite"] == 1.0 and sum(r["histogram"]["counts"]) == 15


def test_topk_containment_counts_ties_as_inside():
    b = np.array([[5, 5, 5, 1, 0, 0]], np.float32)  # three-way tie at the top of B
    a = np.array([[0, 0, 9, 0, 0, 0]], np.float32)  # A picks index 2, B's argmax is index 0
    r = compare_logits(a, b, k=1)
    assert r["top1_agreement"] == 0.0 and r["first_top1_mismatch"] == 0.0
    assert r["topk_a_in_b"] == 1.0  # nothing in B is strictly above b[2]
    assert r["topk_b_in_a"] == 0.0  # a[0] is below a[2]
    assert compare_logits(a, b, k=2)["topk_b_in_a"] == 1.0


def test_targets_length_and_skipping():
    rng = np.random.default_rng(5)
    b = rng.standard_normal((6, 10)).astype(np.float32)
    a = b + np.float32(0.1) * rng.standard_normal((6, 10)).astype(np.float32)
    r = compare_logits(a, b, targets=[1, 2, -1, 4, 5])  # T-1 targets, one skipped
    assert r["scored_positions"] == 4.0
    with pytest.raises(ValueError):
        compare_logits(a, b, targets=[1, 2])
    with pytest.raises(ValueError):
        compare_logits(a, b, targets=[10] * 6)
    with pytest.raises(ValueError):
        compare_logits(a, b[:, :9])


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(2, 40)),
                  elements=st.floats(-30, 30, width=32)),
       st.data())
def test_kl_nonnegative_and_zero_only_when_equal(b, data):
    a = data.draw(hnp.arrays(np.float32, b.shape, elements=st.floats(-30, 30, width=32)))
    r = compare_logits(a, b)
    kl = np.array(r["kl_per_position"])
    assert (kl >= 0).all()
    assert compare_logits(b, b)["kl_max"] == 0.0
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    pa = np.exp(a64 - a64.max(1, keepdims=True))
    pa /= pa.sum(1, keepdims=True)
    pb = np.exp(b64 - b64.max(1, keepdims=True))
    pb /= pb.sum(1, keepdims=True)
    tv = 0.5 * np.abs(pa - pb).sum(1)  # Pinsker: KL >= 2 TV², so distinct distributions give KL > 0
    assert (kl >= 2 * tv * tv * (1 - 1e-6) - 1e-12).all()
    assert ((tv > 1e-6) <= (kl > 0)).all()


def test_greedy_identical_and_first_divergence_with_topk_flags():
    assert compare_greedy([1, 2, 3], [1, 2, 3])["match_rate"] == 1.0
    assert compare_greedy([], [])["first_divergence"] is None
    V = 10
    la = np.zeros((4, V), np.float32)
    lb = np.zeros((4, V), np.float32)
    la[2, 7], la[2, 4] = 3.0, 2.5  # A picks 7, B's token 4 is A's second
    lb[2, 4], lb[2, 7] = 3.0, 2.99  # B picks 4, A's token 7 is B's second
    g = compare_greedy([1, 2, 7, 9], [1, 2, 4, 9], la, lb, k=2)
    assert g["first_divergence"] == 2 and g["matched_prefix"] == 2 and g["match_rate"] == 0.5
    assert g["positional_agreement"] == 0.75
    assert (g["token_a"], g["token_b"]) == (7, 4)
    assert g["a_token_in_b_topk"] and g["b_token_in_a_topk"] and g["tie"]
    assert g["gap_a"] == pytest.approx(0.5) and g["gap_b"] == pytest.approx(0.01, abs=1e-6)
    g1 = compare_greedy([1, 2, 7, 9], [1, 2, 4, 9], la[2], lambda i: lb[i], k=1)  # [V] and callable forms
    assert g1["rank_a_in_b"] == 1 and g1["a_token_in_b_topk"] is False and g1["tie"] is False
    g2 = compare_greedy([1, 2, 7], [1, 2, 4], None, lb, k=2)  # one side's logits only
    assert g2["a_token_in_b_topk"] is True and g2["b_token_in_a_topk"] is None and g2["tie"] is None


def test_greedy_one_sequence_stops_early():
    g = compare_greedy([1, 2], [1, 2, 3, 4])
    assert g["first_divergence"] == 2 and g["match_rate"] == 0.5 and g["token_a"] is None and g["token_b"] == 3
    assert g["positional_agreement"] == 1.0
