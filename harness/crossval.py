"""The check ladder for one case and one engine pair (system under test vs reference).

file → weights → tokens → first logits → all positions → greedy → perplexity, stopping at the first
rung that fails and naming it. When a logits rung fails and both engines expose intermediate tensors,
the difference is localized to the first layer and operation that diverges.

A reference that is not available here makes the record a skip with the reason (the variable to set);
a reference that ran without a receipt, or an engine that breaks, makes it an error. Never a pass.
"""

from __future__ import annotations

import math
import platform as _platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bitnet_ref.errors import ERROR, ModelError
from bitnet_ref.formats import format_for
from bitnet_ref.gguf import open_gguf
from bitnet_ref.gguf.validate import validate_file
from bitnet_ref.synth import SynthSpec, synthesize, ternary_weights

from . import capabilities, stats
from . import metrics as M
from . import noise_floor as NF
from .baselines import topk_of
from .cases import Case
from .engines.base import EngineError, NotSupported, ReferenceUnavailable, file_sha256, require_receipt
from .engines.registry import open_engine
from .records import Check, Record, RungResult
from .tolerances import Tolerance, Tolerances
from .validation import resolve_mode

# the tensors localization compares, in graph order: llama.cpp's node names per layer, then the output norm
# and the logits (a name one engine's graph lacks is left out of the comparison)
LOCALIZE_OPS = ("attn_norm", "Qcur", "Kcur", "Vcur", "kqv_out", "attn_sub_norm", "attn_out", "ffn_inp", "ffn_norm",
                "ffn_gate", "ffn_up", "ffn_sub_out", "ffn_sub_norm", "ffn_down", "l_out")
FINAL_OPS = ("result_norm", "result_output")
DEFAULT_LOCALIZE_REL = 1e-5  # when the tolerances have no max_rel


class RungFailed(Exception):
    def __init__(self, result: RungResult):
        super().__init__(result.detail)
        self.result = result


def model_path_for(case: Case, models_dir: Path) -> Path:
    """The case's model file: synthesized into models_dir (deterministic, so reused), a locked download,
    or a path."""
    if "synth" in case.model:
        spec = SynthSpec(**case.model["synth"]).resolved()
        path = models_dir / spec.filename()
        return path if path.exists() else synthesize(spec, models_dir)
    if "trained" in case.model:
        from bitnet_ref.train import ARCH, derived_path, shipped_path

        spec = case.model["trained"]
        return derived_path(spec["format"], models_dir, shipped_path(spec.get("arch", ARCH)))
    if "lock" in case.model:
        from bitnet_ref.hub import download_model

        repo, _, file = case.model["lock"].partition(":")
        return download_model(repo, filename=file or None)
    return Path(case.model["path"])


def unavailable_reason(case: Case, reference: str) -> str | None:
    """Why this pair cannot run on this machine, before anything is loaded (None: it can be tried)."""
    if case.format == "tl1" and reference.startswith("bitnet_cpp") and _platform.machine() not in ("aarch64", "arm64"):
        return ("TL1 kernels are ARM-only: bitnet.cpp compiles them for aarch64 (GGML_BITNET_ARM_TL1); this "
                f"machine is {_platform.machine()}")
    if case.format == "tl2" and reference == "bitnet_cpp_tl2" and "trained" in case.model:
        import os

        from bitnet_ref.train import ARCH, shipped_path
        from harness.references import model_shapes, read_manifest

        build = os.environ.get("BITNET_CPP_TL2_DIR")
        manifest = read_manifest(build) if build else None
        if manifest is not None:
            have = {(int(k[0]), int(k[1])) for k in manifest.get("kernels") or []}
            missing = sorted(set(model_shapes(shipped_path(case.model["trained"].get("arch", ARCH)))) - have)
            if missing:
                return (f"the TL2 build in BITNET_CPP_TL2_DIR={build} has no kernels for the trained model's shapes "
                        f"{missing}: rebuild it with `bitnet-xval reference bitnet.cpp --variant tl2 --model "
                        f"models/trained-bitnet-b1.58-i2_s.gguf` (as .ci/run does)")
    return None


def environment() -> dict:
    return {"python": sys.version.split()[0], "platform": _platform.platform(), "machine": _platform.machine(),
            "hostname": _platform.node()}


