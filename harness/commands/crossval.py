"""`bitnet-xval crossval`: cross-validate a model (or the case files) against the references in one command,
with the same ladder, records, baselines, report and verdicts as `pytest` with the plugin (harness/runner.py
is behind both).

  bitnet-xval crossval --model my.gguf --reference llama_cpp --tolerance 1e-4
  bitnet-xval crossval --engine "jsonl:./my-engine {model}" --model my.gguf --report-html out/r.html

Exit 0 when every pair agrees (a case's known reference bug showing counts as agreeing), 1 when a pair
fails or breaks, 2 when nothing could be compared (every pair skipped, or bad arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("crossval", help="cross-validate a model or the case files against the references",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a GGUF file: the default prompts and corpus against the references that run it")
    p.add_argument("--cases", action="append", help="case file (repeatable; default: cases/*.toml)")
    p.add_argument("--reference", action="append", help="reference engine (repeatable; default: the case's)")
    p.add_argument("--engine", default="bitnet_ref", help="system under test (default bitnet_ref; jsonl:COMMAND)")
    p.add_argument("--tolerance", type=float, help="primary logits tolerance (max |Δ|)")
    p.add_argument("--validation", choices=("bit-exact", "independent"), help="default: from the engine")
    p.add_argument("--profile", help="numerics profile of the system under test (default: the case's)")
    p.add_argument("--platform", help="platform id for baselines (default: detected)")
    p.add_argument("--baselines", choices=("gate", "report"), default="gate")
    p.add_argument("--baselines-dir", help="default: ./baselines")
    p.add_argument("--update-baselines", action="store_true")
    p.add_argument("--report-html", help="write the HTML report here")
    p.add_argument("--records", help="directory for the JSON records (default: beside the report)")
    p.add_argument("--history", help="append this run to a history directory")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=run)


def _options(args):
    from harness.runner import RunOptions
    from harness.tolerances import ToleranceError, check_value

    if args.tolerance is not None:
        try:
            check_value("max_abs", args.tolerance, "--tolerance")
        except ToleranceError as e:
            raise ValueError(str(e)) from None
    return RunOptions(engine=args.engine, references=args.reference, model=args.model, cases=args.cases,
                      profile=args.profile, validation=args.validation, tolerance=args.tolerance,
                      platform=args.platform, baselines_dir=args.baselines_dir, baselines_mode=args.baselines,
                      update_baselines=args.update_baselines)


def _progress(i: int, n: int, label: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K[{i}/{n}] {label} ...")
        sys.stderr.flush()


def run(args) -> int:
    from harness.records import write_json_atomic
    from harness.runner import RunError, pairs, platform_tolerances, record_filename, run_pair, verdict

    try:
        options = _options(args)
        todo = pairs(options)
        overrides = platform_tolerances(options)
    except (RunError, ValueError) as e:
        print(f"crossval: {e}", file=sys.stderr)
        return 2
    records_dir = Path(args.records) if args.records else (
        Path(str(Path(args.report_html).with_suffix("")) + "-records") if args.report_html else None)
    models_dir = Path(os.environ.get("BITNET_MODELS_CACHE") or tempfile.mkdtemp(prefix="crossval-models-"))
    models_dir.mkdir(parents=True, exist_ok=True)
    results, records = [], []
    for i, (case, ref) in enumerate(todo, 1):
        label = case.param_id(ref)
        _progress(i, len(todo), label)
        record = run_pair(case, ref, options, models_dir, platform_overrides=overrides)
        outcome, message = verdict(record)
        if case.xfail:  # strict, as the plugin's xfail mark: the known bug must show
            outcome, message = ("xfail", message) if outcome == "xfail" else (
                "fail", f"the known reference bug did not show ({case.xfail}): {outcome} {message}".strip())
        records.append(record.to_json())
        if records_dir is not None:
            write_json_atomic(records_dir / record_filename(record), record.to_json())
        results.append({"pair": label, "outcome": outcome, "message": message, "failed_rung": record.failed_rung})
        if args.format == "text":
            if sys.stderr.isatty():
                sys.stderr.write("\r\033[K")
            print(f"{outcome.upper():6} {label}" + (f": {message}" if message else ""), flush=True)
    report = None
    if args.report_html:
        from harness.report import write_report

        report = str(write_report(records, args.report_html, history=args.history))
    if args.history and records:
        from harness import history as H

        H.append_run(args.history, records)
        H.write_html(args.history)
    counts = Counter(r["outcome"] for r in results)
    compared = sum(counts[k] for k in ("pass", "fail", "xfail"))
    code = 1 if counts["fail"] or counts["error"] else (0 if compared else 2)
    verdict_word = {0: "agree", 1: "fail", 2: "nothing compared"}[code]
    if args.format == "json":
        print(json.dumps({"verdict": verdict_word, "exit_code": code, "counts": dict(counts), "pairs": results,
                          "report": report, "records_dir": str(records_dir) if records_dir else None,
                          "records": records}, indent=2, default=str))
    else:
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no pairs"
        print(f"crossval: {verdict_word} ({summary})" + (f"; report {report}" if report else ""))
    return code
