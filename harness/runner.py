"""Running cross-validations: the (case, reference) pairs of a run and one pair's record, judged against its
tolerances and its baseline. One implementation behind the pytest plugin (harness/pytest_plugin.py) and
`bitnet-xval crossval` (harness/commands/crossval.py), so both give the same verdicts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import baselines
from .cases import CASES_DIR, Case, describe_model, load_cases

USER_MODEL_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Les élèves étudient la géométrie; 東京は日本の首都です。 🚀",
    "def add(a, b):\n    return a + b\n",
]
PROFILE_FOR = {"llama_cpp": "llama-cpp", "bitnet_cpp": "bitnet-cpp", "bitnet_cpp_tl2": "bitnet-cpp"}
PLATFORM_TOLERANCES = "tolerances.toml"


class RunError(Exception):
    """The run cannot start (an unreadable --model, a bad platform tolerances file); the message says why."""


@dataclass
class RunOptions:
    """What a run is asked to do: the plugin's command-line options, or `bitnet-xval crossval`'s."""

    engine: str = "bitnet_ref"
    references: list[str] | None = None
    model: str | None = None
    cases: list[str] | None = None
    profile: str | None = None
    validation: str | None = None
    tolerance: float | None = None
    platform: str | None = None
    baselines_dir: str | None = None
    baselines_mode: str = "gate"  # gate: a regression fails; report: it is only reported
    update_baselines: bool = False

    @property
    def baselines_path(self) -> Path:
        return Path(self.baselines_dir or "baselines")

    def platform_id(self) -> str:
        return self.platform or baselines.platform_id()


def default_references(arch: str | None, fmt: str | None) -> list[str]:
    """The references that can run a model of this architecture and weight format."""
    if fmt == "tl2":
        return ["bitnet_cpp_tl2"]
    if fmt in ("i2_s", "tl1") or arch != "bitnet":
        return ["bitnet_cpp"]
    return ["llama_cpp", "bitnet_cpp"]  # mainline's arch: F32, F16, TQ1_0, TQ2_0


def user_model_pairs(path: str, refs: list[str] | None) -> list[tuple[Case, str]]:
    """Cases for a user's model: the default prompts and corpus against the references that run its arch and
    format. Architecture and format come from the file, so tolerances, skips and markers are the file's."""
    from bitnet_ref.errors import ModelError

    p = Path(path).resolve()
    try:
        arch, fmt = describe_model(p)
    except (ModelError, OSError) as e:
        raise RunError(f"--model {path}: cannot read the model: {e}") from None
    return [(Case(id=p.stem, file=str(p), model={"path": str(p)}, references=[r],
                  profile=PROFILE_FOR.get(r, "exact"), prompts=USER_MODEL_PROMPTS,
                  corpus=str(CASES_DIR / "corpus" / "small.txt"), model_format=fmt, model_arch=arch), r)
            for r in refs or default_references(arch, fmt)]


def pairs(options: RunOptions) -> list[tuple[Case, str]]:
    if options.model:
        return user_model_pairs(options.model, options.references)
    return [(case, ref) for case in load_cases(options.cases) for ref in options.references or case.references]


def platform_tolerances(options: RunOptions) -> dict | None:
    """The platform overrides file, <baselines-dir>/tolerances.toml (one table per platform id), if any."""
    from .tolerances import ToleranceError, load_platform_overrides

    path = options.baselines_path / PLATFORM_TOLERANCES
    if not path.is_file():
        return None
    try:
        return load_platform_overrides(path)
    except ToleranceError as e:
        raise RunError(str(e)) from None


def run_pair(case: Case, reference: str, options: RunOptions, models_dir: Path, test_id: str = "",
             platform_overrides: dict | None = None):
    """The record of one pair: the ladder, the known-bug conversion, the baseline's judgement."""
    from .crossval import run_ladder
    from .tolerances import resolve

    profile = options.profile or case.profile
    platform = options.platform_id()
    tol = resolve(profile, case.format, case_overrides=case.tolerances, case_file=case.file, platform=platform,
                  platform_overrides=platform_overrides, cli_max_abs=options.tolerance)
    record = run_ladder(case, reference, tol, models_dir, sut=options.engine, profile=profile,
                        test_id=test_id or case.param_id(reference), validation=options.validation)
    if case.xfail and record.status == "fail":
        record.status, record.reason = "xfail", f"known reference bug: {case.xfail} (here: {record.reason})"
    judge_baseline(options, record, platform)
    return record


def record_filename(record) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", record.test_id or record.case_id) + ".json"


def judge_baseline(options: RunOptions, record, platform: str) -> None:
    """Judge the record against its baseline (or rewrite the baseline, when asked); the outcome goes in
    record.baseline (a regression fails the pair unless the mode is report)."""
    if record.status not in ("pass", "fail"):
        return
    directory = options.baselines_path
    key = baselines.BaselineKey(record.case_id, record.sut, record.reference)
    info = {"platform": platform, "regressions": [], "gate": options.baselines_mode == "gate"}
    try:
        info["path"] = str(baselines.path_for(directory, platform, key))
        if options.update_baselines:
            baselines.update(directory, platform, key, record.to_json(), reference_topk=record.reference_topk)
            record.baseline = {**info, "status": "updated"}
            return
        base = baselines.load(directory, platform, key)
    except baselines.BaselineError as e:  # a corrupt or newer-schema file, or a key that names none
        record.status, record.reason = "error", str(e)
        record.baseline = {**info, "status": "error"}
        return
    if base is None:
        record.baseline = {**info, "status": "new"}
        return
    regressions = baselines.compare(base, record.to_json())
    record.baseline = {
        **info, "status": "regression" if regressions else "match", "regressions": regressions,
        "metrics": {f"{rung}.{m}": v for rung, ms in base.metrics().items() for m, v in ms.items()},
        "engine_changes": baselines.engine_changes(base, record.to_json()),
        "reference_drift": baselines.compare_reference_topk(base, record.reference_topk),
    }


def regression_message(record) -> str | None:
    """Why the pair fails against its baseline (None when it does not): the regressed metrics, the
    baseline file, and what changed since it was taken."""
    bl = record.baseline or {}
    if bl.get("status") != "regression" or not bl.get("gate"):
        return None
    regs = "; ".join(f"{r['metric']} {r['baseline']} -> {r['now']}" for r in bl.get("regressions", []))
    text = f"regressed against the baseline {bl.get('path')}: {regs}"
    if bl.get("engine_changes"):
        text += f" (since the baseline: {'; '.join(bl['engine_changes'])})"
    if bl.get("reference_drift"):
        text += f" (the reference itself moved: {bl['reference_drift'][0]['metric']})"
    return text + ". Accept with --update-baselines, or only report with --baselines=report"


def verdict(record) -> tuple[str, str]:
    """(outcome, message) of a pair, as the test reports it: pass, fail, skip, error, or xfail (the case's
    known reference bug showed: a pass for the run, a failure for a strict xfail test)."""
    if record.status in ("skip", "error", "xfail"):
        return record.status, record.reason
    if record.status != "pass":
        mode = (getattr(record, "validation", None) or {}).get("mode", "?")
        return "fail", f"failed at rung {record.failed_rung!r} ({mode} validation): {record.reason}"
    regression = regression_message(record)
    return ("fail", regression) if regression else ("pass", "")