# -- the rungs ------------------------------------------------------------------------------------------
def _checks(tol: Tolerances, metrics: dict) -> tuple[list[Check], bool]:
    checks = tol.check(metrics)
    return checks, all(c.passed for c in checks)


def rung_file(path: Path) -> RungResult:
    bad = [f for f in validate_file(path) if f.severity == ERROR]
    if bad:
        return RungResult("file", "fail", f"{len(bad)} validation errors; first: {bad[0]}")
    return RungResult("file", "pass", "validation clean")


def rung_weights(case: Case, path: Path) -> RungResult:
    """Ternary values and scales as stored. For a synthesized model, bit-exact against the generator; for the
    trained model, against the shipped file; otherwise every ternary tensor must decode to values in {-1, 0, 1}
    with finite scales."""
    spec = SynthSpec(**case.model["synth"]).resolved() if "synth" in case.model else None
    if "trained" in case.model:
        from bitnet_ref.train import ARCH, read_model, shipped_path

        shipped = read_model(shipped_path(case.model["trained"].get("arch", ARCH)))[2].ternary
        spec = "shipped"
    n = 0
    with open_gguf(path) as gf:
        for t in gf.tensors:
            fmt = format_for(gf, t)
            if not fmt.ternary:
                continue
            tern = fmt.unpack(gf.tensor_bytes(t), t.shape)
            n += 1
            if spec is not None:
                values, scale = shipped[t.name] if spec == "shipped" else ternary_weights(spec.seed, t.name, t.shape)
                if not np.array_equal(tern.values, values):
                    i = tuple(int(x) for x in np.argwhere(tern.values != values)[0])
                    return RungResult("weights", "fail", f"{t.name}: ternary value at {i} is {tern.values[i]}, "
                                                         f"the generator wrote {values[i]}")
                stored = np.unique(tern.scale[tern.scale != 0]) if tern.scale.ndim else np.array([tern.scale])
                if not (stored.size == 1 and stored[0] == np.float32(scale)):
                    return RungResult("weights", "fail", f"{t.name}: scales {stored[:4]} differ from {scale}")
            elif not np.isfinite(tern.scale).all():
                return RungResult("weights", "fail", f"{t.name}: non-finite scale")
    how = ("bit-exact against the shipped file" if spec == "shipped" else "bit-exact against the generator" if spec
           else "ternary with finite scales")
    return RungResult("weights", "pass", f"{n} ternary tensors {how}", metrics={"ternary_tensors": n})


def rung_tokens(case: Case, sut, ref) -> RungResult:
    for i, prompt in enumerate(case.prompts):
        a, b = sut.tokenize(prompt), ref.tokenize(prompt)
        if a != b:
            j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return RungResult("tokens", "fail",
                              f"prompt {i}: token {j} differs: {a[j:j + 4]} (sut) vs {b[j:j + 4]} (reference); "
                              f"lengths {len(a)} / {len(b)}", first_bad_position=j)
    return RungResult("tokens", "pass", f"{len(case.prompts)} prompts tokenized identically")


def _logits_rung(name: str, a: np.ndarray, b: np.ndarray, targets, tol: Tolerances,
                 tie_gap: float | None = None) -> RungResult:
    """One logits rung. `tie_gap` (independent mode): positions whose argmax differs where the reference's
    top two logits are within it are near-ties, not failures (metric top1_beyond_ties)."""
    m = M.compare_logits(a, b, targets=targets)
    scalars = M.scalar_metrics(m)
    scalars.update(stats.spearman_rows(a, b))
    if tie_gap is not None:
        scalars["top1_beyond_ties"], _ = NF.top1_beyond_ties(a, b, tie_gap)
    checks, ok = _checks(tol, scalars)
    bad = tol.first_bad_position(m["max_abs_per_position"])  # a NaN breaks the limit too
    failed = [c for c in checks if not c.passed]
    detail = (f"{len(m['max_abs_per_position'])} positions, max |Δ| {scalars.get('max_abs', float('nan')):.3g}"
              if ok else
              f"{failed[0].metric} = {failed[0].value:.4g} against {failed[0].op} {failed[0].limit:g} "
              f"({failed[0].source})" + (f"; first position over max_abs: {bad}" if bad is not None else ""))
    if scalars.get("n_nonfinite"):
        detail += f"; {int(scalars['n_nonfinite'])} non-finite differences (NaN or inf logits)"
    return RungResult(name, "pass" if ok else "fail", detail, metrics=scalars, checks=checks, series=M.series(m),
                      histogram=m.get("histogram"), first_bad_position=bad)


