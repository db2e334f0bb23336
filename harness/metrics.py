"""Comparison metrics between a system under test's logits A and a reference's logits B.

Both are float32 [T, V] (one row per position, teacher-forced on the same tokens). Everything is
vectorized numpy, processed in row chunks with reused buffers, two chunks at a time on threads (numpy
releases the GIL in its loops), so that two [512, 128256] matrices compare in well under 2 s on two
cores. Nothing here holds a float64 copy of a whole matrix.

Definitions (Δ = A - B, per position t, vocabulary entries v):

- ``max_abs``: max |Δ| over everything; ``max_abs_per_position``: max_v |Δ_tv|.
- ``max_rel``: max_t ( max_v |Δ_tv| / max_v |B_tv| ). Relative error is taken per position, against
  the row's largest reference logit, and not element by element: logits cross zero all the time, so
  |Δ|/|B| element-wise is unbounded near zero and any floor that tames it is arbitrary; float error in
  a logit row scales with the magnitude of the row (the accumulations behind it), which max |B_row|
  measures. A row of all-zero reference logits gives inf (or nan if Δ is 0 there too).
- ``nmse``: Σ|Δ|² / Σ|B|² over the whole matrix (float64 sums).
- ``cosine_*``: cosine similarity of A_t and B_t, per position, computed in float64 in the form
  1 - cos = (w - u²) / (s (s + 1 + u)), u = B·Δ/|B|², w = |Δ|²/|B|², s = sqrt(1 + 2u + w), which
  has no cancellation, so 1 - cos of 1e-13 is resolved rather than rounded to 0.
- ``kl_*``: KL(P_ref || P_sut) = Σ_v p_B log(p_B / p_A) in float64 (llama-perplexity's KLD, with the
  reference as base). Computed as log1p(Σ p_B expm1(Δ - c)) with c = Σ p_B Δ, which is exactly
  log Σ p_B e^Δ - c = lse(A) - lse(B) - c and keeps full relative precision down to KL ~ 1e-30;
  rows where that form could overflow fall back to explicit log-sum-exp. Percentiles are linear
  interpolation between order statistics, as llama-perplexity computes them.
- ``top1_agreement``: fraction of positions whose argmax (first index among equal maxima, as
  llama.cpp) is the same index in A and B — llama-perplexity's "Same top p".
- ``topk_a_in_b`` / ``topk_b_in_a``: fraction of positions where A's argmax is within B's top-k
  (and vice versa). "Within the top-k" is rank < k with rank = number of entries strictly greater,
  so a token tied with the k-th entry counts as inside: ties are not reported as misses.
- With ``targets`` (targets[t] = the token that follows position t, i.e. ids[t+1]):
  ``dp_*``: Δp = p_A(target) - p_B(target) per scored position (llama-perplexity's Δp, SUT minus
  base), mean ± uncertainty, percentiles, ``dp_rms``; ``ppl_sut``, ``ppl_ref``, ``ln_ppl_ratio``
  = ln(PPL_A / PPL_B), ``ppl_rel_diff`` = |PPL_A / PPL_B - 1|.
- ``histogram``: counts of |Δ| in bins with power-of-two edges [2^e, 2^(e+1)) over the occupied range;
  the first bin [0, edges[1]) holds exact zeros (and anything below 2^-126). Non-finite Δ are counted
  in ``n_nonfinite``, not in the histogram.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Percentiles llama-perplexity prints (fractions); KLD and Δp lists differ slightly.
KL_PERCENTILES = {"p99_9": 99.9, "p99": 99.0, "p95": 95.0, "p90": 90.0, "median": 50.0,
                  "p10": 10.0, "p5": 5.0, "p1": 1.0, "p0_1": 0.1}
DP_PERCENTILES = {"p99_9": 99.9, "p99": 99.0, "p95": 95.0, "p90": 90.0, "p75": 75.0, "median": 50.0,
                  "p25": 25.0, "p10": 10.0, "p5": 5.0, "p1": 1.0, "p0_1": 0.1}

SERIES_KEYS = ("max_abs_per_position", "kl_per_position", "cosine_per_position")

_F64_EXP_BIAS = 1023
_HIST_MIN_EXP = -126  # |Δ| below 2^-126 (float32's smallest normal) lands in the zero bin
_CHUNK_BYTES = 1 << 21  # target float64 bytes per chunk buffer (~2 MiB: stays near cache)


def _mean_unc(x: np.ndarray) -> tuple[float, float]:
    """Mean and its uncertainty as llama-perplexity's mean_and_uncertainty computes them."""
    n = x.size
    if n < 1:
        return math.nan, math.nan
    f = float(x.mean())
    df = float(np.mean(x * x)) - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def _percentiles(values: np.ndarray, prefix: str, table: dict[str, float]) -> dict[str, float]:
    out = {f"{prefix}_max": math.nan, f"{prefix}_min": math.nan}
    out.update({f"{prefix}_{k}": math.nan for k in table})
    if values.size == 0:
        return out
    qs = np.percentile(values, list(table.values()))
    out.update({f"{prefix}_{k}": float(q) for k, q in zip(table, qs)})
    out[f"{prefix}_max"] = float(values.max())
    out[f"{prefix}_min"] = float(values.min())
    return out


