"""The record of one cross-validation: one case, one system under test, one reference.

Records are what the check ladder produces, what pytest reports, what is written as JSON beside the
HTML report (one file per record), and what baselines summarize. Schema (version RECORD_SCHEMA):

{
  "schema_version": 1,
  "case_id": "tq2_0-bitnet-tiny",              # from the case file
  "test_id": "test_crossval[tq2_0-bitnet-tiny-vs-llama_cpp]",
  "sut": "bitnet_ref", "reference": "llama_cpp", "profile": "llama-cpp",
  "status": "pass" | "fail" | "skip" | "error" | "xfail",   # xfail: the case's known reference bug showed
  "failed_rung": null | "file" | "weights" | "tokens" | "first_logits" | "all_logits" | "greedy" | "perplexity",
  "reason": "...",                              # why it failed / skipped / errored (one line)
  "rungs": [ {"rung": "...", "status": "pass" | "fail" | "skip" | "not_supported", "detail": "...",
              "metrics": {"max_abs": 1.2e-6, ...},
              "checks": [ {"metric": "max_abs", "value": 1.2e-6, "limit": 1e-4, "op": "<=",
                           "source": "default:llama-cpp" | "case:FILE" | "platform:ID" | "cli:--tolerance",
                           "passed": true, "floor": null | x, "multiplier": null | m} ],
              "series": {"max_abs_per_position": [...], "kl_per_position": [...]},   # for plots, optional
              "histogram": {"edges": [...], "counts": [...]},                          # |Δ| histogram, optional
              "first_bad_position": null | int,
              "localization": null | {"layer": 0 | null, "op": "Qcur-0" | null, "max_abs": 0.3, "rel": 0.02,
                                      "rel_limit": 1e-5, "reproduced": true | false,
                                      "nodes": [{"name", "max_abs", "scale", "rel"}, ...],
                                      "note": "inconclusive: ..."   # when no op is named: why
                                      }} ],
  "baseline": {"status": "match" | "regression" | "new" | "none" | "updated", "platform": "linux-x86_64-avx512",
               "path": "baselines/<platform>/<file>.json", "gate": true,   # gate: a regression fails the test
               "regressions": [ {"metric": "...", "baseline": x, "now": y} ],
               "metrics": {"<rung>.<metric>": x},         # the baseline's values, for the report
               "engine_changes": ["reference version: a -> b", ...],   # what differs from the baseline's run
               "reference_drift": [ {"metric": "reference_topk[p]...", "baseline": x, "now": y} ]},
  "reference_topk": null | {"k": 5, "positions": [...], "ids": [[...]], "logits": [[...]]},
  "receipts": {"sut": {...Receipt...}, "reference": {...Receipt...} | null},
  "model": {"path": "...", "sha256": "...", "spec": {...} | null},
  "environment": {"python": "...", "platform": "...", "hostname": "..."},
  "validation": {"mode": "bit-exact" | "independent", "source": "default" | "case:FILE" | "cli:--validation",
                 "noise_floor": {...}},   # independent mode: the measured floor, the rules (multipliers), the tie gap
  "seconds": 1.23
}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bitnet_ref.atomic import atomic_write_text

RECORD_SCHEMA = 1
RUNGS = ("file", "weights", "tokens", "first_logits", "all_logits", "greedy", "perplexity")
STATUSES = ("pass", "fail", "skip", "error", "xfail")  # xfail: a known reference bug, reproduced
# a rung's status: pass | fail | skip | "not_supported" (the system under test cannot perform it: never a pass)
RUNG_STATUSES = ("pass", "fail", "skip", "not_supported")


@dataclass
class Check:
    metric: str
    value: float
    limit: float
    op: str  # "<=" or ">="
    source: str  # where the limit came from
    passed: bool
    floor: float | None = None  # independent mode: the noise floor the limit is a multiple of
    multiplier: float | None = None


@dataclass
class RungResult:
    rung: str
    status: str
    detail: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    series: dict[str, list[float]] = field(default_factory=dict)
    histogram: dict[str, list[float]] | None = None
    first_bad_position: int | None = None
    localization: dict | None = None


@dataclass
class Record:
    case_id: str
    sut: str
    reference: str
    profile: str
    status: str
    test_id: str = ""
    failed_rung: str | None = None
    reason: str = ""
    rungs: list[RungResult] = field(default_factory=list)
    baseline: dict = field(default_factory=lambda: {"status": "none"})
    receipts: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    # {"mode": "bit-exact" | "independent", "source": "default" | "case:FILE" | "cli:--validation",
    #  "noise_floor": {...} (independent mode; harness.noise_floor.describe)}
    validation: dict = field(default_factory=dict)
    seconds: float = 0.0
    # the reference's top-k logits at the first positions of the first prompt (harness.baselines.topk_of):
    # kept in the baseline, so a later run can tell when the reference itself moved
    reference_topk: dict | None = None
    schema_version: int = RECORD_SCHEMA

    def to_json(self) -> dict:
        return asdict(self)


def write_json_atomic(path: str | os.PathLike, doc) -> Path:
    """Write JSON so that readers never see a half-written file (bitnet_ref.atomic)."""
    return atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True, default=float) + "\n")


def read_records(directory: str | os.PathLike) -> list[dict]:
    """Every record JSON in a directory (as written by the plugin, one file per test), sorted by test id."""
    out = []
    for p in sorted(Path(directory).glob("*.json")):
        doc = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(doc, dict) and "case_id" in doc:
            out.append(doc)
    return sorted(out, key=lambda d: d.get("test_id") or d["case_id"])