def localize(sut, ref, ids: list[int], n_layers: int, tol: Tolerances, failing_sut: np.ndarray,
             failing_ref: np.ndarray, exact=None) -> dict | None:
    """The first captured tensor (layer, operation) where the two engines differ, from one teacher-forced
    pass per engine that captures every intermediate and the final logits, evaluated as the failing logits
    call was (same ids, same micro-batches).

    The answer proves itself: it is given only when each engine's captured final logits (result_output) are
    bit for bit its failing call's logits, so the captured tensors are the ones that produced the failure;
    otherwise the result is inconclusive and says why. A tensor differs when max |Δ| exceeds the rung's
    relative tolerance (max_rel) times the tensor's own scale (max |reference|): hidden states are judged
    relative to their magnitude, not with the logits' absolute limit. None: an engine captures nothing.

    With `exact` (independent mode: bitnet_ref's exact profile on the model), a tensor differs when max |Δ|
    exceeds a multiple of the reference's own distance from the definition there, or a fraction of its
    scale, whichever is larger (harness.noise_floor.RULES["node_max_abs"])."""
    names = [f"{op}-{i}" for i in range(n_layers) for op in LOCALIZE_OPS] + list(FINAL_OPS)
    try:
        caps = {"sut": sut.intermediates(ids, names, missing_ok=True),
                "reference": ref.intermediates(ids, names, missing_ok=True)}
        if exact is not None:
            caps["exact"] = exact.intermediates(ids, names, missing_ok=True)
    except NotSupported:
        return None
    rule = NF.RULES["node_max_abs"]
    rel_limit = tol.limit("max_rel") or DEFAULT_LOCALIZE_REL
    out = {"layer": None, "op": None, "max_abs": None, "rel_limit": rel_limit, "reproduced": False, "nodes": []}
    for who, failing in (("sut", failing_sut), ("reference", failing_ref)):
        got = caps[who].get("result_output")
        if got is None:
            return {**out, "note": f"inconclusive: the {who}'s intermediates pass captures no final logits "
                                   "(result_output), so nothing shows that it reproduces the failing call"}
        if got.size != failing.size or not np.array_equal(got.reshape(failing.shape), failing, equal_nan=True):
            how = (f"max |Δ| {float(np.nanmax(np.abs(got.reshape(failing.shape) - failing))):.3g}"
                   if got.size == failing.size else f"shape {got.shape} against {failing.shape}")
            return {**out, "note": f"inconclusive: the {who}'s intermediates pass does not reproduce its failing "
                                   f"logits call ({how} between them), so its tensors cannot explain the failure"}
    out["reproduced"] = True
    nodes = out["nodes"]
    for name in names:
        if name not in caps["sut"] or name not in caps["reference"]:
            continue  # a node one graph does not have (names differ between llama.cpp generations)
        x, y = caps["sut"][name], caps["reference"][name]
        if x.size != y.size:
            nodes.append({"name": name, "skipped": f"shapes {list(x.shape)} and {list(y.shape)}"})
            continue
        d = float(np.max(np.abs(x.astype(np.float64) - y.reshape(x.shape))))
        scale = float(np.max(np.abs(y)))
        rel = d / scale if scale > 0 else (0.0 if d == 0 else math.inf)
        node = {"name": name, "max_abs": d, "scale": scale, "rel": rel}
        limit_rel = rel_limit
        if exact is not None and name in caps["exact"]:
            fl = float(np.max(np.abs(caps["exact"][name].reshape(x.shape).astype(np.float64) - y.reshape(x.shape))))
            limit_abs = max(rule.multiplier * fl, rule.absolute * scale)
            node.update(floor=fl, limit=limit_abs)
            limit_rel = limit_abs / scale if scale > 0 else 0.0
        nodes.append(node)
        if not rel <= limit_rel:  # NaN breaks it too
            _, _, layer = name.rpartition("-")
            return {**out, "layer": int(layer) if layer.isdigit() else None, "op": name, "max_abs": d, "rel": rel}
    return {**out, "note": f"inconclusive: the pass reproduces the failing logits, yet no captured tensor "
                           f"(result_output included) differs by more than {rel_limit:g} of its scale"}