class _Buffers:
    """Per-thread scratch, reused across chunks."""

    def __init__(self, rows: int, v: int):
        self.d = np.empty((rows, v), np.float64)
        self.x = np.empty((rows, v), np.float64)
        self.t = np.empty((rows, v), np.float64)
        self.i = np.empty((rows, v), np.int64)
        self.m = np.empty((rows, v), np.bool_)


def _rowdot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, y)


def _chunk(a: np.ndarray, b: np.ndarray, lo: int, hi: int, buf: _Buffers, out: dict[str, np.ndarray],
           hist: np.ndarray) -> None:
    n = hi - lo
    ac, bc = a[lo:hi], b[lo:hi]
    d, x, t, iw, m = buf.d[:n], buf.x[:n], buf.t[:n], buf.i[:n], buf.m[:n]
    r = slice(lo, hi)

    # Δ in float64 (exact: the difference of two float32 fits in 53 bits for any sane exponent gap)
    np.subtract(ac, bc, out=d, dtype=np.float64)
    np.abs(d, out=t)
    out["max_abs"][r] = t.max(axis=1)
    np.right_shift(t.view(np.int64), 52, out=iw)
    hist += np.bincount(iw.ravel(), minlength=2048)
    out["sum_d2"][r] = _rowdot(d, d)

    # argmax / extremes in float32
    ia, ib = ac.argmax(axis=1), bc.argmax(axis=1)
    rows = np.arange(n)
    max_b = bc[rows, ib].astype(np.float64)
    min_b = bc.min(axis=1).astype(np.float64)
    out["argmax_a"][r], out["argmax_b"][r] = ia, ib
    out["maxabs_b"][r] = np.maximum(np.abs(max_b), np.abs(min_b))
    np.greater(bc, bc[rows, ia][:, None], out=m)
    out["rank_a_in_b"][r] = np.count_nonzero(m, axis=1)
    np.greater(ac, ac[rows, ib][:, None], out=m)
    out["rank_b_in_a"][r] = np.count_nonzero(m, axis=1)

    # reference in float64: |B|², B·Δ, then softmax weights e = exp(B - max B)
    np.copyto(x, bc, casting="safe")
    sum_b2 = _rowdot(x, x)
    bd = _rowdot(x, d)
    out["sum_b2"][r] = sum_b2
    out["sum_bd"][r] = bd
    x -= max_b[:, None]
    np.exp(x, out=x)
    s_b = x.sum(axis=1)
    lse_b = max_b + np.log(s_b)
    c = _rowdot(x, d) / s_b  # E_pB[Δ]
    with np.errstate(over="ignore", invalid="ignore"):
        np.subtract(d, c[:, None], out=t)
        np.expm1(t, out=t)
        kl = np.log1p(_rowdot(x, t) / s_b)
    lse_a = lse_b + c + kl
    # fallback: overflow in expm1, or a reference range so wide that p_B underflows where A may not
    bad = ~np.isfinite(kl) | ((max_b - min_b) > 700.0)
    bad &= np.isfinite(c)
    for j in np.flatnonzero(bad):
        arow = ac[j].astype(np.float64)
        ma = arow.max()
        lse_a[j] = ma + math.log(np.exp(arow - ma).sum())
        kl[j] = lse_a[j] - lse_b[j] - c[j]
    out["kl"][r] = np.maximum(kl, 0.0)
    out["lse_a"][r] = lse_a
    out["lse_b"][r] = lse_b


