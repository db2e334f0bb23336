"""Per-platform baselines: what a comparison measured last time on this kind of machine, so that a change
which still passes its tolerance but is worse than before shows up as a regression.

A run is judged twice, separately: against the reference (correctness, tolerances) and against the
baseline (regression, this module). Baselines are rewritten only when the user asks (`--update-baselines`).

Platform id: ``os-arch-isa[-device]``, e.g. ``linux-x86_64-avx512``, ``linux-x86_64-avx2``,
``linux-aarch64-neon``, ``darwin-arm64-neon``, ``linux-x86_64-avx512-cuda``. The ISA is the widest
vector extension the kernels use: on x86 ``avx512`` (avx512f and avx512 VNNI), ``avx2``, else ``sse``;
on 64-bit ARM ``neon``; anything else ``generic``. The device suffix is present only when an engine ran
on a device other than the CPU. A caller may name the platform itself (``--platform``); it must have the
same shape (see PLATFORM_RE).

Layout: one file per key, ``baselines/<platform-id>/<case_id>--<sut>--<reference>.json``. There is no
shared index: each update writes only its own file, through a temp file in the same directory and
``os.replace``, so several pytest-xdist workers updating different keys at once lose nothing, and a
reader (or a crash) never sees or leaves a half-written baseline (at worst a stray ``.*.partial`` file,
which is ignored). Two writers of the *same* key: the last rename wins, whole.

File (schema BASELINE_SCHEMA = 1)::

    {
      "schema_version": 1,
      "platform": "linux-x86_64-avx512",
      "key": {"case_id": "tq2_0-bitnet-tiny", "sut": "bitnet_ref", "reference": "llama_cpp"},
      "profile": "llama-cpp",
      "status": "pass",                  # the record's status when the baseline was taken
      "updated": "2025-01-01T00:00:00+00:00",
      "rungs": {"all_logits": {"status": "pass", "metrics": {"max_abs": 1.2e-06, "top1_agreement": 1.0}},
                ...},                    # a metric value is a number, null, or "nan" / "inf" / "-inf"
      "engines": {"sut": {"engine": "bitnet_ref", "version": "0.1.0", "artifact_sha256": null},
                  "reference": {...} | null},
      "model_sha256": "..." | null,
      "reference_topk": null | {"k": 5, "positions": [0, 1, 2, 3],
                                "ids": [[...k ints...], ...], "logits": [[...k floats...], ...]}
    }

Regression rules (`compare`), per metric, by what "worse" means for it (see `metric_rule`):

- error-like (``lower``: max_abs, max_rel, nmse, kl_*, dp_rms, dp_max_abs, ppl_rel_diff,
  one_minus_cosine_max, n_nonfinite, *mismatch* counts; any name with abs, rel, err, mse, rms, kl,
  diff, delta, dist):
  worse when ``|now| > |baseline| * (1 + rel)`` AND ``|now| - |baseline| > abs`` (default rel 10%,
  abs 1e-7): a change must be large both relatively and absolutely, so noise near zero is not flagged.
- agreement rates (``rate``: top1_agreement, topk_a_in_b, topk_b_in_a, match_rate, positional_agreement;
  any name with agree, contain, accuracy, or ending in _rate): worse when
  ``now < baseline`` at all (they count discrete events; the same inputs give the same rate).
- cosine similarity (``cosine``): judged as the error ``1 - cosine`` with the error-like rule.
- positions (``position``: first_divergence, first_bad_position, first_top1_mismatch, any first_*,
  matched_prefix): worse when the divergence comes earlier, or when there was none (null, or a
  negative sentinel such as -1) and now there is one.
- informational (``info``: n_* counts, seconds, *_per_s, ppl_sut / ppl_ref themselves): never compared.
  Metrics matching no rule are not compared either: signed ones (dp_mean, ln_ppl_ratio), percentiles of
  signed quantities (dp_p99, ...), uncertainties (*_unc), where a maximum sits (argmax_abs_position),
  counts of positions, lengths, token ids, ranks and gaps at a divergence.
- a value that is NaN now while the baseline's was not is a regression; a NaN baseline judges nothing.
- a rung whose status was ``pass`` in the baseline and is not now (``fail``, ``error``, or absent from
  the record because the ladder stopped earlier) is a regression, reported as ``<rung>.status``.
- a metric present in the baseline but missing now (in a rung that ran) is a regression (now: null).
  The last two apply when `compare` is given a whole record; given ``{rung: {metric: value}}`` it judges
  only the metrics given.
Regressions are reported as ``{"metric": "<rung>.<name>", "baseline": x, "now": y}``.
"""