def rung_greedy(case: Case, sut, ref, ids: list[int], tol: Tolerances) -> RungResult:
    n = case.greedy_tokens
    a, b = sut.generate(ids, n), ref.generate(ids, n)
    j = M.compare_greedy(a, b)["first_divergence"]  # also where one engine stopped and the other went on
    at_a = at_b = None
    if j is not None and j < min(len(a), len(b)):  # the logits where they part: a near-tie is not a bug
        prefix = ids + a[:j]
        at_a, at_b = sut.logits(prefix)[-1], ref.logits(prefix)[-1]
    g = M.compare_greedy(a, b, at_a, at_b)
    scalars = {k: float(v) for k, v in g.items() if np.isscalar(v) and not isinstance(v, bool)}
    checks, ok = _checks(tol, scalars)
    if j is None:
        detail = f"{len(a)} greedy tokens identical"
    elif not ok and g.get("tie"):
        ok = True
        detail = f"diverged at token {j} on a near-tie (each token in the other's top-k): not a bug"
    elif j >= len(a) or j >= len(b):
        short, other, rest = ("sut", "reference", b) if j >= len(a) else ("reference", "sut", a)
        detail = (f"the {short} stopped after {j} tokens (an end token) while the {other} went on with "
                  f"{rest[j:j + 4]}; lengths {len(a)} (sut) / {len(b)} (reference)")
    else:
        detail = f"first divergence at generated token {j}: {a[j]} (sut) vs {b[j]} (reference)"
    return RungResult("greedy", "pass" if ok else "fail", detail, metrics=scalars, checks=checks,
                      first_bad_position=j)


