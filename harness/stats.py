"""Statistics of the independent validation mode, with scipy: per-token negative log-likelihoods under
llama-perplexity's convention, a paired comparison of two engines' NLLs on the same tokens, and the rank
correlation of logits per position.

- ``chunk_nll``: the corpus in chunks of `ctx` tokens, each chunk's first token replaced by BOS, the
  second half of each chunk scored (llama-perplexity); NLL_t = -log_softmax(logits_t)[next token]
  (scipy.special.log_softmax, float64).
- ``paired``: d_t = NLL_sut,t - NLL_ref,t. Mean difference with a 95 % bootstrap confidence interval
  (scipy.stats.bootstrap, percentile method, 2000 resamples, fixed seed) and the Wilcoxon signed-rank
  test's two-sided p-value (scipy.stats.wilcoxon; zero differences split between the ranks). The two
  engines are "distinguishable at 95 %" when p < 0.05: their per-token likelihoods differ systematically,
  not only by noise. This is reported, not gated: a legitimately different engine may well be
  distinguishable on enough tokens; the gate is the relative perplexity difference.
- ``spearman_rows``: Spearman's rank correlation of A_t and B_t per position (the ranks of the vocabulary
  by logit; scipy.stats.rankdata, average ranks for ties), its minimum and mean over positions.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special, stats

SEED = 0
BOOTSTRAP_RESAMPLES = 2000


def chunk_logprobs(logits_fn, ids: list[int], ctx: int, bos: int):
    """Per chunk of llama-perplexity's convention: (log-softmax rows of the scored positions, float64; their
    target tokens)."""
    n_chunks = len(ids) // ctx
    if n_chunks < 1:
        raise ValueError(f"perplexity needs at least ctx={ctx} tokens, the corpus has {len(ids)}")
    first = ctx // 2
    for c in range(n_chunks):
        toks = list(ids[c * ctx:(c + 1) * ctx])
        toks[0] = bos
        logp = special.log_softmax(np.asarray(logits_fn(toks), dtype=np.float64), axis=1)
        yield logp[first:ctx - 1], np.asarray(toks[first + 1:ctx])


def chunk_nll(logits_fn, ids: list[int], ctx: int, bos: int) -> np.ndarray:
    """Per-token NLL (nats, float64) of the scored tokens, llama-perplexity's convention."""
    return np.concatenate([-lp[np.arange(len(t)), t] for lp, t in chunk_logprobs(logits_fn, ids, ctx, bos)])


def quantization_cost(exact_fn, engines: dict, ids: list[int], ctx: int, bos: int) -> tuple[dict, dict]:
    """What each engine's arithmetic costs against the mathematical definition (`exact_fn`: bitnet_ref's exact
    profile on the same file), on the scored tokens of llama-perplexity's convention: the exact perplexity,
    and per engine its perplexity's relative excess and the KL divergence KL(exact || engine) per position
    (mean, max). `engines`: name -> logits function. Also returns each engine's per-token NLL (as chunk_nll),
    so a caller needs no second pass over the corpus."""
    nll = {name: [] for name in ("exact", *engines)}
    kl = {name: [] for name in engines}
    streams = {name: chunk_logprobs(fn, ids, ctx, bos) for name, fn in engines.items()}
    for lp_e, t in chunk_logprobs(exact_fn, ids, ctx, bos):
        rows = np.arange(len(t))
        nll["exact"].append(-lp_e[rows, t])
        for name, stream in streams.items():
            lp, _ = next(stream)
            nll[name].append(-lp[rows, t])
            kl[name].append((np.exp(lp_e) * (lp_e - lp)).sum(axis=1))
    ppl = {name: float(np.exp(np.concatenate(v).mean())) for name, v in nll.items()}
    out = {"exact_ppl": ppl["exact"]}
    for name in engines:
        k = np.concatenate(kl[name])
        out[f"{name}_ppl_vs_exact"] = ppl[name] / ppl["exact"] - 1.0
        out[f"{name}_kl_vs_exact_mean"] = float(k.mean())
        out[f"{name}_kl_vs_exact_max"] = float(k.max())
    return out, {name: np.concatenate(nll[name]) for name in engines}


def paired(nll_sut: np.ndarray, nll_ref: np.ndarray) -> dict:
    d = np.asarray(nll_sut, np.float64) - np.asarray(nll_ref, np.float64)
    if d.size < 2:
        raise ValueError(f"a paired test needs at least 2 tokens, got {d.size}")
    out = {"nll_pairs": float(d.size), "nll_mean_diff": float(d.mean())}
    if np.all(d == d[0]):  # no spread (e.g. bit-identical engines): the interval is the point
        out["nll_diff_ci_low"] = out["nll_diff_ci_high"] = float(d[0])
    else:
        ci = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=BOOTSTRAP_RESAMPLES,
                             method="percentile", random_state=np.random.default_rng(SEED)).confidence_interval
        out["nll_diff_ci_low"], out["nll_diff_ci_high"] = float(ci.low), float(ci.high)
    out["wilcoxon_p"] = 1.0 if not np.any(d) else float(stats.wilcoxon(d, zero_method="zsplit").pvalue)
    out["distinguishable_95"] = float(out["wilcoxon_p"] < 0.05)
    return out


def verdict(p: dict) -> str:
    return ("distinguishable at 95 %" if p["distinguishable_95"] else "not distinguishable at 95 %") + (
        f" (Wilcoxon p = {p['wilcoxon_p']:.3g}; mean NLL difference {p['nll_mean_diff']:+.3g} nats, 95 % CI "
        f"[{p['nll_diff_ci_low']:+.3g}, {p['nll_diff_ci_high']:+.3g}], {int(p['nll_pairs'])} tokens)")


def spearman_rows(a: np.ndarray, b: np.ndarray, chunk: int = 16) -> dict:
    """Spearman rank correlation of each position's logits (rows of a and b)."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    rho = np.empty(a.shape[0], np.float64)
    for lo in range(0, a.shape[0], chunk):
        ra = stats.rankdata(a[lo:lo + chunk], axis=1)
        rb = stats.rankdata(b[lo:lo + chunk], axis=1)
        ra -= ra.mean(axis=1, keepdims=True)
        rb -= rb.mean(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            rho[lo:lo + chunk] = (ra * rb).sum(axis=1) / np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    finite = rho[np.isfinite(rho)]
    return {"spearman_min": float(finite.min()) if finite.size else math.nan,
            "spearman_mean": float(finite.mean()) if finite.size else math.nan}


__all__ = ["chunk_nll", "paired", "spearman_rows", "verdict"]