from __future__ import annotations

import json
import math
import os
import platform as _platform
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bitnet_ref.atomic import atomic_write_text

from .records import RUNGS

BASELINE_SCHEMA = 1
DEFAULT_REL = 0.10
DEFAULT_ABS = 1e-7
# reference top-k logits are kept only when small: at most this many positions and this k
TOPK_MAX_POSITIONS = 8
TOPK_MAX_K = 10

PLATFORM_RE = re.compile(r"^[a-z0-9][a-z0-9_.]*(-[a-z0-9][a-z0-9_.]*){2,3}$")
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_UPDATE_HINT = "regenerate it with --update-baselines (or delete it)"


class BaselineError(ValueError):
    """A baseline that cannot be used: a file with a newer schema, bad JSON or wrong field types, or a key
    that cannot name one. The message names the file or key, the field and what to do."""


# ---------------------------------------------------------------------------------------------- platform

def isa_from_flags(flags: Iterable[str]) -> str:
    """x86 ISA level from CPU flags as /proc/cpuinfo spells them (avx512_vnni; avx512vnni also accepted)."""
    f = {x.lower() for x in flags}
    if "avx512f" in f and ({"avx512_vnni", "avx512vnni"} & f):
        return "avx512"
    if "avx2" in f:
        return "avx2"
    return "sse"


def _cpuinfo_field(text: str, names: tuple[str, ...]) -> list[str]:
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in names:
            return value.split()
    return []


def _darwin_x86_isa() -> str:
    def has(name: str) -> bool:
        try:
            out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return False
        return out.returncode == 0 and out.stdout.strip() == "1"

    if has("hw.optional.avx512f") and has("hw.optional.avx512vnni"):
        return "avx512"
    return "avx2" if has("hw.optional.avx2_0") else "sse"


def _windows_x86_isa() -> str:
    try:
        import ctypes

        present = ctypes.windll.kernel32.IsProcessorFeaturePresent  # type: ignore[attr-defined]
        return "avx2" if present(40) else "sse"  # PF_AVX2_INSTRUCTIONS_AVAILABLE
    except Exception:  # noqa: BLE001 - any failure means "unknown": the baseline level
        return "sse"


def _norm_arch(machine: str) -> str:
    m = machine.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "i686": "x86", "i386": "x86"}.get(m, m)