def _greedy_positions(case: Case, sut, ref, ids: list[int], tie_gap: float, ops) -> dict | None:
    """One prompt of the tie-aware greedy rung: the reference's N greedy tokens, the SUT's token at every
    position (free-running, then teacher-forced after each divergence), and which positions are near-ties."""
    b = ref.generate(ids, case.greedy_tokens)
    if not b:
        return None
    rows = ref.logits(ids + b[:-1])[len(ids) - 1:]
    top2 = np.sort(rows, axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    # a near-tie: within the floor's tie gap, or where the reference's own paths (prefill vs decode) disagree
    tie = (gap <= tie_gap) | (rows.argmax(axis=1) != np.asarray(b))
    sut_tok: list[int | None] = [None] * len(b)
    raw_prefix, restarts = None, 0
    if "generate" in ops:
        k = 0
        while k < len(b):
            a = sut.generate(ids + b[:k], len(b) - k)
            j = next((t for t, (x, y) in enumerate(zip(a, b[k:])) if x != y), min(len(a), len(b) - k))
            raw_prefix = j if raw_prefix is None else raw_prefix
            sut_tok[k:k + j] = b[k:k + j]
            if k + j >= len(b):
                break
            sut_tok[k + j] = a[j] if j < len(a) else -1  # -1: the SUT stopped (end token) where the reference went on
            k += j + 1
            restarts += 1
            if restarts > case.teacher_forced_cap:
                break
    else:
        sut_tok = [int(x) for x in sut.logits(ids + b[:-1])[len(ids) - 1:].argmax(axis=1)]
        raw_prefix = next((t for t, (x, y) in enumerate(zip(sut_tok, b)) if x != y), len(b))
    scored = np.array([t is not None for t in sut_tok])
    match = np.array([t == y for t, y in zip(sut_tok, b)])
    return {"b": b, "sut": sut_tok, "gap": gap, "tie": tie, "scored": scored, "match": match,
            "raw_prefix": raw_prefix, "restarts": restarts}


def rung_greedy_tie_aware(case: Case, sut, ref, prompts: list[list[int]], floor: NF.NoiseFloor, ops) -> RungResult:
    """Independent mode: N greedy tokens after every prompt, judged position by position. A position where
    the SUT's token differs and the reference's top two logits are within the floor's tie gap is a
    near-tie, not a failure; after any divergence the SUT continues from the reference's tokens
    (teacher-forced through `generate`, or through `logits` when it has no generate), so every position is
    scored. Raw match rate (free-running common prefix / N, the first prompt's), the agreement over scored
    positions, and the rate excluding near-ties over all prompts, which must be >= 99 % (AC6)."""
    parts = [(i, p) for i, ids in enumerate(prompts)
             if (p := _greedy_positions(case, sut, ref, ids, floor.tie_gap, ops)) is not None]
    if not parts:
        return RungResult("greedy", "fail", "the reference generated no token: nothing to score")
    cat = {k: np.concatenate([p[k] for _, p in parts]) for k in ("scored", "match", "tie")}
    scored, match, tie = cat["scored"], cat["match"], cat["tie"]
    beyond = scored & ~tie
    n_tok = int(sum(len(p["b"]) for _, p in parts))
    metrics = {
        "greedy_match_rate": parts[0][1]["raw_prefix"] / case.greedy_tokens, "greedy_tokens": float(n_tok),
        "prompts": float(len(parts)), "scored_positions": float(scored.sum()),
        "agreement_scored": float(match[scored].mean()) if scored.any() else float("nan"),
        "near_ties": float((scored & tie).sum()), "near_tie_mismatches": float((scored & tie & ~match).sum()),
        "greedy_match_rate_excl_ties": float(match[beyond].mean()) if beyond.any() else 1.0,
        "teacher_forced_restarts": float(sum(p["restarts"] for _, p in parts)), "tie_gap": floor.tie_gap,
        "near_tie_mismatch_gap_max": max((float(p["gap"][p["scored"] & p["tie"] & ~p["match"]].max())
                                          for _, p in parts if (p["scored"] & p["tie"] & ~p["match"]).any()),
                                         default=0.0),
    }
    tol = Tolerance("greedy_match_rate_excl_ties", NF.AC6_GREEDY, ">=",
                    f"independent: AC6 (near-tie: reference's top-two gap <= {floor.tie_gap:.3g})",
                    "the seed's >= 99 % token match", floor=floor.tie_gap)
    check = NF.check(tol, metrics["greedy_match_rate_excl_ties"])
    how = "generate" if "generate" in ops else "teacher-forced logits (no generate)"
    unscored = n_tok - int(scored.sum())
    note = (f"; {unscored} positions unscored (teacher_forced_cap {case.teacher_forced_cap} restarts reached)"
            if unscored else "")
    first_bad = next(((i, int(j), p) for i, p in parts
                      for j in np.flatnonzero(p["scored"] & ~p["tie"] & ~p["match"])[:1]), None)
    if check.passed:
        detail = (f"{n_tok} tokens after {len(parts)} prompts ({how}): raw match {metrics['greedy_match_rate']:.3f} "
                  f"(prompt 0, prefix {parts[0][1]['raw_prefix']}), {int(metrics['near_tie_mismatches'])} near-tie "
                  f"divergences, {metrics['greedy_match_rate_excl_ties']:.3f} excluding near-ties{note}")
    else:
        i, j, p = first_bad
        detail = (f"prompt {i}, generated token {j}: {p['sut'][j]} (sut) vs {p['b'][j]} (reference), whose top-two "
                  f"gap {p['gap'][j]:.3g} is beyond the tie gap {floor.tie_gap:.3g}; match excluding near-ties "
                  f"{metrics['greedy_match_rate_excl_ties']:.3f} < {NF.AC6_GREEDY:g}{note}")
    return RungResult("greedy", "pass" if check.passed else "fail", detail, metrics=metrics, checks=[check],
                      first_bad_position=first_bad[1] if first_bad else None)


def rung_top1_by_generate(case: Case, sut, ref, prompts: list[list[int]], tie_gap: float,
                          tol: Tolerances) -> RungResult:
    """all_logits for an engine without logits: its top-1 at prompt positions, teacher-forced through
    generate(ids[:k], 1) (one call per position: slow), at most case.teacher_forced_cap positions per prompt,
    spread evenly. A disagreement where the reference's top two logits are within `tie_gap` (independent
    mode: the floor's tie gap; bit-exact: 0) is a near-tie."""
    total = agree = near = 0
    first_bad = None
    for i, ids in enumerate(prompts):
        b = ref.logits(ids)
        ks = range(1, len(ids) + 1)
        if len(ids) > case.teacher_forced_cap:
            ks = sorted({int(k) for k in np.linspace(1, len(ids), case.teacher_forced_cap).round()})
        for k in ks:
            got = sut.generate(ids[:k], 1)
            tok = got[0] if got else -1  # -1: the engine stopped (an end token)
            row = b[k - 1]
            top2 = np.sort(row)[-2:]
            total += 1
            if tok == int(row.argmax()):
                agree += 1
            elif float(top2[1] - top2[0]) <= tie_gap:
                near += 1
            elif first_bad is None:
                first_bad = (i, k - 1, tok, int(row.argmax()), float(top2[1] - top2[0]))
    metrics = {"positions_checked": float(total), "top1_agreement": agree / total,
               "near_tie_mismatches": float(near), "top1_beyond_ties": (agree + near) / total}
    if tie_gap > 0:
        t = Tolerance("top1_beyond_ties", NF.AC6_GREEDY, ">=", f"independent: >= {NF.AC6_GREEDY:g} of positions agree "
                      f"or are near-ties (reference's top-two gap <= {tie_gap:.3g})", "AC6, per position",
                      floor=tie_gap)
        check = NF.check(t, metrics["top1_beyond_ties"])
    else:
        t = tol.values.get("top1_agreement") or Tolerance("top1_agreement", 1.0, ">=", "bit-exact", "")
        check = NF.check(t, metrics["top1_agreement"])
    how = f"top-1 only (no logits: teacher-forced through generate, {total} positions)"
    if check.passed:
        detail = f"{how}: agreement {metrics['top1_agreement']:.3f}, {near} near-tie mismatches"
    else:
        i, pos, tok, top, gap = first_bad if first_bad else (0, 0, None, None, 0.0)
        detail = (f"{how}: prompt {i} position {pos}: {tok} (sut) vs {top} (reference, top-two gap {gap:.3g}); "
                  f"{check.metric} {check.value:.3f} against {check.op} {check.limit:g}")
    return RungResult("all_logits", "pass" if check.passed else "fail", detail, metrics=metrics, checks=[check],
                      first_bad_position=first_bad[1] if first_bad else None)


def rung_perplexity(case: Case, sut, ref, tol: Tolerances, ops=frozenset({"perplexity", "logits"}),
                    ppl_tol: Tolerance | None = None, exact=None) -> RungResult:
    """Perplexity of the case's corpus (llama-perplexity's convention), from the engine's own perplexity
    operation or, where it has none, from its logits. Where both engines give logits, the per-token NLLs
    are compared pairwise (harness.stats: bootstrap CI, Wilcoxon signed-rank). `exact`: bitnet_ref's exact
    profile on the same file, to report what each engine's arithmetic costs against it (not judged)."""
    text = Path(case.corpus).read_text(encoding="utf-8")
    ids = ref.tokenize(text)
    pb = ref.perplexity(ids, case.ctx)
    nll_a = nll_b = cost = None
    if "logits" in ops:
        try:
            if exact is not None:  # one pass over the corpus gives the NLLs and the cost
                cost, nll = stats.quantization_cost(exact.logits, {"sut": sut.logits, "reference": ref.logits},
                                                    ids, case.ctx, ids[0])
                nll_a, nll_b = nll["sut"], nll["reference"]
            else:
                nll_b = stats.chunk_nll(ref.logits, ids, case.ctx, ids[0])
                nll_a = stats.chunk_nll(sut.logits, ids, case.ctx, ids[0])
        except NotSupported:
            nll_a = nll_b = cost = None
    if "perplexity" in ops:
        ppl_a, source = sut.perplexity(ids, case.ctx).ppl, "its perplexity operation"
    elif nll_a is not None:
        ppl_a, source = float(np.exp(nll_a.mean())), "its logits (it has no perplexity operation)"
    else:
        raise NotSupported("the system under test has neither perplexity nor logits")
    rel = abs(ppl_a - pb.ppl) / pb.ppl
    metrics = {"ppl_sut": ppl_a, "ppl_reference": pb.ppl, "ppl_rel_diff": rel}
    if ppl_tol is not None:
        checks = [NF.check(ppl_tol, rel)]
        ok = checks[0].passed
    else:
        checks, ok = _checks(tol, metrics)
    detail = f"PPL {ppl_a:.4f} (sut, from {source}) vs {pb.ppl:.4f} (reference), relative difference {rel:.2e}"
    if nll_a is not None:
        p = stats.paired(nll_a, nll_b)
        metrics.update(p)
        detail += "; per-token NLL " + stats.verdict(p)
        if cost is not None:
            metrics.update(cost)
            detail += (f"; cost against the exact profile (PPL {cost['exact_ppl']:.4f}): " + ", ".join(
                f"{who} PPL {cost[f'{who}_ppl_vs_exact']:+.2e}, KL mean {cost[f'{who}_kl_vs_exact_mean']:.2e} "
                f"max {cost[f'{who}_kl_vs_exact_max']:.2e}" for who in ("sut", "reference")))
    return RungResult("perplexity", "pass" if ok else "fail", detail, metrics=metrics, checks=checks)


# -- the whole ladder ------------------------------------------------------------------------------------
def run_ladder(case: Case, reference: str, tol: Tolerances, models_dir: Path, *, sut: str = "bitnet_ref",
               profile: str | None = None, test_id: str = "", open_fn=open_engine,
               validation: str | None = None) -> Record:
    """Run the case's rungs in order for (sut, reference); the record says how far it got and why.
    `open_fn(name, model, profile, options)` opens the engines (the harness's self-tests pass their own).
    `validation`: "bit-exact" | "independent" from the command line (None: the case's, else the default)."""
    profile = profile or case.profile
    record = Record(case_id=case.id, sut=sut, reference=reference, profile=profile, status="pass",
                    test_id=test_id, environment=environment())
    t0 = time.perf_counter()
    try:
        mode, source = resolve_mode(sut, profile, case.validation, validation, case.file)
        record.validation = {"mode": mode, "source": source}
        _ladder(case, reference, tol, models_dir, sut, profile, record, open_fn)
    except ReferenceUnavailable as e:
        record.status, record.reason = "skip", str(e)
    except RungFailed as e:
        record.rungs.append(e.result)
        record.status, record.failed_rung, record.reason = "fail", e.result.rung, e.result.detail
    except (EngineError, ModelError, OSError, ValueError) as e:  # the comparison could not be made
        record.status, record.reason = "error", f"{type(e).__name__}: {e}"
    record.seconds = time.perf_counter() - t0
    return record


def _ladder(case, reference, tol, models_dir, sut_name, profile, record: Record, open_fn) -> None:
    reason = unavailable_reason(case, reference)
    if reason:
        raise ReferenceUnavailable(reason)
    path = model_path_for(case, models_dir)
    record.model = {"path": str(path), "sha256": file_sha256(path), "spec": case.model.get("synth")}

    def run(result: RungResult) -> None:
        if result.status == "fail":
            raise RungFailed(result)
        record.rungs.append(result)

    if "file" in case.rungs:
        run(rung_file(path))
    if "weights" in case.rungs:
        run(rung_weights(case, path))
    with open_gguf(path) as gf:
        block_count = gf.get(f"{gf.architecture}.block_count")
    n_layers = block_count if isinstance(block_count, int) else 0  # for localization
    ref = open_fn(reference, path, "exact", case.reference_options)
    try:
        record.receipts["reference"] = asdict(require_receipt(reference, ref.receipt))
        # the system under test evaluates prompts in the reference's micro-batches, so both take the same path
        sut_options = {k: v for k, v in case.reference_options.items() if k == "n_ubatch"}
        with open_fn(sut_name, path, profile, sut_options) as sut:
            record.receipts["sut"] = asdict(require_receipt(sut_name, sut.receipt))
            _engine_rungs(case, sut, ref, tol, record, run, n_layers, path, models_dir)
            record.receipts = {"sut": asdict(sut.receipt), "reference": asdict(ref.receipt)}
    finally:
        ref.close()


def _engine_rungs(case, sut, ref, tol, record, run, n_layers: int, path, models_dir) -> None:
    independent = record.validation.get("mode") == "independent"
    ops = capabilities.operations(sut)
    name = sut.info().name
    requested = [r for r in capabilities.ENGINE_RUNGS if r in case.rungs]

    def unsupported(rung: str) -> bool:
        why = capabilities.unsupported_reason(rung, ops, name)
        if why:
            record.rungs.append(RungResult(rung, "not_supported", why))
        return why is not None

    if "tokens" in case.rungs and case.prompts and not unsupported("tokens"):
        run(rung_tokens(case, sut, ref))
    prompts = [ref.tokenize(p) for p in case.prompts] + [list(p) for p in case.prompt_ids]
    floor = None
    if independent and requested:
        floor = NF.measure(record.reference, ref, path, prompts, ctx=case.ctx, cache_dir=models_dir,
                           corpus=case.corpus if "perplexity" in case.rungs else None)
        record.validation["noise_floor"] = NF.describe(floor)
    rungs = [r for r in ("first_logits", "all_logits") if r in case.rungs and not unsupported(r)]
    if "logits" not in ops and "all_logits" in rungs:  # top-1 only, through generate
        rungs.remove("all_logits")
        run(rung_top1_by_generate(case, sut, ref, prompts, floor.tie_gap if floor else 0.0, tol))
    outputs = [(ids, sut.logits(ids), ref.logits(ids)) for ids in prompts] if rungs else []
    if outputs:  # kept in the baseline: a later run tells whether the reference itself moved
        record.reference_topk = topk_of(outputs[0][2])
    for rung in rungs:  # every prompt's first position, then every prompt's all positions
        for i, (ids, a, b) in enumerate(outputs):
            if rung == "first_logits":
                a, b = a[:1], b[:1]
            t = NF.logits_tolerances(floor, i, rung, tol) if floor else tol
            result = _logits_rung(rung, a, b, np.asarray(ids[1 : len(a) + 1]) if len(ids) > 1 else None, t,
                                  tie_gap=floor.tie_gap if floor else None)
            result.detail = f"prompt {i}: {result.detail}"
            if result.status == "fail" and n_layers:
                full_a, full_b = outputs[i][1], outputs[i][2]  # what the failing call returned
                loc = result.localization = _localize(sut, ref, ids, n_layers, t, full_a, full_b,
                                                      path if floor else None)
                if loc and loc.get("op"):
                    result.detail += f"; first divergence: {loc['op']}"
                elif loc:
                    result.detail += f"; localization {loc['note']}"
            run(result)
    if "greedy" in case.rungs and prompts and not unsupported("greedy"):
        if floor:
            run(rung_greedy_tie_aware(case, sut, ref, prompts, floor, ops))
        else:
            run(rung_greedy(case, sut, ref, prompts[0], tol))
    if "perplexity" in case.rungs and case.corpus and not unsupported("perplexity"):
        try:
            if case.quantization_cost and "logits" in ops:
                with open_engine("bitnet_ref", path, "exact") as exact:
                    run(rung_perplexity(case, sut, ref, tol, ops, NF.ppl_tolerance(floor) if floor else None,
                                        exact))
            else:
                run(rung_perplexity(case, sut, ref, tol, ops, NF.ppl_tolerance(floor) if floor else None))
        except NotSupported as e:
            record.rungs.append(RungResult("perplexity", "not_supported", f"not supported: {e}"))
    judged = [r for r in record.rungs if r.rung in capabilities.ENGINE_RUNGS and r.status in ("pass", "fail")]
    if requested and not judged:
        raise EngineError(f"nothing to compare: {name} supports none of the rungs {', '.join(requested)} "
                          f"(it declares {', '.join(sorted(ops)) or 'no operations'})")


def _localize(sut, ref, ids, n_layers: int, tol: Tolerances, full_a, full_b, exact_model) -> dict | None:
    """Localization of a failed logits rung; in independent mode against per-tensor noise floors."""
    if exact_model is None:
        return localize(sut, ref, ids, n_layers, tol, full_a, full_b)
    with open_engine("bitnet_ref", exact_model, "exact") as exact:
        return localize(sut, ref, ids, n_layers, tol, full_a, full_b, exact=exact)
