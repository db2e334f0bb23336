"""Per-platform baselines: platform ids, the file round trip, the regression rules, bad files, atomic and
concurrent updates."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from harness import baselines as bl
from harness.baselines import BASELINE_SCHEMA, Baseline, BaselineError, BaselineKey
from harness.records import Record, RungResult

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = "linux-x86_64-avx2"
KEY = BaselineKey("tq2_0-bitnet-tiny", "bitnet_ref", "llama_cpp")


def make_record(max_abs=1.2e-6, top1=1.0, cosine=0.999999, match_rate=1.0, first_div=None, status="pass",
                case_id=KEY.case_id, greedy_status="pass") -> dict:
    rec = Record(
        case_id=case_id, sut=KEY.sut, reference=KEY.reference, profile="llama-cpp", status=status,
        rungs=[
            RungResult("file", "pass"),
            RungResult("first_logits", "pass", metrics={"max_abs": max_abs / 2}),
            RungResult("all_logits", "pass", metrics={"max_abs": max_abs, "nmse": 1e-12, "cosine": cosine,
                                                      "top1_agreement": top1, "kl_mean": 1e-9,
                                                      "n_positions": 12, "seconds": 0.5}),
            RungResult("greedy", greedy_status, metrics={"match_rate": match_rate, "first_divergence": first_div}),
        ],
        receipts={"sut": {"engine": "bitnet_ref", "version": "0.1.0", "artifact_sha256": None, "device": "cpu"},
                  "reference": {"engine": "llama_cpp", "version": "b4500", "artifact_sha256": "ab" * 32}},
        model={"path": "m.gguf", "sha256": "cd" * 32},
    )
    return rec.to_json()


# ------------------------------------------------------------------------------------------- platform id

def cpuinfo(tmp_path, flags: str) -> Path:
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse sse2 {flags}\n\n"
                 f"processor\t: 1\nflags\t\t: fpu\n")
    return p


def test_platform_id_of_this_machine_has_the_documented_shape():
    pid = bl.platform_id()
    assert bl.PLATFORM_RE.match(pid), pid
    assert len(pid.split("-")) == 3 and not pid.endswith("-cpu")
    assert bl.platform_id("cuda:0") == pid + "-cuda"


@pytest.mark.parametrize("flags, isa", [
    ("avx avx2 avx512f avx512bw avx512_vnni", "avx512"),
    ("avx avx2 avx512f avx512vnni", "avx512"),
    ("avx avx2 avx512f avx512bw", "avx2"),  # AVX-512 without VNNI: the avx2 kernels run
    ("avx avx2", "avx2"),
    ("avx ssse3", "sse"),
])
def test_x86_isa_from_proc_cpuinfo_flags(tmp_path, flags, isa):
    pid = bl.platform_id(system="Linux", machine="x86_64", cpuinfo=cpuinfo(tmp_path, flags))
    assert pid == f"linux-x86_64-{isa}"


def test_platform_id_arch_names_and_device_suffix(tmp_path):
    assert bl.platform_id(system="Linux", machine="aarch64") == "linux-aarch64-neon"
    assert bl.platform_id(system="Darwin", machine="arm64") == "darwin-arm64-neon"
    assert bl.platform_id(system="Darwin", machine="arm64", device="metal") == "darwin-arm64-neon-metal"
    info = cpuinfo(tmp_path, "avx2 avx512f avx512_vnni")
    assert bl.platform_id("cuda:1", system="Linux", machine="AMD64", cpuinfo=info) == "linux-x86_64-avx512-cuda"
    assert bl.platform_id("cpu", system="Linux", machine="x86_64", cpuinfo=info) == "linux-x86_64-avx512"
    assert bl.platform_id(system="Linux", machine="riscv64") == "linux-riscv64-generic"
    # an unreadable cpuinfo is the lowest level, not a crash
    assert bl.platform_id(system="Linux", machine="x86_64", cpuinfo=tmp_path / "absent") == "linux-x86_64-sse"


@pytest.mark.parametrize("bad", ["linux-x86_64", "Linux-x86_64-avx2", "../etc-x-y", "linux-x86_64-avx2-cuda-x-y",
                                 "linux/x86_64/avx2", ""])
def test_platform_override_must_have_the_shape(bad, tmp_path):
    with pytest.raises(ValueError, match="os-arch-isa"):
        bl.check_platform(bad)
    with pytest.raises(ValueError, match="os-arch-isa"):
        bl.load(tmp_path, bad, KEY)


# ------------------------------------------------------------------------------------------- round trip

def test_round_trip(tmp_path):
    assert bl.load(tmp_path, PLATFORM, KEY) is None  # absent: None, not an error
    logits = np.random.default_rng(0).standard_normal((6, 40)).astype(np.float32)
    topk = bl.topk_of(logits, k=4, positions=3)
    rec = make_record()
    path = bl.update(tmp_path, PLATFORM, KEY, rec, reference_topk=topk)
    assert path == tmp_path / PLATFORM / "tq2_0-bitnet-tiny--bitnet_ref--llama_cpp.json"
    assert stat.S_IMODE(path.stat().st_mode) & 0o044, "readable by others, like any file in the repository"
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == BASELINE_SCHEMA == 1
    assert doc["engines"]["reference"]["version"] == "b4500" and doc["engines"]["sut"]["engine"] == "bitnet_ref"
    assert doc["model_sha256"] == "cd" * 32 and doc["profile"] == "llama-cpp"

    b = bl.load(tmp_path, PLATFORM, KEY)
    assert isinstance(b, Baseline) and b.key == KEY and b.platform == PLATFORM and b.path == path
    assert b.rungs["all_logits"]["metrics"]["max_abs"] == 1.2e-6
    assert b.rungs["greedy"]["metrics"] == {"match_rate": 1.0, "first_divergence": None}
    assert b.rungs["file"] == {"status": "pass", "metrics": {}}
    assert b.reference_topk["ids"][0] == [int(i) for i in np.argsort(-logits[0], kind="stable")[:4]]
    assert bl.compare(b, rec) == []
    assert bl.compare_reference_topk(b, logits) == []
    assert bl.engine_changes(b, rec) == []
    # the same record, from a key given as a tuple or as the record itself
    assert bl.load(tmp_path, PLATFORM, (KEY.case_id, KEY.sut, KEY.reference)).rungs == b.rungs
    assert bl.load(tmp_path, PLATFORM, rec).rungs == b.rungs
    # keys are structured: a string (which an engine spec with "--" in it would split wrongly) is refused
    with pytest.raises(BaselineError, match="is a string: pass a BaselineKey"):
        bl.load(tmp_path, PLATFORM, "tq2_0-bitnet-tiny--bitnet_ref--llama_cpp")
    with pytest.raises(BaselineError, match="has no sut"):
        bl.load(tmp_path, PLATFORM, {"case_id": "x", "reference": "llama_cpp"})
    assert bl.list_baselines(tmp_path) == [path] == bl.list_baselines(tmp_path, PLATFORM)


def test_non_finite_metrics_survive_as_strict_json(tmp_path):
    rec = make_record(max_abs=float("inf"))
    rec["rungs"][2]["metrics"]["nmse"] = float("nan")
    path = bl.update(tmp_path, PLATFORM, KEY, rec)
    doc = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert doc["rungs"]["all_logits"]["metrics"]["max_abs"] == "inf"
    b = bl.load(tmp_path, PLATFORM, KEY)
    assert b.rungs["all_logits"]["metrics"]["max_abs"] == math.inf
    assert math.isnan(b.rungs["all_logits"]["metrics"]["nmse"])


def test_key_with_unsafe_characters_stays_in_its_directory(tmp_path):
    key = BaselineKey("case/../x", "bitnet_ref", "jsonl:./engine --fast")
    path = bl.update(tmp_path, PLATFORM, key, {**make_record(), "case_id": key.case_id,
                                               "reference": key.reference})
    assert path.parent == tmp_path / PLATFORM and "/" not in path.name
    assert bl.load(tmp_path, PLATFORM, key).key == key


def test_update_refuses_a_run_that_did_not_compare(tmp_path):
    for status in ("skip", "error"):
        rec = {**make_record(), "status": status, "reason": "BITNET_CPP_DIR is not set"}
        with pytest.raises(BaselineError, match=f"status is '{status}'.*BITNET_CPP_DIR"):
            bl.update(tmp_path, PLATFORM, KEY, rec)
    with pytest.raises(BaselineError, match="case_id"):
        bl.update(tmp_path, PLATFORM, BaselineKey("other", KEY.sut, KEY.reference), make_record())
    with pytest.raises(BaselineError, match="cannot name a file"):
        bl.update(tmp_path, PLATFORM, BaselineKey("..", KEY.sut, KEY.reference), {**make_record(), "case_id": ".."})
    assert not (tmp_path / PLATFORM).exists() or not any((tmp_path / PLATFORM).iterdir())


# ------------------------------------------------------------------------------------------ regressions

@pytest.fixture
def base(tmp_path) -> Baseline:
    bl.update(tmp_path, PLATFORM, KEY, make_record(max_abs=1e-5, top1=0.9, cosine=0.999, match_rate=0.75,
                                                   first_div=6))
    return bl.load(tmp_path, PLATFORM, KEY)


def regressed(base, **kw) -> list[str]:
    args = dict(max_abs=1e-5, top1=0.9, cosine=0.999, match_rate=0.75, first_div=6)
    args.update(kw)
    return [r["metric"] for r in bl.compare(base, make_record(**args))]


def test_rules_by_metric_name():
    assert bl.metric_rule("max_abs") == bl.metric_rule("nmse") == bl.metric_rule("kl_mean") == "lower"
    assert bl.metric_rule("ppl_rel_diff") == bl.metric_rule("weight_mismatches") == "lower"
    assert bl.metric_rule("top1_agreement") == bl.metric_rule("topk_containment") == "rate"
    assert bl.metric_rule("match_rate") == "rate"
    assert bl.metric_rule("cosine") == bl.metric_rule("cosine_min") == "cosine"
    assert bl.metric_rule("first_divergence") == bl.metric_rule("first_bad_position") == "position"
    assert bl.metric_rule("n_positions") == bl.metric_rule("seconds") == bl.metric_rule("tokens_per_s") == "info"
    assert bl.metric_rule("topk_a_in_b") == bl.metric_rule("topk_b_in_a") == "rate"
    assert bl.metric_rule("positional_agreement") == "rate"
    assert bl.metric_rule("max_rel") == bl.metric_rule("dp_rms") == bl.metric_rule("dp_max_abs") == "lower"
    assert bl.metric_rule("kl_p99") == bl.metric_rule("n_nonfinite") == "lower"
    assert bl.metric_rule("cosine_min") == "cosine" and bl.metric_rule("matched_prefix") == "position"
    assert bl.metric_rule("ppl_ref") == "info"
    assert bl.metric_rule("one_minus_cosine_max") == "lower" and bl.metric_rule("first_top1_mismatch") == "position"
    for unjudged in ("something_new", "dp_mean", "ln_ppl_ratio", "dp_p99", "token_a", "rank_a_in_b", "gap_b",
                     "length_a", "scored_positions", "ternary_tensors", "k", "kl_mean_unc", "dp_rms_unc",
                     "argmax_abs_position", "positions", "vocab"):
        assert bl.metric_rule(unjudged) is None, unjudged


def test_error_metrics_regress_beyond_ten_percent_and_an_absolute_floor(base):
    assert regressed(base) == []
    assert regressed(base, max_abs=1.09e-5) == []  # +9%: noise
    assert regressed(base, max_abs=1e-6) == []  # better
    assert regressed(base, max_abs=1.2e-5) == ["first_logits.max_abs", "all_logits.max_abs"]  # +20%
    assert regressed(base, max_abs=float("nan")) == ["first_logits.max_abs", "all_logits.max_abs"]


def test_absolute_floor_keeps_noise_near_zero_quiet(tmp_path):
    bl.update(tmp_path, PLATFORM, KEY, make_record(max_abs=1e-9))
    b = bl.load(tmp_path, PLATFORM, KEY)
    assert bl.compare(b, make_record(max_abs=5e-8)) == []  # 50x, but only 5e-8 absolute
    assert [r["metric"] for r in bl.compare(b, make_record(max_abs=3e-7))] == ["first_logits.max_abs",
                                                                               "all_logits.max_abs"]
    # the margins are the caller's to set
    assert bl.compare(b, make_record(max_abs=5e-8), rel=0.1, abs=0.0) != []


def test_agreement_rates_regress_when_down_at_all(base):
    assert regressed(base, top1=0.95, match_rate=1.0) == []
    assert regressed(base, top1=0.8999) == ["all_logits.top1_agreement"]
    assert regressed(base, match_rate=0.7) == ["greedy.match_rate"]


def test_cosine_is_judged_as_its_distance_from_one(base):
    assert regressed(base, cosine=0.99891) == []  # 1 - cos: 1e-3 -> 1.09e-3
    assert regressed(base, cosine=0.998) == ["all_logits.cosine"]


def test_first_divergence_regresses_when_earlier(base, tmp_path):
    assert regressed(base, first_div=9) == []
    assert regressed(base, first_div=3) == ["greedy.first_divergence"]
    bl.update(tmp_path, PLATFORM, KEY, make_record(first_div=None))
    never = bl.load(tmp_path, PLATFORM, KEY)
    out = bl.compare(never, make_record(first_div=20))
    assert out == [{"metric": "greedy.first_divergence", "baseline": None, "now": 20.0}]


def test_a_negative_position_means_no_divergence():
    base = Baseline(PLATFORM, KEY, rungs={"all_logits": {"status": "pass",
                                                         "metrics": {"first_top1_mismatch": -1.0}}})
    assert bl.compare(base, {"all_logits": {"first_top1_mismatch": -1.0}}) == []
    assert bl.compare(base, {"all_logits": {"first_top1_mismatch": 7.0}}) == [
        {"metric": "all_logits.first_top1_mismatch", "baseline": -1.0, "now": 7.0}]
    base.rungs["all_logits"]["metrics"]["first_top1_mismatch"] = 7.0
    assert bl.compare(base, {"all_logits": {"first_top1_mismatch": -1.0}}) == []  # fixed: better
    assert bl.compare(base, {"all_logits": {"first_top1_mismatch": 2.0}}) != []


def test_regression_entries_carry_both_values(base):
    out = bl.compare(base, make_record(top1=0.5))
    assert out == [{"metric": "all_logits.top1_agreement", "baseline": 0.9, "now": 0.5}]


def test_rung_status_and_missing_rungs(base):
    out = bl.compare(base, make_record(greedy_status="fail"))
    assert {"metric": "greedy.status", "baseline": "pass", "now": "fail"} in out
    rec = make_record()
    rec["rungs"] = rec["rungs"][:2]  # the ladder stopped before all_logits
    out = bl.compare(base, rec)
    assert [r["metric"] for r in out] == ["all_logits.status", "greedy.status"]
    assert out[0]["now"] == "missing"
    rec = make_record()
    del rec["rungs"][2]["metrics"]["nmse"]
    assert bl.compare(base, rec) == [{"metric": "all_logits.nmse", "baseline": 1e-12, "now": None}]


def test_compare_accepts_plain_metrics(base):
    assert bl.compare(base, {"all_logits": {"max_abs": 1e-5, "top1_agreement": 0.9}}) == []
    assert bl.compare(base, {"all_logits": {"max_abs": 2e-5}})[0] == {
        "metric": "all_logits.max_abs", "baseline": 1e-5, "now": 2e-5}


def test_reference_topk_and_engine_changes_are_reported(tmp_path):
    logits = np.random.default_rng(1).standard_normal((4, 50))
    bl.update(tmp_path, PLATFORM, KEY, make_record(), reference_topk=bl.topk_of(logits, k=3, positions=2))
    b = bl.load(tmp_path, PLATFORM, KEY)
    moved = logits.copy()
    moved[1, int(np.argmax(moved[1]))] += 1e-3
    assert [r["metric"] for r in bl.compare_reference_topk(b, moved)] == ["reference_topk[1].logits[0]"]
    # the ladder keeps a top-k of its own (Record.reference_topk, k=5): judged on the baseline's k
    assert [r["metric"] for r in bl.compare_reference_topk(b, bl.topk_of(moved))] == ["reference_topk[1].logits[0]"]
    assert bl.compare_reference_topk(b, bl.topk_of(logits)) == []
    rec = make_record()
    rec["receipts"]["reference"]["version"] = "b4600"
    assert bl.engine_changes(b, rec) == ["reference version: b4500 -> b4600"]


def test_topk_is_kept_small():
    t = bl.topk_of(np.zeros((100, 1000)), k=50, positions=50)
    assert t["k"] == bl.TOPK_MAX_K and len(t["ids"]) == bl.TOPK_MAX_POSITIONS
    assert t["ids"][0] == list(range(bl.TOPK_MAX_K))  # ties: lower id first


# ------------------------------------------------------------------------------------------------ bad files

def write(tmp_path, doc_or_text) -> Path:
    path = bl.path_for(tmp_path, PLATFORM, KEY)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc_or_text if isinstance(doc_or_text, str) else json.dumps(doc_or_text))
    return path


def good_doc(tmp_path) -> dict:
    return json.loads(bl.update(tmp_path / "good", PLATFORM, KEY, make_record()).read_text())


def test_newer_schema_is_refused_with_what_to_do(tmp_path):
    doc = good_doc(tmp_path)
    doc["schema_version"] = BASELINE_SCHEMA + 1
    path = write(tmp_path, doc)
    with pytest.raises(BaselineError) as e:
        bl.load(tmp_path, PLATFORM, KEY)
    msg = str(e.value)
    assert str(path) in msg and f"schema_version {BASELINE_SCHEMA + 1}" in msg and f"schema {BASELINE_SCHEMA}" in msg
    assert "upgrade bitnet-crossval" in msg and "regenerate" in msg


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(schema_version="1"), "schema_version"),
    (lambda d: d.pop("schema_version"), "schema_version"),
    (lambda d: d.update(schema_version=0), "schema_version"),
    (lambda d: d.update(platform=3), "platform"),
    (lambda d: d["key"].pop("sut"), "key.sut"),
    (lambda d: d.update(rungs=[]), "rungs"),
    (lambda d: d["rungs"].update(all_logits="pass"), "rungs.all_logits"),
    (lambda d: d["rungs"]["all_logits"].update(status=None), "rungs.all_logits.status"),
    (lambda d: d["rungs"]["all_logits"].update(metrics=[1]), "rungs.all_logits.metrics"),
    (lambda d: d["rungs"]["all_logits"]["metrics"].update(max_abs="tiny"), "rungs.all_logits.metrics.max_abs"),
    (lambda d: d["rungs"]["all_logits"]["metrics"].update(max_abs=[1.0]), "rungs.all_logits.metrics.max_abs"),
    (lambda d: d["rungs"]["all_logits"]["metrics"].update(max_abs=True), "rungs.all_logits.metrics.max_abs"),
    (lambda d: d.update(engines="b4500"), "engines"),
    (lambda d: d.update(reference_topk={"ids": [[1, "2"]], "logits": [[1.0, 2.0]]}), "reference_topk.ids"),
    (lambda d: d.update(reference_topk={"ids": [[1, 2]], "logits": [[1.0, "x"]]}), "reference_topk.logits[0][1]"),
    (lambda d: d["key"].update(case_id="other-case"), "key"),
    (lambda d: d.update(platform="linux-aarch64-neon"), "platform"),
])
def test_corrupted_file_names_the_file_and_the_field(tmp_path, mutate, field):
    doc = good_doc(tmp_path)
    mutate(doc)
    path = write(tmp_path, doc)
    with pytest.raises(BaselineError) as e:
        bl.load(tmp_path, PLATFORM, KEY)
    assert str(path) in str(e.value) and f"field {field} " in str(e.value), str(e.value)


@pytest.mark.parametrize("text", ['{"schema_version": 1, "platform": ', "", "[1, 2]", "\x00\x01", "NaN"])
def test_unreadable_file_names_the_file(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(BaselineError, match="regenerate") as e:
        bl.load(tmp_path, PLATFORM, KEY)
    assert str(path) in str(e.value)


def test_binary_garbage_is_a_baseline_error(tmp_path):
    path = bl.path_for(tmp_path, PLATFORM, KEY)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BaselineError, match="UTF-8"):
        bl.load(tmp_path, PLATFORM, KEY)


# ------------------------------------------------------------------------------------------- atomic update

def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = bl.update(tmp_path, PLATFORM, KEY, make_record(max_abs=1e-6))
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(bl.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        bl.update(tmp_path, PLATFORM, KEY, make_record(max_abs=9e-6))
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_crash_during_write_leaves_the_old_file_intact(tmp_path):
    """A process killed in the middle of writing (no cleanup runs): the baseline is still the old one,
    whole; the stray temp file is ignored by load and list_baselines."""
    path = bl.update(tmp_path, PLATFORM, KEY, make_record(max_abs=1e-6))
    before = path.read_bytes()
    child = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / "tests")!r})
        import bitnet_ref.atomic as atomic
        from harness import baselines as bl
        from test_baselines import KEY, PLATFORM, make_record
        real_write = atomic.tempfile.mkstemp
        def mkstemp(*a, **k):
            fd, name = real_write(*a, **k)
            os.write(fd, b'{{"schema_version": 1, "platf')  # half a file, then the process dies
            os._exit(137)
        atomic.tempfile.mkstemp = mkstemp
        bl.update({str(tmp_path)!r}, PLATFORM, KEY, make_record(max_abs=9e-6))
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 137, proc.stderr
    assert path.read_bytes() == before
    stray = [p for p in path.parent.iterdir() if p.name.endswith(".partial")]
    assert len(stray) == 1 and stray[0].read_text().startswith('{"schema_version": 1, "platf')
    assert bl.load(tmp_path, PLATFORM, KEY).rungs["all_logits"]["metrics"]["max_abs"] == 1e-6
    assert bl.list_baselines(tmp_path) == [path]


# -------------------------------------------------------------------------------------- concurrent update

def _update_many(args):
    directory, worker, n = args
    paths = []
    for i in range(n):
        key = BaselineKey(f"case-{worker}-{i}", "bitnet_ref", "llama_cpp")
        rec = make_record(max_abs=(worker + 1) * 1e-6 + i * 1e-8, case_id=key.case_id)
        paths.append(str(bl.update(directory, PLATFORM, key, rec)))
        # and everyone also rewrites one shared key: last writer wins, never a torn file
        bl.update(directory, PLATFORM, KEY, make_record(max_abs=(worker + 1) * 1e-6))
    return paths


def test_concurrent_updates_from_several_processes_lose_nothing(tmp_path, monkeypatch):
    workers, n = 6, 15
    # spawned workers import this module by name
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), str(ROOT / "tests")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        results = pool.map(_update_many, [(str(tmp_path), w, n) for w in range(workers)])
    assert len({p for ps in results for p in ps}) == workers * n
    for w in range(workers):
        for i in range(n):
            b = bl.load(tmp_path, PLATFORM, BaselineKey(f"case-{w}-{i}", "bitnet_ref", "llama_cpp"))
            assert b.rungs["all_logits"]["metrics"]["max_abs"] == (w + 1) * 1e-6 + i * 1e-8
    shared = bl.load(tmp_path, PLATFORM, KEY)
    assert shared.rungs["all_logits"]["metrics"]["max_abs"] in {(w + 1) * 1e-6 for w in range(workers)}
    assert len(bl.list_baselines(tmp_path)) == workers * n + 1
    assert not [p for p in (tmp_path / PLATFORM).iterdir() if p.name.endswith(".partial")]