def platform_id(device: str | None = None, *, system: str | None = None, machine: str | None = None,
                cpuinfo: str | os.PathLike | None = None) -> str:
    """``os-arch-isa[-device]`` of this machine. `device` is the engine's device ("cpu", "cuda:0", ...);
    anything but the CPU adds a suffix (``cuda:0`` -> ``-cuda``). `system`, `machine` and `cpuinfo` (a
    path read instead of /proc/cpuinfo) exist for tests."""
    osname = (system or _platform.system() or sys.platform).lower()
    arch = _norm_arch(machine or _platform.machine() or "unknown")
    if arch in ("x86_64", "x86"):
        if osname == "linux":
            try:
                text = Path(cpuinfo or "/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
            isa = isa_from_flags(_cpuinfo_field(text, ("flags",)))
        elif osname == "darwin" and cpuinfo is None:
            isa = _darwin_x86_isa()
        elif osname == "windows" and cpuinfo is None:
            isa = _windows_x86_isa()
        else:
            isa = "sse"
    elif arch in ("aarch64", "arm64"):
        isa = "neon"  # mandatory in ARMv8-A
    elif arch.startswith("arm") and osname == "linux":
        try:
            text = Path(cpuinfo or "/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        isa = "neon" if "neon" in _cpuinfo_field(text, ("features",)) else "generic"
    else:
        isa = "generic"
    parts = [osname, arch, isa]
    dev = (device or "cpu").split(":", 1)[0].strip().lower()
    if dev and dev != "cpu":
        parts.append(re.sub(r"[^a-z0-9_.]", "_", dev))
    pid = "-".join(re.sub(r"[^a-z0-9_.]", "_", p) for p in parts)
    return check_platform(pid)


def check_platform(pid: str) -> str:
    """The platform id itself when it has the shape os-arch-isa[-device]; ValueError otherwise (a
    platform named on the command line becomes a directory name, so it is checked)."""
    if not isinstance(pid, str) or not PLATFORM_RE.match(pid):
        raise ValueError(f"platform id {pid!r} is not of the form os-arch-isa[-device], lowercase "
                         f"(e.g. linux-x86_64-avx512, darwin-arm64-neon, linux-x86_64-avx2-cuda)")
    return pid


# -------------------------------------------------------------------------------------------------- keys

def _safe(part: str, what: str) -> str:
    if not isinstance(part, str) or not part:
        raise BaselineError(f"baseline key: {what} must be a non-empty string, got {part!r}")
    s = _SAFE.sub("_", part)
    if s in (".", ".."):
        raise BaselineError(f"baseline key: {what} {part!r} cannot name a file")
    return s


@dataclass(frozen=True)
class BaselineKey:
    case_id: str
    sut: str
    reference: str

    @property
    def filename(self) -> str:
        """``<case_id>--<sut>--<reference>.json``; characters outside [A-Za-z0-9._+-] become ``_``."""
        return (f"{_safe(self.case_id, 'case_id')}--{_safe(self.sut, 'sut')}--"
                f"{_safe(self.reference, 'reference')}.json")

    def to_json(self) -> dict:
        return {"case_id": self.case_id, "sut": self.sut, "reference": self.reference}

    @classmethod
    def of(cls, key: BaselineKey | tuple[str, str, str] | Mapping[str, Any] | Any) -> BaselineKey:
        """A key from a BaselineKey, a (case_id, sut, reference) tuple or a record (dict or Record). Keys
        are structured: a string is refused (an engine spec such as "jsonl:./eng --threads 2" holds the
        separator a file name would use), with a BaselineError, as is anything else that names no key."""
        if isinstance(key, BaselineKey):
            return key
        if isinstance(key, tuple) and len(key) == 3:
            return cls(*key)
        if isinstance(key, str):
            raise BaselineError(f"baseline key {key!r} is a string: pass a BaselineKey(case_id, sut, reference), "
                                "a (case_id, sut, reference) tuple or the record")
        try:
            doc = _as_dict(key)
            return cls(doc["case_id"], doc["sut"], doc["reference"])
        except KeyError as e:
            raise BaselineError(f"baseline key: {key!r} has no {e.args[0]}") from None
        except TypeError as e:
            raise BaselineError(f"baseline key: {e}") from None


def path_for(directory: str | os.PathLike, platform: str, key) -> Path:
    return Path(directory) / check_platform(platform) / BaselineKey.of(key).filename


# ------------------------------------------------------------------------------------------------ values

def _encode(v: float | None):
    if v is None:
        return None
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _decode(v, path: Path, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise BaselineError(f"{path}: field {where} must be a number, null, or one of \"nan\", \"inf\", "
                            f"\"-inf\"; got {type(v).__name__} {v!r}; {_UPDATE_HINT}")
    if isinstance(v, str):
        if v not in _NONFINITE:
            raise BaselineError(f"{path}: field {where} must be a number, got the string {v!r}; {_UPDATE_HINT}")
        return _NONFINITE[v]
    return float(v)


def _as_dict(record) -> dict:
    if isinstance(record, Mapping):
        return dict(record)
    if hasattr(record, "to_json"):
        return record.to_json()
    raise TypeError(f"expected a record (dict or harness.records.Record), got {type(record).__name__}")


def _metric_value(v) -> float | None:
    if v is None or isinstance(v, bool) or isinstance(v, str):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def record_rungs(record) -> dict[str, dict]:
    """``{rung: {"status": ..., "metrics": {name: float|None}}}`` from a record (dict or Record).
    Non-numeric metric values are left out; a rung's first_bad_position, when it has one, is kept as a
    position metric."""
    out: dict[str, dict] = {}
    for r in _as_dict(record).get("rungs") or []:
        r = _as_dict(r)
        metrics = {}
        for name, value in (r.get("metrics") or {}).items():
            if value is None or _metric_value(value) is not None:
                metrics[str(name)] = _metric_value(value)
        if r.get("first_bad_position") is not None and "first_bad_position" not in metrics:
            metrics["first_bad_position"] = _metric_value(r["first_bad_position"])
        out[str(r["rung"])] = {"status": str(r.get("status", "")), "metrics": metrics}
    return out


def _engine_summary(receipt) -> dict | None:
    if not receipt:
        return None
    d = _as_dict(receipt)
    return {k: d.get(k) for k in ("engine", "version", "artifact_sha256", "profile", "device")}


def topk_of(logits, k: int = 5, positions: int = 4) -> dict:
    """The reference's top-k logits at the first positions, small enough to keep in a baseline.
    `logits` is [T, V] (array-like). Ties are broken by the lower token id."""
    import numpy as np

    a = np.asarray(logits, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"logits must be [T, V], got shape {a.shape}")
    k = min(int(k), TOPK_MAX_K, a.shape[1])
    n = min(int(positions), TOPK_MAX_POSITIONS, a.shape[0])
    ids, vals = [], []
    for t in range(n):
        order = np.lexsort((np.arange(a.shape[1]), -a[t]))[:k]
        ids.append([int(i) for i in order])
        vals.append([_encode(a[t, i]) for i in order])
    return {"k": k, "positions": list(range(n)), "ids": ids, "logits": vals}


# -------------------------------------------------------------------------------------------- Baseline

@dataclass
class Baseline:
    platform: str
    key: BaselineKey
    rungs: dict[str, dict] = field(default_factory=dict)  # {rung: {"status": str, "metrics": {name: float|None}}}
    profile: str | None = None
    status: str = "pass"
    updated: str = ""
    engines: dict[str, dict | None] = field(default_factory=dict)
    model_sha256: str | None = None
    reference_topk: dict | None = None
    schema_version: int = BASELINE_SCHEMA
    path: Path | None = None

    def metrics(self) -> dict[str, dict[str, float | None]]:
        return {rung: dict(r["metrics"]) for rung, r in self.rungs.items()}

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "platform": self.platform,
            "key": self.key.to_json(),
            "profile": self.profile,
            "status": self.status,
            "updated": self.updated,
            "rungs": {rung: {"status": r["status"], "metrics": {m: _encode(v) for m, v in r["metrics"].items()}}
                      for rung, r in self.rungs.items()},
            "engines": self.engines,
            "model_sha256": self.model_sha256,
            "reference_topk": self.reference_topk,
        }

    @classmethod
    def from_json(cls, doc, path: str | os.PathLike = "<baseline>") -> Baseline:
        """Parse and check a baseline document; BaselineError names the file and the field."""
        path = Path(path)
        if not isinstance(doc, dict):
            raise BaselineError(f"{path}: a baseline is a JSON object, this holds {type(doc).__name__}; "
                                f"{_UPDATE_HINT}")
        version = doc.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise BaselineError(f"{path}: field schema_version must be an integer, got {version!r}; {_UPDATE_HINT}")
        if version > BASELINE_SCHEMA:
            raise BaselineError(
                f"{path}: baseline schema_version {version} is newer than this bitnet-crossval reads "
                f"(schema {BASELINE_SCHEMA}): upgrade bitnet-crossval, or regenerate the baseline with this "
                f"version (--update-baselines)")
        if version < 1:
            raise BaselineError(f"{path}: field schema_version is {version}, older than any this version "
                                f"reads (schema {BASELINE_SCHEMA}); {_UPDATE_HINT}")

        def want(name, types, optional=False):
            v = doc.get(name)
            if v is None and optional:
                return None
            if name not in doc or not isinstance(v, types) or isinstance(v, bool):
                tn = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
                raise BaselineError(f"{path}: field {name} must be {tn}, got {v!r}; {_UPDATE_HINT}")
            return v

        platform = want("platform", str)
        key_doc = want("key", dict)
        parts = []
        for part in ("case_id", "sut", "reference"):
            v = key_doc.get(part)
            if not isinstance(v, str) or not v:
                raise BaselineError(f"{path}: field key.{part} must be a non-empty string, got {v!r}; "
                                    f"{_UPDATE_HINT}")
            parts.append(v)
        rungs_doc = want("rungs", dict)
        rungs: dict[str, dict] = {}
        for rung, r in rungs_doc.items():
            if not isinstance(r, dict):
                raise BaselineError(f"{path}: field rungs.{rung} must be an object, got {r!r}; {_UPDATE_HINT}")
            status = r.get("status")
            if not isinstance(status, str):
                raise BaselineError(f"{path}: field rungs.{rung}.status must be a string, got {status!r}; "
                                    f"{_UPDATE_HINT}")
            m = r.get("metrics")
            if not isinstance(m, dict):
                raise BaselineError(f"{path}: field rungs.{rung}.metrics must be an object, got {m!r}; "
                                    f"{_UPDATE_HINT}")
            rungs[rung] = {"status": status,
                           "metrics": {name: _decode(v, path, f"rungs.{rung}.metrics.{name}") for name, v in m.items()}}
        engines = want("engines", dict, optional=True) or {}
        for role, e in engines.items():
            if e is not None and not isinstance(e, dict):
                raise BaselineError(f"{path}: field engines.{role} must be an object or null, got {e!r}; "
                                    f"{_UPDATE_HINT}")
        topk = want("reference_topk", dict, optional=True)
        if topk is not None:
            ids, vals = topk.get("ids"), topk.get("logits")
            if (not isinstance(ids, list) or not isinstance(vals, list) or len(ids) != len(vals)
                    or not all(isinstance(row, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                             for i in row) for row in ids)):
                raise BaselineError(f"{path}: field reference_topk.ids must be lists of token ids, one per "
                                    f"position, as many as reference_topk.logits; {_UPDATE_HINT}")
            for p, row in enumerate(vals):
                if not isinstance(row, list) or len(row) != len(ids[p]):
                    raise BaselineError(f"{path}: field reference_topk.logits[{p}] must be a list as long as "
                                        f"reference_topk.ids[{p}]; {_UPDATE_HINT}")
                for j, v in enumerate(row):
                    _decode(v, path, f"reference_topk.logits[{p}][{j}]")
        return cls(
            platform=platform,
            key=BaselineKey(*parts),
            rungs=rungs,
            profile=want("profile", str, optional=True),
            status=want("status", str, optional=True) or "pass",
            updated=want("updated", str, optional=True) or "",
            engines=engines,
            model_sha256=want("model_sha256", str, optional=True),
            reference_topk=topk,
            schema_version=version,
            path=path,
        )


# ------------------------------------------------------------------------------------------------ files

def load(directory: str | os.PathLike, platform: str, key) -> Baseline | None:
    """The baseline for `key` on `platform` under `directory`, or None when there is none.
    BaselineError when the file exists but cannot be used (newer schema, bad JSON, wrong types, or a
    file whose key or platform is not the one its name says)."""
    path = path_for(directory, platform, key)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise BaselineError(f"{path}: not UTF-8 text ({e}); {_UPDATE_HINT}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise BaselineError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                            f"{_UPDATE_HINT}") from None
    base = Baseline.from_json(doc, path)
    k = BaselineKey.of(key)
    if base.key.filename != k.filename:
        raise BaselineError(f"{path}: field key is {base.key.to_json()}, but the file is the baseline of "
                            f"{k.to_json()}; {_UPDATE_HINT}")
    if base.platform != platform:
        raise BaselineError(f"{path}: field platform is {base.platform!r}, but the file lies under "
                            f"{platform!r}; {_UPDATE_HINT}")
    return base


def list_baselines(directory: str | os.PathLike, platform: str | None = None) -> list[Path]:
    """Baseline files under `directory` (one platform, or all), sorted; temp files are left out."""
    root = Path(directory)
    if platform:
        dirs = [root / check_platform(platform)]
    else:
        dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return sorted(p for d in dirs if d.is_dir() for p in d.glob("*.json") if not p.name.startswith("."))


def from_record(platform: str, key, record, reference_topk: dict | None = None) -> Baseline:
    """The baseline a record makes (without writing it)."""
    doc = _as_dict(record)
    k = BaselineKey.of(key)
    for part in ("case_id", "sut", "reference"):
        if part in doc and doc[part] != getattr(k, part):
            raise BaselineError(f"baseline key {k.to_json()} does not match the record's {part} {doc[part]!r}")
    status = doc.get("status", "pass")
    if status not in ("pass", "fail"):
        raise BaselineError(f"not updating the baseline of {k.filename} on {platform}: the record's status is "
                            f"{status!r} ({doc.get('reason') or 'no reason given'}); only a run that compared "
                            f"(pass or fail) can be a baseline")
    receipts = doc.get("receipts") or {}
    return Baseline(
        platform=check_platform(platform),
        key=k,
        rungs=record_rungs(doc),
        profile=doc.get("profile"),
        status=status,
        updated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        engines={"sut": _engine_summary(receipts.get("sut")), "reference": _engine_summary(receipts.get("reference"))},
        model_sha256=(doc.get("model") or {}).get("sha256"),
        reference_topk=reference_topk,
    )


def update(directory: str | os.PathLike, platform: str, key, record, reference_topk: dict | None = None) -> Path:
    """Write (or replace) the baseline of `key` on `platform` from `record`, atomically; returns its path.
    Call only when the user asked (--update-baselines). `reference_topk` (see `topk_of`) is optional."""
    base = from_record(platform, key, record, reference_topk)
    path = path_for(directory, platform, base.key)
    text = json.dumps(base.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_text(path, text)
    return path


# --------------------------------------------------------------------------------------------- compare

_INFO_EXACT = {"seconds", "ppl", "ppl_sut", "ppl_ref", "ppl_reference", "perplexity", "tokens_per_s", "count"}
# later is better: where two greedy continuations part, how long their common prefix is
_POSITION = {"first_divergence", "first_bad_position", "first_diverging_position", "divergence_position",
             "matched_prefix"}
_TOPK_RATE = re.compile(r"^top\d*k?_[ab]_in_[ab]$")  # topk_a_in_b: fraction of positions, higher is better


def metric_rule(name: str) -> str | None:
    """How a metric is judged: "lower" (error-like), "rate" (agreement, higher is better), "cosine",
    "position" (a first divergence: later is better), "info" (never compared), None (unknown: not
    compared)."""
    n = name.lower()
    if n in _POSITION or (n.startswith("first_") and not n.endswith("_logits")):
        return "position"
    if "mismatch" in n or "nonfinite" in n or n.startswith("one_minus"):
        return "lower"
    if n in _INFO_EXACT or n.startswith("n_") or n.endswith(("_seconds", "_per_s", "_count")):
        return "info"
    if n.endswith(("_unc", "_position", "_positions")) or n == "positions":
        return None  # the uncertainty of a mean; where a maximum sits; how many positions
    if (any(s in n for s in ("agree", "contain", "match_rate", "accuracy")) or n.endswith("_rate")
            or _TOPK_RATE.match(n)):
        return "rate"
    if "cos" in n:
        return "cosine"
    if any(s in n for s in ("abs", "rel", "err", "mse", "rms", "kl", "diff", "delta", "dist")):
        return "lower"
    return None


def _worse_error(base: float, now: float, rel: float, abs_: float) -> bool:
    b, x = abs(base), abs(now)
    return x > b * (1.0 + rel) and (x - b) > abs_


def _no_position(v: float | None) -> bool:
    return v is None or math.isnan(v) or v < 0  # null, NaN or -1: no divergence


def _is_regression(rule: str, base: float | None, now: float | None, rel: float, abs_: float) -> bool:
    if rule == "position":
        if _no_position(base):
            return not _no_position(now)
        return not _no_position(now) and now < base
    if base is None or math.isnan(base):
        return False
    if now is None or math.isnan(now):
        return True
    if rule == "lower":
        return _worse_error(base, now, rel, abs_)
    if rule == "rate":
        return now < base
    if rule == "cosine":
        return _worse_error(1.0 - base, 1.0 - now, rel, abs_)
    return False


def compare(baseline: Baseline, record_metrics, rel: float = DEFAULT_REL, abs: float = DEFAULT_ABS) -> list[dict]:
    """Regressions of a run against its baseline: ``[{"metric": "<rung>.<name>", "baseline": x, "now": y}]``,
    empty when nothing got worse, in ladder order. `record_metrics` is a record (dict or Record: rung
    statuses, missing rungs and missing metrics are then judged too) or ``{rung: {metric: value}}`` (only
    the metrics given are judged). The rules are in the module docstring."""
    whole = isinstance(record_metrics, Mapping) and "rungs" in record_metrics or hasattr(record_metrics, "to_json")
    if whole:
        now_rungs = record_rungs(record_metrics)
    else:
        now_rungs = {str(r): {"status": None, "metrics": {m: _metric_value(v) for m, v in (ms or {}).items()}}
                     for r, ms in (record_metrics or {}).items()}
    out: list[dict] = []
    order = {r: i for i, r in enumerate(RUNGS)}
    for rung in sorted(baseline.rungs, key=lambda r: (order.get(r, len(order)), r)):
        b = baseline.rungs[rung]
        now = now_rungs.get(rung)
        if now is None:
            if whole and b["status"] == "pass":
                out.append({"metric": f"{rung}.status", "baseline": b["status"], "now": "missing"})
            continue
        if b["status"] == "pass" and now["status"] not in (None, "pass"):
            out.append({"metric": f"{rung}.status", "baseline": b["status"], "now": now["status"]})
        for name, bv in b["metrics"].items():
            rule = metric_rule(name)
            if rule in (None, "info"):
                continue
            if name not in now["metrics"]:
                if whole and rule != "position" and bv is not None:
                    out.append({"metric": f"{rung}.{name}", "baseline": bv, "now": None})
                continue
            nv = now["metrics"][name]
            if _is_regression(rule, bv, nv, rel, abs):
                out.append({"metric": f"{rung}.{name}", "baseline": bv, "now": nv})
    return out


def compare_reference_topk(baseline: Baseline, now, rel: float = 1e-5, abs: float = 1e-6) -> list[dict]:
    """Whether the reference itself moved: its top-k ids at the kept positions must be the same and each
    logit within `rel` relative or `abs` absolute. `now` is the reference's logits [T, V] or a `topk_of`
    result (what the ladder keeps in `Record.reference_topk`). Returns
    ``[{"metric": "reference_topk[p]...", "baseline": x, "now": y}]``, empty when it did not move."""
    kept = baseline.reference_topk
    if not kept or now is None:
        return []
    k = kept.get("k", len(kept["ids"][0]) if kept["ids"] else 1)
    if not (isinstance(now, Mapping) and "ids" in now):
        now = topk_of(now, k=k, positions=len(kept["ids"]))
    out = []
    for p, (bids, bvals) in enumerate(zip(kept["ids"], kept["logits"])):
        if p >= len(now["ids"]):
            out.append({"metric": f"reference_topk[{p}]", "baseline": bids, "now": None})
            continue
        nids, nvals = list(now["ids"][p])[:len(bids)], list(now["logits"][p])[:len(bids)]
        if nids != bids:
            out.append({"metric": f"reference_topk[{p}].ids", "baseline": bids, "now": nids})
            continue
        for j, (bv, nv) in enumerate(zip(bvals, nvals)):
            b = _decode(bv, Path("<baseline>"), "reference_topk")
            x = _decode(nv, Path("<now>"), "reference_topk")
            if not (math.isclose(b, x, rel_tol=rel, abs_tol=abs) or (math.isnan(b) and math.isnan(x))):
                out.append({"metric": f"reference_topk[{p}].logits[{j}]", "baseline": b, "now": x})
    return out


def engine_changes(baseline: Baseline, record) -> list[str]:
    """What differs between the engines (and model) the baseline was taken with and this record's: a
    regression seen together with one of these is likely explained by it. Human-readable lines."""
    doc = _as_dict(record)
    receipts = doc.get("receipts") or {}
    out = []
    for role in ("sut", "reference"):
        was, now = baseline.engines.get(role), _engine_summary(receipts.get(role))
        if was is None or now is None:
            continue
        for k in ("engine", "version", "artifact_sha256"):
            if was.get(k) != now.get(k):
                out.append(f"{role} {k}: {was.get(k)} -> {now.get(k)}")
    model = (doc.get("model") or {}).get("sha256")
    if baseline.model_sha256 and model and model != baseline.model_sha256:
        out.append(f"model sha256: {baseline.model_sha256} -> {model}")
    return out
