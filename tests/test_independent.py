"""Validation modes, the noise floor, capability-aware rungs, the statistics and the JSON-lines
intermediates op (harness/validation.py, noise_floor.py, capabilities.py, stats.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from harness import noise_floor as NF
from harness import stats
from harness.cases import CASES_DIR, Case, CaseError, load_case_file
from harness.crossval import run_ladder
from harness.engines.jsonl import JsonlEngine
from harness.engines.registry import open_engine
from harness.tolerances import resolve
from harness.validation import ValidationError, default_mode, resolve_mode

TESTS = Path(__file__).parent
MUTANT = TESTS / "mutant_engine.py"
PROMPT = "The quick brown fox jumps over the lazy dog."
I2S = {"synth": {"preset": "tiny", "arch": "bitnet-b1.58", "format": "i2_s"}}
REF = "bitnet_ref:bitnet-cpp"


def mutant(variant: str, operations: str | None = None) -> str:
    return (f"jsonl:{sys.executable} {MUTANT} {variant} --model {{model}} --format i2_s"
            + (f" --operations {operations}" if operations else ""))


def case(**kw) -> Case:
    base = dict(id="independent", file="(test)", model=I2S, references=[REF], profile="exact", prompts=[PROMPT],
                greedy_tokens=16, rungs=["tokens", "first_logits", "all_logits", "greedy"])
    base.update(kw)
    return Case(**base)


def ladder(c: Case, sut: str, models_dir: Path, **kw):
    return run_ladder(c, REF, resolve(c.profile, c.format), models_dir, sut=sut, **kw)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("independent-models")


# -- modes ----------------------------------------------------------------------------------------------
def test_default_mode_follows_the_engine():
    assert default_mode("bitnet_ref", "bitnet-cpp") == "bit-exact"
    assert default_mode("bitnet_ref", "llama-cpp") == "bit-exact"
    assert default_mode("bitnet_ref", "exact") == "bit-exact"  # the exact profile's own measured defaults
    assert default_mode("jsonl:./engine", "bitnet-cpp") == "independent"
    assert resolve_mode("jsonl:x", "exact", case_mode="bit-exact", case_file="c.toml") == ("bit-exact", "case:c.toml")
    assert resolve_mode("jsonl:x", "exact", "bit-exact", "independent") == ("independent", "cli:--validation")
    with pytest.raises(ValidationError, match="unknown validation mode 'loose'"):
        resolve_mode("bitnet_ref", "exact", cli_mode="loose")


def test_case_field_validation(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[[case]]\nid = "a"\nmodel = { synth = { preset = "tiny" } }\nprompts = ["x"]\n'
                 'validation = "independent"\nteacher_forced_cap = 4\n', encoding="utf-8")
    (c,) = load_case_file(f)
    assert c.validation == "independent" and c.teacher_forced_cap == 4
    f.write_text('[[case]]\nid = "a"\nmodel = { synth = { preset = "tiny" } }\nprompts = ["x"]\nvalidation = "x"\n',
                 encoding="utf-8")
    with pytest.raises(CaseError, match="field 'validation'.*unknown mode 'x'"):
        load_case_file(f)


# -- the floor, the limits, the record --------------------------------------------------------------------
def test_a_legitimate_engine_passes_independent_and_fails_bit_exact(models_dir):
    """float activations (bitnet_ref's exact profile) over the protocol: the verdict of the issue's first
    user, wrong under bit-exact limits (max |Δ| 0.27 > 1e-4), right in independent mode, the default."""
    c = case()
    r = ladder(c, mutant("float-activations"), models_dir)
    assert r.status == "pass", r.reason
    assert r.validation["mode"] == "independent" and r.validation["source"] == "default"
    floor = r.validation["noise_floor"]
    assert floor["overall"]["max_abs"] > 0.1 and floor["tie_gap"] > 0  # the reference is far from the definition
    check = next(ch for ch in r.rungs[1].checks if ch.metric == "max_abs")
    assert check.floor == pytest.approx(floor["prompts"][0]["first"]["max_abs"])
    assert check.multiplier == NF.RULES["max_abs"].multiplier
    assert check.limit == pytest.approx(check.floor * check.multiplier) and check.source.startswith("noise-floor")
    assert "spearman_min" in r.rungs[1].metrics
    strict = ladder(c, mutant("float-activations"), models_dir, validation="bit-exact")
    assert strict.status == "fail" and strict.failed_rung == "first_logits"
    assert strict.validation == {"mode": "bit-exact", "source": "cli:--validation"}


def test_the_floor_is_cached_per_model_reference_and_prompts(models_dir):
    c = case(prompts=["Cache me if you can."], rungs=["first_logits"])
    r1 = ladder(c, mutant("float-activations"), models_dir)
    r2 = ladder(c, mutant("bf16-embedding"), models_dir)
    assert r1.status == r2.status == "pass"
    key = r1.validation["noise_floor"]["key"]
    assert r2.validation["noise_floor"]["cached"] and r2.validation["noise_floor"]["key"] == key
    files = list((models_dir / "noise-floors").glob("*.json"))
    assert any(json.loads(f.read_text())["key"] == r1.validation["noise_floor"]["key"] for f in files)
    r3 = ladder(case(prompts=["Another prompt."], rungs=["first_logits"]), mutant("float-activations"), models_dir)
    assert r3.validation["noise_floor"]["key"] != r1.validation["noise_floor"]["key"]


def test_the_floor_key_names_the_exact_profiles_order(monkeypatch):
    """A floor measured under other exact-profile summation orders (exact_sum.ORDER_VERSION) is not reused."""
    args = ("ab" * 32, "llama_cpp", "v1 sha", [[1, 2, 3]], None, 128)
    key = NF.cache_key(*args)
    monkeypatch.setattr(NF, "EXACT_ORDER_VERSION", NF.EXACT_ORDER_VERSION + 1)
    assert NF.cache_key(*args) != key


def test_a_planted_bug_fails_and_says_where(models_dir):
    r = ladder(case(), mutant("sub-norm-skipped"), models_dir)
    assert r.status == "fail" and r.failed_rung == "first_logits"
    assert r.rungs[-1].localization["op"] == "ffn_sub_norm-0"
    nodes = r.rungs[-1].localization["nodes"]
    assert all("floor" in n and "limit" in n for n in nodes)  # per-tensor floors in independent mode
    assert "first divergence: ffn_sub_norm-0" in r.reason


def test_cli_and_case_tolerances_still_win_in_independent_mode(models_dir):
    c = case(rungs=["first_logits"])
    r = run_ladder(c, REF, resolve("exact", "i2_s", cli_max_abs=1e-6), models_dir, sut=mutant("float-activations"))
    assert r.status == "fail"
    check = next(ch for ch in r.rungs[-1].checks if ch.metric == "max_abs")
    assert check.limit == 1e-6 and check.source.startswith("cli")
    c = case(rungs=["first_logits"], tolerances={"kl_max": 1e-9})
    r = run_ladder(c, REF, resolve("exact", "i2_s", case_overrides=c.tolerances, case_file="c.toml"), models_dir,
                   sut=mutant("float-activations"))
    assert r.status == "fail" and "kl_max" in r.reason and "case:c.toml" in r.reason


# -- capabilities --------------------------------------------------------------------------------------------
def test_a_greedy_only_engine_gets_a_verdict_from_its_greedy_rung(models_dir):
    c = case(corpus=str(CASES_DIR / "corpus" / "small.txt"), teacher_forced_cap=10,
             rungs=["tokens", "first_logits", "all_logits", "greedy", "perplexity"])
    r = ladder(c, mutant("float-activations", "generate"), models_dir)
    assert r.status == "pass", r.reason
    status = {x.rung: x.status for x in r.rungs}
    assert status == {"tokens": "not_supported", "first_logits": "not_supported", "all_logits": "pass",
                      "greedy": "pass", "perplexity": "not_supported"}
    top1 = next(x for x in r.rungs if x.rung == "all_logits")
    assert "teacher-forced through generate" in top1.detail and top1.metrics["positions_checked"] == 10  # the cap
    broken = ladder(case(rungs=["all_logits"]), mutant("sub-norm-skipped", "generate"), models_dir)
    assert broken.status == "fail" and broken.failed_rung == "all_logits" and "top-two gap" in broken.reason
    bug = ladder(case(greedy_tokens=32), mutant("kv-position-off-by-one", "generate"), models_dir)
    assert bug.status == "fail" and bug.failed_rung == "greedy", bug.reason
    assert "beyond the tie gap" in bug.reason


def test_logits_only_engine_gets_greedy_and_perplexity_from_logits(models_dir):
    c = case(corpus=str(CASES_DIR / "corpus" / "small.txt"), rungs=["tokens", "all_logits", "greedy", "perplexity"])
    r = ladder(c, mutant("float-activations", "logits"), models_dir)
    assert r.status == "pass", r.reason
    by = {x.rung: x for x in r.rungs}
    assert by["tokens"].status == "not_supported"
    assert "teacher-forced logits" in by["greedy"].detail
    assert "from its logits" in by["perplexity"].detail
    assert {"wilcoxon_p", "nll_diff_ci_low", "nll_diff_ci_high"} <= set(by["perplexity"].metrics)


def test_nothing_to_compare_is_an_error(models_dir):
    r = ladder(case(), mutant("float-activations", "detokenize"), models_dir)  # neither logits nor generate
    assert r.status == "error" and "nothing to compare" in r.reason
    assert all(x.status == "not_supported" for x in r.rungs)


# -- statistics -------------------------------------------------------------------------------------------------
def test_paired_statistics_tell_noise_from_a_shift():
    rng = np.random.default_rng(1)
    ref = rng.gamma(2.0, 2.0, 400)
    same = stats.paired(ref + rng.normal(0, 0.01, 400), ref)
    shifted = stats.paired(ref + 0.05 + rng.normal(0, 0.01, 400), ref)
    assert not same["distinguishable_95"] and same["nll_diff_ci_low"] < 0 < same["nll_diff_ci_high"]
    assert shifted["distinguishable_95"] and shifted["wilcoxon_p"] < 1e-6
    assert 0.04 < shifted["nll_diff_ci_low"] < 0.05 < shifted["nll_diff_ci_high"] < 0.06
    assert stats.paired(ref, ref)["wilcoxon_p"] == 1.0
    assert "not distinguishable at 95 %" in stats.verdict(same)


def test_spearman_rows():
    a = np.arange(12, dtype=np.float32).reshape(2, 6)
    out = stats.spearman_rows(a, a * 3 + 1)
    assert out["spearman_min"] == pytest.approx(1.0)
    out = stats.spearman_rows(a, -a)
    assert out["spearman_mean"] == pytest.approx(-1.0)


def test_chunk_nll_matches_the_engines_perplexity(models_dir):
    from harness.crossval import model_path_for

    path = model_path_for(case(), models_dir)
    with open_engine("bitnet_ref", path, "exact") as e:
        ids = e.tokenize((CASES_DIR / "corpus" / "small.txt").read_text(encoding="utf-8"))
        nll = stats.chunk_nll(e.logits, ids, 128, ids[0])
        # the same tokens scored; the logits op returns float32, the engine scores its float64 logits
        assert float(np.exp(nll.mean())) == pytest.approx(e.perplexity(ids, 128).ppl, rel=1e-7)


def test_quantization_cost_is_zero_for_the_same_arithmetic_and_grows_with_noise():
    rng = np.random.default_rng(0)
    table = rng.normal(0, 2, (64, 64))  # token -> next-token logits, a vocabulary of 64

    def exact(toks):
        return table[np.asarray(toks) % 64]

    def noisy(toks):
        return exact(toks) + np.random.default_rng(len(toks)).normal(0, 0.3, (len(toks), 64))

    ids = list(rng.integers(0, 64, 64))
    cost, nlls = stats.quantization_cost(exact, {"same": exact, "noisy": noisy}, ids, 16, 0)
    nll = stats.chunk_nll(exact, ids, 16, 0)
    assert cost["exact_ppl"] == pytest.approx(float(np.exp(nll.mean())))
    assert cost["same_ppl_vs_exact"] == 0 and cost["same_kl_vs_exact_max"] == pytest.approx(0, abs=1e-12)
    assert cost["noisy_kl_vs_exact_mean"] > 1e-3 and cost["noisy_kl_vs_exact_max"] >= cost["noisy_kl_vs_exact_mean"]
    noisy_nll = stats.chunk_nll(noisy, ids, 16, 0)
    assert np.array_equal(nlls["noisy"], noisy_nll) and np.array_equal(nlls["same"], nll)
    assert cost["noisy_ppl_vs_exact"] == pytest.approx(np.exp(noisy_nll.mean() - nll.mean()) - 1)


def test_quantization_cost_is_on_by_default_for_trained_models_only(tmp_path):
    f = tmp_path / "c.toml"
    body = 'prompts = ["x"]\n'
    f.write_text(f'[[case]]\nid = "a"\nmodel = {{ synth = {{ preset = "tiny" }} }}\n{body}'
                 f'[[case]]\nid = "b"\nmodel = {{ trained = {{ format = "tq2_0", arch = "bitnet" }} }}\n{body}'
                 f'[[case]]\nid = "c"\nmodel = {{ trained = {{ format = "i2_s" }} }}\n{body}'
                 'quantization_cost = false\n', encoding="utf-8")
    assert [c.quantization_cost for c in load_case_file(f)] == [False, True, False]
    f.write_text(f'[[case]]\nid = "a"\nmodel = {{ synth = {{ preset = "tiny" }} }}\n{body}quantization_cost = 1\n',
                 encoding="utf-8")
    with pytest.raises(CaseError, match="field 'quantization_cost'.*must be bool"):
        load_case_file(f)


def test_top1_beyond_ties():
    b = np.array([[0.0, 1.0, 0.95], [0.0, 3.0, 1.0]], np.float32)
    a = np.array([[0.0, 0.9, 1.0], [0.0, 1.0, 3.0]], np.float32)
    rate, bad = NF.top1_beyond_ties(a, b, tie_gap=0.1)
    assert rate == 0.5 and bad == [1]


# -- the JSON-lines intermediates op --------------------------------------------------------------------------
def test_jsonl_intermediates_round_trip(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    cmd = [sys.executable, str(TESTS / "jsonl_example_engine.py"), "--model", str(model), "--backend", "toy"]
    with JsonlEngine(cmd, model) as eng:
        assert "intermediates" in eng.info().operations
        out = eng.intermediates([256, 65, 66], ["l_out-0", "attn_norm-1"])
        x = np.asarray([256, 65, 66], np.float32)[:, None]
        assert np.array_equal(out["l_out-0"], np.cos(x * 8 + np.arange(8, dtype=np.float32)).astype(np.float32))
    with JsonlEngine(cmd + ["--operations", "generate"], model) as eng:
        assert eng.info().operations == ("generate",)
        from harness.engines.base import NotSupported

        with pytest.raises(NotSupported, match="does not declare intermediates"):
            eng.intermediates([1], ["l_out-0"])


def test_the_report_shows_the_mode_the_floor_and_not_supported(models_dir, tmp_path):
    from harness.report import write_report

    r = ladder(case(rungs=["tokens", "first_logits", "greedy"]), mutant("float-activations", "generate"), models_dir)
    assert r.status == "pass", r.reason
    html = Path(write_report([r.to_json()], tmp_path / "r.html")).read_text(encoding="utf-8")
    assert "<th>validation</th>" in html and ">independent</span>" in html
    assert ('<li class="rung r-not_supported"><span class="rn">tokens</span><span class="rs">not supported</span>'
            in html)
    assert "tie gap (greedy, top-1)" in html and "rule max_abs" in html