def compare_logits(a, b, targets=None, k: int = 5, *, chunk_rows: int | None = None,
                   threads: int = 2) -> dict:
    """Compare SUT logits `a` with reference logits `b` (both [T, V], float32 preferred).

    `targets`: optional [T] or [T-1] token ids, targets[t] following position t (ids[t+1]); a negative
    entry is not scored. Returns scalar metrics as floats, the per-position series
    ``max_abs_per_position``, ``kl_per_position``, ``cosine_per_position`` as lists, and ``histogram``
    ({"edges": [...], "counts": [...]}); ``scalar_metrics(result)`` keeps the scalars only.
    """
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    if a.ndim == 1:
        a, b = a[None, :], b.reshape(1, -1)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"logits shapes differ or are not [T, V]: {a.shape} vs {b.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    T, V = a.shape
    if T == 0 or V == 0:
        raise ValueError(f"empty logits: {a.shape}")

    rows = chunk_rows or max(1, min(64, _CHUNK_BYTES // (8 * V)))
    f64 = ("max_abs", "sum_d2", "sum_b2", "sum_bd", "maxabs_b", "kl", "lse_a", "lse_b")
    per: dict[str, np.ndarray] = {key: np.empty(T, np.float64) for key in f64}
    for key in ("argmax_a", "argmax_b", "rank_a_in_b", "rank_b_in_a"):
        per[key] = np.empty(T, np.int64)

    starts = list(range(0, T, rows))
    nthreads = max(1, min(threads, len(starts)))
    local = threading.local()
    hists: list[np.ndarray] = []
    lock = threading.Lock()

    def work(lo: int) -> None:
        if not hasattr(local, "buf"):
            local.buf = _Buffers(rows, V)
            local.hist = np.zeros(2048, np.int64)
            with lock:
                hists.append(local.hist)
        _chunk(a, b, lo, min(lo + rows, T), local.buf, per, local.hist)

    if nthreads == 1:
        for lo in starts:
            work(lo)
    else:
        with ThreadPoolExecutor(nthreads) as ex:
            list(ex.map(work, starts))
    hist = np.sum(hists, axis=0)

    res: dict = {"positions": float(T), "vocab": float(V), "k": float(k)}
    max_abs_pp = per["max_abs"]
    res["max_abs"] = float(max_abs_pp.max())
    res["argmax_abs_position"] = float(np.nanargmax(max_abs_pp)) if np.isfinite(max_abs_pp).any() else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = max_abs_pp / per["maxabs_b"]
        res["max_rel"] = float(rel.max())
        sb2, sd2 = float(per["sum_b2"].sum()), float(per["sum_d2"].sum())
        res["nmse"] = sd2 / sb2 if sb2 > 0 else (0.0 if sd2 == 0 else math.inf)
        # cosine via 1 - cos = (w - u²) / (s (s + 1 + u))
        u = per["sum_bd"] / per["sum_b2"]
        w = per["sum_d2"] / per["sum_b2"]
        s = np.sqrt(1.0 + 2.0 * u + w)
        one_minus = np.maximum(w - u * u, 0.0) / (s * (s + 1.0 + u))
        cos = 1.0 - one_minus
    res["cosine_mean"] = float(cos.mean())
    res["cosine_min"] = float(cos.min())
    res["one_minus_cosine_max"] = float(one_minus.max())
    res["n_nonfinite"] = float(hist[2047])

    kl = per["kl"]
    res["kl_mean"], res["kl_mean_unc"] = _mean_unc(kl)
    res.update(_percentiles(kl, "kl", KL_PERCENTILES))

    same = per["argmax_a"] == per["argmax_b"]
    res["top1_agreement"] = float(same.mean())
    res["first_top1_mismatch"] = float(np.argmin(same)) if not same.all() else -1.0
    res["topk_a_in_b"] = float((per["rank_a_in_b"] < k).mean())
    res["topk_b_in_a"] = float((per["rank_b_in_a"] < k).mean())

    if targets is not None:
        res.update(_target_metrics(a, b, np.asarray(targets), per, T, V))

    # histogram of |Δ|: biased float64 exponents -> power-of-two bins
    e_min = _F64_EXP_BIAS + _HIST_MIN_EXP
    finite = hist[:2047].copy()
    zero_bin = int(finite[:e_min].sum())
    occupied = np.flatnonzero(finite[e_min:]) + e_min
    if occupied.size:
        lo_e, hi_e = int(occupied[0]), int(occupied[-1])
        edges = [0.0] + [math.ldexp(1.0, e - _F64_EXP_BIAS) for e in range(lo_e, hi_e + 2)]
        counts = [zero_bin] + [int(c) for c in finite[lo_e:hi_e + 1]]
    else:
        edges, counts = [0.0, math.ldexp(1.0, _HIST_MIN_EXP)], [zero_bin]
    res["histogram"] = {"edges": edges, "counts": counts}
    res["max_abs_per_position"] = max_abs_pp.tolist()
    res["kl_per_position"] = kl.tolist()
    res["cosine_per_position"] = cos.tolist()
    return res


def _target_metrics(a, b, targets, per, T, V) -> dict[str, float]:
    if targets.ndim != 1 or targets.size not in (T, T - 1):
        raise ValueError(f"targets must have length T={T} or T-1, got shape {targets.shape}")
    tg = targets.astype(np.int64)
    if (tg >= V).any():
        raise ValueError(f"target id {int(tg.max())} out of vocabulary range {V}")
    pos = np.flatnonzero(tg >= 0)
    tok = tg[pos]
    nll_a = per["lse_a"][pos] - a[pos, tok].astype(np.float64)
    nll_b = per["lse_b"][pos] - b[pos, tok].astype(np.float64)
    dp = np.exp(-nll_a) - np.exp(-nll_b)
    out: dict[str, float] = {"scored_positions": float(pos.size)}
    out["dp_mean"], out["dp_mean_unc"] = _mean_unc(dp)
    out.update(_percentiles(dp, "dp", DP_PERCENTILES))
    ms, ms_unc = _mean_unc(dp * dp)
    out["dp_rms"] = math.sqrt(ms) if pos.size else math.nan
    out["dp_rms_unc"] = 0.5 / out["dp_rms"] * ms_unc if pos.size and out["dp_rms"] > 0 else 0.0
    out["dp_max_abs"] = float(np.abs(dp).max()) if pos.size else math.nan
    if pos.size:
        ln_ratio = float(nll_a.mean() - nll_b.mean())
        out["ppl_sut"] = math.exp(float(nll_a.mean()))
        out["ppl_ref"] = math.exp(float(nll_b.mean()))
        out["ln_ppl_ratio"] = ln_ratio
        out["ppl_rel_diff"] = abs(math.expm1(ln_ratio))
    else:
        out.update(ppl_sut=math.nan, ppl_ref=math.nan, ln_ppl_ratio=math.nan, ppl_rel_diff=math.nan)
    return out


def scalar_metrics(result: dict) -> dict[str, float]:
    """The scalar metrics of a compare_logits result (for RungResult.metrics)."""
    return {key: v for key, v in result.items() if isinstance(v, float)}


def series(result: dict) -> dict[str, list[float]]:
    """The per-position series of a compare_logits result (for RungResult.series)."""
    return {key: result[key] for key in SERIES_KEYS if key in result}


def _rank(logits: np.ndarray, tok: int) -> int:
    """Number of entries strictly greater than logits[tok] (0 = top; ties share the better rank)."""
    return int(np.count_nonzero(logits > logits[tok]))


def _logits_at(src, i: int):
    if src is None:
        return None
    if callable(src):
        src = src(i)
    arr = np.asarray(src, dtype=np.float32)
    if arr.ndim == 2:
        if i >= arr.shape[0]:
            return None
        arr = arr[i]
    return arr


def compare_greedy(tokens_a, tokens_b, logits_a_at=None, logits_b_at=None, k: int = 5) -> dict:
    """Compare two greedy continuations (A = SUT, B = reference) of the same prompt.

    ``match_rate`` = common prefix length / max(len A, len B) (1.0 for two empty sequences): after the
    first divergence both engines condition on different text, so later positions are not compared.
    ``positional_agreement`` = fraction of equal tokens over the shorter length, for information.

    ``logits_a_at`` / ``logits_b_at``: each engine's logits at the generation steps — a [V] array for
    the divergence step itself, an [N, V] array indexed by step, or a callable step -> [V]. With both,
    the divergence is explained: ``a_token_in_b_topk`` (A's token within B's top-k: rank < k, ties
    count as inside), ``b_token_in_a_topk``, ``gap_a`` = logit_A[tok_A] - logit_A[tok_B] and ``gap_b``
    = logit_B[tok_B] - logit_B[tok_A] (how far each engine was from choosing the other's token), and
    ``tie`` = both tokens within the other's top-k.
    """
    ta, tb = [int(x) for x in tokens_a], [int(x) for x in tokens_b]
    n = max(len(ta), len(tb))
    common = 0
    for x, y in zip(ta, tb):
        if x != y:
            break
        common += 1
    short = min(len(ta), len(tb))
    out: dict = {
        "length_a": len(ta), "length_b": len(tb), "k": k,
        "match_rate": 1.0 if n == 0 else common / n,
        "positional_agreement": 1.0 if short == 0 else sum(x == y for x, y in zip(ta, tb)) / short,
        "matched_prefix": common,
        "first_divergence": None if common == n else common,
        "token_a": None, "token_b": None,
        "a_token_in_b_topk": None, "b_token_in_a_topk": None,
        "rank_a_in_b": None, "rank_b_in_a": None,
        "gap_a": None, "gap_b": None, "tie": None,
    }
    if common == n:
        return out
    i = common
    tok_a = ta[i] if i < len(ta) else None
    tok_b = tb[i] if i < len(tb) else None
    out["token_a"], out["token_b"] = tok_a, tok_b
    la, lb = _logits_at(logits_a_at, i), _logits_at(logits_b_at, i)
    if tok_a is not None and tok_b is not None:
        if lb is not None:
            out["rank_a_in_b"] = _rank(lb, tok_a)
            out["a_token_in_b_topk"] = out["rank_a_in_b"] < k
            out["gap_b"] = float(lb[tok_b]) - float(lb[tok_a])
        if la is not None:
            out["rank_b_in_a"] = _rank(la, tok_b)
            out["b_token_in_a_topk"] = out["rank_b_in_a"] < k
            out["gap_a"] = float(la[tok_a]) - float(la[tok_b])
        if la is not None and lb is not None:
            out["tie"] = bool(out["a_token_in_b_topk"] and out["b_token_in_a_topk"])
    return out


__all__ = ["DP_PERCENTILES", "KL_PERCENTILES", "SERIES_KEYS", "compare_greedy", "compare_logits",
           "scalar_metrics", "series"]
