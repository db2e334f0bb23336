"""Case files (`cases/*.toml`): what to cross-validate.

    [[case]]
    id = "tq2_0-bitnet-tiny"                      # unique; becomes part of the pytest id
    model = { synth = { preset = "tiny", arch = "bitnet", format = "tq2_0" } }
        # or { lock = "org/repo:file.gguf" } (an entry of models.lock) or { path = "model.gguf" }
        # or { trained = { format = "tq2_0", arch = "bitnet" } } (a shipped trained model, models/, in that
        # format; arch defaults to bitnet-b1.58)
    references = ["llama_cpp"]                    # engines to compare the system under test against
    profile = "llama-cpp"                         # numerics profile of the system under test
    prompts = ["The quick brown fox ...", "..."]
    prompt_ids = [[128000, 5, 5, 5]]              # optional: prompts given as token ids
    corpus = "corpus/small.txt"                   # optional, relative to the case file: perplexity rung
    ctx = 128                                     # perplexity context
    greedy_tokens = 32
    rungs = ["file", "weights", "tokens", "first_logits", "all_logits", "greedy", "perplexity"]
    markers = ["slow"]                            # extra pytest markers (format and arch markers are added)
    xfail = "upstream bug ..."                    # a known reference bug: expected to fail (strict)
    reference_options = { n_ubatch = 1 }          # passed to the reference adapters that accept them
    validation = "independent"                    # or "bit-exact"; default: bit-exact for bitnet_ref with an
                                                  # emulation profile, independent otherwise (harness/validation.py)
    teacher_forced_cap = 32                       # greedy: at most this many teacher-forced restarts
    quantization_cost = true                      # perplexity: also what each engine costs against bitnet_ref's
                                                  # exact profile (PPL, KL); default true for trained models
    [case.tolerances]                             # overrides of the defaults, by metric
    max_abs = 1e-4

A malformed file raises CaseError naming the file, the case and the field.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .records import RUNGS

CASES_DIR = Path(__file__).resolve().parent.parent / "cases"
KNOWN_REFERENCES = ("llama_cpp", "bitnet_cpp", "bitnet_cpp_cli", "bitnet_cpp_tl2")
FORMAT_MARKERS = {"i2_s": "i2s", "tl1": "tl1", "tl2": "tl2", "tq1_0": "tq1", "tq2_0": "tq2", "f16": "f16",
                  "f32": "f32"}
CASE_KEYS = {"id", "model", "references", "profile", "prompts", "prompt_ids", "corpus", "ctx", "greedy_tokens",
             "rungs", "markers", "tolerances", "reference_options", "description", "xfail", "validation",
             "teacher_forced_cap", "quantization_cost"}


class CaseError(ValueError):
    """A case file that cannot be used; the message names the file, the case and the field."""


@dataclass
class Case:
    id: str
    file: str
    model: dict  # {"synth": {...}} | {"trained": {"format": ...}} | {"lock": "repo:file"} | {"path": "..."}
    references: list[str]
    profile: str = "exact"
    prompts: list[str] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    corpus: str | None = None
    ctx: int = 128
    greedy_tokens: int = 32
    rungs: list[str] = field(default_factory=lambda: list(RUNGS))
    markers: list[str] = field(default_factory=list)
    tolerances: dict = field(default_factory=dict)  # metric = value, and "<profile>[/<format>]" sub-tables
    reference_options: dict = field(default_factory=dict)
    description: str = ""
    xfail: str | None = None  # why this pair is expected to fail (a known reference bug)
    # what the model file says (read by describe_model) when the model is a path rather than a synth spec
    model_format: str | None = None
    model_arch: str | None = None
    validation: str | None = None  # "bit-exact" | "independent"; None: the default (harness/validation.py)
    teacher_forced_cap: int = 32  # greedy, independent mode: teacher-forced restarts at most
    quantization_cost: bool = False  # perplexity rung: each engine's PPL and KL against the exact profile

    @property
    def format(self) -> str | None:
        """The weight format (case-file spelling: "tq2_0", "i2_s", "f32", ...): the synth spec's, else the
        one read from the model file (None when neither is known, e.g. a lock entry not yet downloaded)."""
        for kind in ("synth", "trained"):
            if kind in self.model:
                return self.model[kind].get("format")
        return self.model_format

    @property
    def arch(self) -> str | None:
        if "trained" in self.model:
            from bitnet_ref.train import ARCH

            return self.model["trained"].get("arch", ARCH)
        return self.model["synth"].get("arch") if "synth" in self.model else self.model_arch

    def all_markers(self) -> list[str]:
        out = list(self.markers)
        if self.format in FORMAT_MARKERS:
            out.append(FORMAT_MARKERS[self.format])
        if self.arch:
            out.append(self.arch.replace("-", "_").replace(".", "_"))
        return out

    def param_id(self, reference: str) -> str:
        return f"{self.id}-vs-{reference}"


def describe_model(path: str | Path) -> tuple[str | None, str | None]:
    """(architecture, weight format) of a GGUF file, from its header: the format is the type of the
    projection weights (`blk.N.attn_q.weight`), lowercase as case files spell it ("i2_s", "tq2_0", "f32").
    ModelError when the file cannot be read."""
    from bitnet_ref.gguf import open_gguf

    with open_gguf(path) as gf:
        arch = gf.architecture
        fmt = next((t.type_name.lower() for t in gf.tensors if t.name.endswith("attn_q.weight")), None)
    return arch, fmt


def _fail(path, case_id, fld, message) -> CaseError:
    where = f"{path}" + (f", case {case_id!r}" if case_id else "") + (f", field {fld!r}" if fld else "")
    return CaseError(f"{where}: {message}")


def _expect(value, kind, path, case_id, fld):
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _fail(path, case_id, fld, f"must be {names}, got {type(value).__name__} {value!r}")
    return value


def load_case_file(path: str | Path) -> list[Case]:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise _fail(path, None, None, f"cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise _fail(path, None, None, f"not valid TOML: {e}") from None
    raw_cases = doc.get("case")
    if not isinstance(raw_cases, list) or not raw_cases:
        raise _fail(path, None, "case", "needs at least one [[case]] table")
    return [_parse_case(path, i, c) for i, c in enumerate(raw_cases)]


def _parse_case(path: Path, index: int, c) -> Case:
    if not isinstance(c, dict):
        raise _fail(path, f"#{index}", None, "each [[case]] must be a table")
    cid = c.get("id")
    if not isinstance(cid, str) or not cid or any(ch.isspace() or ch in "[]" for ch in cid):
        raise _fail(path, f"#{index}", "id", "needs a non-empty id without spaces or brackets")
    unknown = set(c) - CASE_KEYS
    if unknown:
        raise _fail(path, cid, sorted(unknown)[0], f"unknown field (known: {', '.join(sorted(CASE_KEYS))})")
    model = _expect(c.get("model"), dict, path, cid, "model")
    if len(model) != 1 or next(iter(model)) not in ("synth", "trained", "lock", "path"):
        raise _fail(path, cid, "model", "must be exactly one of {synth = {...}}, {trained = {format = ...}}, "
                                        "{lock = \"repo:file\"}, {path = ...}")
    if "synth" in model:
        from bitnet_ref.synth import SynthSpec

        try:
            SynthSpec(**_expect(model["synth"], dict, path, cid, "model.synth")).resolved()
        except (TypeError, ValueError) as e:
            raise _fail(path, cid, "model.synth", str(e)) from None
    elif "trained" in model:
        from bitnet_ref.train import ARCHS, FORMAT_NAMES

        spec = _expect(model["trained"], dict, path, cid, "model.trained")
        if (not {"format"} <= set(spec) <= {"format", "arch"} or spec["format"] not in FORMAT_NAMES
                or spec.get("arch", ARCHS[0]) not in ARCHS):
            raise _fail(path, cid, "model.trained", f"must be {{format = F, arch = A}} with F one of "
                                                    f"{', '.join(FORMAT_NAMES)} and A (optional) one of "
                                                    f"{', '.join(ARCHS)}; got {spec!r}")
    elif "path" in model:
        model = {"path": str((path.parent / _expect(model["path"], str, path, cid, "model.path")).resolve())}
    model_arch = model_format = None
    if "path" in model and Path(model["path"]).is_file():
        from bitnet_ref.errors import ModelError

        try:
            model_arch, model_format = describe_model(model["path"])
        except ModelError:
            pass  # the file rung reports what is wrong with it
    refs = _expect(c.get("references", []), list, path, cid, "references")
    for r in refs:
        if not (isinstance(r, str) and (r in KNOWN_REFERENCES or r.startswith("jsonl:"))):
            raise _fail(path, cid, "references", f"unknown engine {r!r} (known: {', '.join(KNOWN_REFERENCES)}, "
                                                 "jsonl:COMMAND)")
    from bitnet_ref.numerics import PROFILES

    profile = c.get("profile", "exact")
    if profile not in PROFILES:
        raise _fail(path, cid, "profile", f"unknown profile {profile!r} (known: {', '.join(PROFILES)})")
    prompts = _expect(c.get("prompts", []), list, path, cid, "prompts")
    if not all(isinstance(p, str) and p for p in prompts):
        raise _fail(path, cid, "prompts", "must be a list of non-empty strings")
    prompt_ids = _expect(c.get("prompt_ids", []), list, path, cid, "prompt_ids")
    if not all(isinstance(p, list) and p and all(isinstance(i, int) and i >= 0 for i in p) for p in prompt_ids):
        raise _fail(path, cid, "prompt_ids", "must be a list of non-empty lists of token ids")
    if not prompts and not prompt_ids:
        raise _fail(path, cid, "prompts", "a case needs prompts or prompt_ids")
    rungs = _expect(c.get("rungs", list(RUNGS)), list, path, cid, "rungs")
    bad = [r for r in rungs if r not in RUNGS]
    if bad:
        raise _fail(path, cid, "rungs", f"unknown rung {bad[0]!r} (known: {', '.join(RUNGS)})")
    from .tolerances import ToleranceError, check_overrides

    try:  # the one validator of tolerance tables (harness.tolerances), as for platform overrides
        tol = check_overrides(_expect(c.get("tolerances", {}), dict, path, cid, "tolerances"), "[tolerances]")
    except ToleranceError as e:
        raise _fail(path, cid, "tolerances", str(e)) from None
    corpus = c.get("corpus")
    if corpus is not None:
        cpath = path.parent / _expect(corpus, str, path, cid, "corpus")
        if not cpath.is_file():
            raise _fail(path, cid, "corpus", f"no file at {cpath}")
        corpus = str(cpath.resolve())
    ints = {}
    validation = c.get("validation")
    if validation is not None:
        from .validation import MODES

        if validation not in MODES:
            raise _fail(path, cid, "validation", f"unknown mode {validation!r} (known: {', '.join(MODES)})")
    for k, default in (("ctx", 128), ("greedy_tokens", 32), ("teacher_forced_cap", 32)):
        v = c.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _fail(path, cid, k, f"must be a positive integer, got {v!r}")
        ints[k] = v
    markers = _expect(c.get("markers", []), list, path, cid, "markers")
    cost = _expect(c.get("quantization_cost", "trained" in model), bool, path, cid, "quantization_cost")
    return Case(id=cid, file=str(path), model=model, references=list(refs), profile=profile, prompts=prompts,
                prompt_ids=prompt_ids, corpus=corpus, rungs=rungs, markers=[str(m) for m in markers],
                tolerances=tol,
                reference_options=_expect(c.get("reference_options", {}), dict, path, cid, "reference_options"),
                description=str(c.get("description", "")),
                xfail=_expect(c["xfail"], str, path, cid, "xfail") if "xfail" in c else None,
                model_format=model_format, model_arch=model_arch, validation=validation,
                quantization_cost=cost, **ints)


def load_cases(paths: list[str | Path] | None = None) -> list[Case]:
    """All cases of the given files (default: every cases/*.toml); ids must be unique across files."""
    files = [Path(p) for p in paths] if paths else sorted(CASES_DIR.glob("*.toml"))
    cases: list[Case] = []
    seen: dict[str, str] = {}
    for f in files:
        for case in load_case_file(f):
            if case.id in seen:
                raise _fail(f, case.id, "id", f"duplicate id (also in {seen[case.id]})")
            seen[case.id] = str(f)
            cases.append(case)
    return cases
