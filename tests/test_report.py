"""The HTML report: rendered from synthetic records, checked as text and in a headless browser."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import subprocess
import zlib
from html import escape

import pytest

from harness.records import Check, Record, RungResult
from harness.report import render_html, write_report

EVIL = "<script>alert('x')</script>"
SKIP_REASON = "bitnet.cpp not built: set BITNET_CPP_DIR <dir> & rebuild"


def _receipt(engine: str, sha: str = "ab" * 32) -> dict:
    return {
        "engine": engine,
        "version": "0.1.0+g1234abc",
        "model": "/models/tiny.gguf",
        "model_sha256": "cd" * 32,
        "artifact": f"/opt/{engine}/libengine.so",
        "artifact_sha256": sha,
        "profile": "llama-cpp",
        "threads": 4,
        "device": "cpu",
        "command": [engine, "--model", "/models/tiny.gguf", "-p", "hello"],
        "timings": {"load": 0.12, "logits": 0.034},
        "host": "builder",
    }


def _ladder(upto: str, failing: str | None = None, n: int = 24, bad_from: int | None = None) -> list[RungResult]:
    out = []
    for name in ("file", "weights", "tokens", "first_logits", "all_logits", "greedy", "perplexity"):
        if name == "all_logits":
            per_pos = [1e-6 * (1 + (i % 5)) for i in range(n)]
            if bad_from is not None:
                per_pos = [v if i < bad_from else 0.02 * (1 + i - bad_from) for i, v in enumerate(per_pos)]
            mx = max(per_pos)
            ok = name != failing
            out.append(
                RungResult(
                    rung=name,
                    status="pass" if ok else "fail",
                    detail=f"{n} positions, max |Δ| {mx:.3g}"
                    + ("" if ok else f" breaks tolerance at position {bad_from}"),
                    metrics={"max_abs": mx, "cosine": 0.999999, "top1_agreement": 1.0 if ok else 0.9},
                    checks=[
                        Check("max_abs", mx, 1e-4, "<=", "default:llama-cpp", mx <= 1e-4),
                        Check("top1_agreement", 1.0 if ok else 0.9, 1.0, ">=", "case:cases/tiny.toml", ok),
                    ],
                    series={
                        "max_abs_per_position": per_pos,
                        "kl_per_position": [v * v * 10 for v in per_pos],
                        "cosine_per_position": [1.0 - v * 1e-2 for v in per_pos],
                    },
                    # as harness.metrics writes it: a first bin [0, 2^e) of exact zeros, then power-of-two bins
                    histogram={
                        "edges": [0.0] + [2.0**k for k in range(-26, -12)],
                        "counts": [9, 1, 3, 5, 15, 37, 59, 125, 197, 251, 97, 12, 2, 1],
                    },
                    first_bad_position=bad_from,
                    localization=(
                        {
                            "layer": 0,
                            "op": "ffn_sub_norm-0",
                            "max_abs": 0.3,
                            "nodes": [
                                {"name": "attn_norm-0", "max_abs": 1e-7},
                                {"name": "ffn_sub_norm-0", "max_abs": 0.3},
                            ],
                        }
                        if not ok
                        else None
                    ),
                )
            )
        else:
            st = "fail" if name == failing else "pass"
            out.append(RungResult(rung=name, status=st, detail=f"{name} agrees" if st == "pass" else f"{name} differs"))
        if name == upto or name == failing:
            break
    return out


def synthetic_records() -> list[dict]:
    ok = Record(
        case_id="tq2_0-bitnet-tiny",
        sut="bitnet_ref",
        reference="llama_cpp",
        profile="llama-cpp",
        status="pass",
        test_id="test_crossval[tq2_0-bitnet-tiny-vs-llama_cpp]",
        rungs=_ladder("perplexity"),
        baseline={"status": "match", "platform": "linux-x86_64-avx512"},
        receipts={"sut": _receipt("bitnet_ref"), "reference": _receipt("llama_cpp")},
        model={"path": "/models/tiny.gguf", "sha256": "cd" * 32, "spec": {"preset": "tiny", "format": "tq2_0"}},
        environment={"python": "3.11.9", "platform": "linux-x86_64-avx512", "hostname": "builder"},
        seconds=1.5,
    )
    fail = Record(
        case_id="i2_s-bitnet-tiny",
        sut="bitnet_ref",
        reference="bitnet_cpp",
        profile="bitnet-cpp",
        status="fail",
        failed_rung="all_logits",
        reason="max_abs 0.26 > 1e-4 at position 12",
        test_id="test_crossval[i2_s-bitnet-tiny-vs-bitnet_cpp]",
        rungs=_ladder("all_logits", failing="all_logits", bad_from=12),
        baseline={"status": "match", "platform": "linux-x86_64-avx512"},
        receipts={"sut": _receipt("bitnet_ref"), "reference": _receipt("bitnet_cpp")},
        environment={"python": "3.11.9", "platform": "linux-x86_64-avx512"},
    )
    skip = Record(
        case_id="i2_s-bitnet-2b",
        sut="bitnet_ref",
        reference="bitnet_cpp",
        profile="bitnet-cpp",
        status="skip",
        reason=SKIP_REASON,
        receipts={"sut": None, "reference": None},
    )
    error = Record(
        case_id=f"tl1-{EVIL}",
        sut="bitnet_ref",
        reference="llama_cpp",
        profile="llama-cpp",
        status="error",
        failed_rung="tokens",
        reason="llama_cpp crashed: SIGSEGV in ggml_compute_forward",
        rungs=_ladder("tokens", failing="tokens"),
        receipts={"sut": _receipt("bitnet_ref"), "reference": None},
    )
    regr = Record(
        case_id="tq1_0-bitnet-tiny",
        sut="bitnet_ref",
        reference="llama_cpp",
        profile="llama-cpp",
        status="pass",
        rungs=_ladder("perplexity"),
        baseline={
            "status": "regression",
            "platform": "linux-x86_64-avx512",
            "regressions": [{"metric": "max_abs", "baseline": 1e-6, "now": 5e-6}],
        },
        receipts={"sut": _receipt("bitnet_ref"), "reference": _receipt("llama_cpp")},
    )
    return [json.loads(json.dumps(r.to_json())) for r in (ok, fail, skip, error, regr)]


@pytest.fixture(scope="module")
def html() -> str:
    return render_html(
        synthetic_records(),
        "crossval <test>",
        generated_at="2025-01-02 03:04:05 UTC",
        environment={"platform": "linux-x86_64-avx512", "python": "3.11.9"},
    )


def _summary_rows(doc: str) -> list[str]:
    m = re.search(r'<table class="summary" id="summary-table">.*?<tbody>(.*?)</tbody>', doc, re.S)
    assert m, "summary table missing"
    return re.findall(r"<tr [^>]*>.*?</tr>", m.group(1), re.S)


def test_counts_verdict_and_header(html):
    assert "<b>2</b> pass" in html and "<b>1</b> fail" in html and "<b>1</b> skip" in html and "<b>1</b> error" in html
    assert "<b>1</b> regression" in html
    assert 'class="verdict v-fail"' in html and "FAIL: 1 of 5 pairs disagree" in html
    assert "linux-x86_64-avx512" in html and "2025-01-02 03:04:05 UTC" in html
    assert "<title>crossval &lt;test&gt;</title>" in html


def test_summary_rows_sorted_failures_first(html):
    rows = _summary_rows(html)
    assert len(rows) == 5
    statuses = [re.search(r'data-status="(\w+)"', r).group(1) for r in rows]
    assert statuses == ["fail", "error", "pass", "skip", "pass"]
    assert "row-regr" in rows[2] and "tq1_0-bitnet-tiny" in rows[2]
    assert "i2_s-bitnet-tiny" in rows[0] and "all_logits" in rows[0]
    # the primary metric against its limit, and every row links to its section
    assert "≤ 1e-4" in rows[0] and 'class="num bad"' in rows[0]
    for r in rows:
        anchor = re.search(r'href="#([^"]+)"', r).group(1)
        assert f'id="{anchor}"' in html


def test_skip_shows_reason_and_never_looks_like_pass(html):
    row = [r for r in _summary_rows(html) if 'data-status="skip"' in r][0]
    assert f"skipped: {escape(SKIP_REASON)}" in row
    assert "b-skip" in row and "b-pass" not in row and "PASS" not in row


def test_error_distinct_from_failure(html):
    rows = _summary_rows(html)
    err = [r for r in rows if 'data-status="error"' in r][0]
    assert "b-error" in err and "ERROR" in err and "SIGSEGV" in err and "b-fail" not in err


def test_localization_and_regression_in_sections(html):
    assert "ffn_sub_norm-0" in html and "First diverging layer <b>0</b>" in html
    assert "regressed" in html
    assert "default:llama-cpp" in html and "case:cases/tiny.toml" in html


def test_self_contained_svg_and_escaped(html):
    assert "<svg" in html and "<polyline" in html and 'class="bar"' in html
    assert not re.search(r"https?://", html)
    assert not re.search(r"""(src|href)\s*=\s*(?!["']?#)""", html), "only in-page links allowed"
    assert "@import" not in html and "url(" not in html
    assert EVIL not in html and escape(EVIL) in html
    assert html.count("<script>") == 1  # only the expand/collapse helper


def test_pass_without_reference_receipt_is_an_error():
    rec = synthetic_records()[0]
    rec["receipts"]["reference"] = None
    doc = render_html([rec], "t", generated_at="now")
    assert 'data-status="error"' in doc and "reference has no receipt" in doc
    assert "<b>0</b> pass" in doc


def test_all_skipped_is_not_a_pass():
    rec = synthetic_records()[2]
    doc = render_html([rec], "t", generated_at="now")
    assert "NOT VERIFIED" in doc and 'class="verdict v-skip"' in doc and "b-pass" not in doc.split("</style>")[1]


def test_empty_and_malformed_records_render():
    assert "NOTHING RAN" in render_html([], "t", generated_at="now")
    weird = {
        "case_id": "x",
        "status": "bogus",
        "rungs": [
            {
                "rung": "all_logits",
                "series": {"max_abs_per_position": [float("nan"), 0.0, 1e-3, float("inf")]},
                "histogram": {"edges": [0, 1], "counts": [1, 2]},
            }
        ],
    }
    doc = render_html([weird], "t", generated_at="now")
    assert "invalid status" in doc and "malformed" in doc


def test_cli_renders_a_records_directory(tmp_path, capsys):
    from harness.records import write_json_atomic
    from harness.report.__main__ import main

    for i, rec in enumerate(synthetic_records()):
        write_json_atomic(tmp_path / "records" / f"{i}.json", rec)
    assert main([str(tmp_path / "records"), str(tmp_path / "out" / "r.html")]) == 0
    assert "5 records" in capsys.readouterr().out
    assert (tmp_path / "out" / "r.json").exists() and "<svg" in (tmp_path / "out" / "r.html").read_text("utf-8")


def test_write_report_atomic_pair(tmp_path):
    recs = synthetic_records()
    out = write_report(recs, tmp_path / "sub" / "report.html", generated_at="now")
    assert out == tmp_path / "sub" / "report.html" and out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    doc = json.loads((tmp_path / "sub" / "report.json").read_text(encoding="utf-8"))
    assert [r["case_id"] for r in doc["records"]] == [r["case_id"] for r in recs]
    assert doc["counts"] == {"pass": 2, "fail": 1, "skip": 1, "error": 1}
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["report.html", "report.json"]
    with pytest.raises(ValueError):
        write_report(recs, tmp_path / "x.json")


# ---------------------------------------------------------------------------------------------------
# headless browser


def _png_pixels(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, bytes per pixel, raw pixel rows without filter bytes) of an 8-bit RGB/RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    assert ihdr is not None
    w, h, depth, ctype, _, _, interlace = ihdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, f"unexpected PNG format {ihdr}"
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = w * bpp
    assert len(raw) == h * (stride + 1)
    out = bytearray(h * stride)
    prev = bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif f == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev))
        elif f == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif f == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else (b if pb <= pc else c))) & 0xFF
        out[y * stride : (y + 1) * stride] = line
        prev = line
    return w, h, bpp, bytes(out)


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def test_headless_chromium_renders_report(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no `chromium` binary on PATH (Debian: apt-get install -y chromium)")
    page = write_report(
        synthetic_records(),
        tmp_path / "report.html",
        title="crossval report",
        generated_at="2025-01-02 03:04:05 UTC",
        environment={"platform": "linux-x86_64-avx512"},
    )
    png = tmp_path / "shot.png"
    base = [chromium, *CHROMIUM_FLAGS]
    shot = subprocess.run(
        [
            *base,
            f"--user-data-dir={tmp_path / 'p1'}",
            f"--screenshot={png}",
            "--window-size=1280,1600",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert png.exists() and png.stat().st_size > 0, f"no screenshot (rc {shot.returncode}): {shot.stderr[-2000:]}"
    dom = subprocess.run(
        [*base, f"--user-data-dir={tmp_path / 'p2'}", "--dump-dom", page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    rows = _summary_rows(dom)
    assert len(rows) == 5 and "i2_s-bitnet-tiny" in rows[0]
    assert "&lt;script&gt;alert" in dom and dom.count("<script>") == 1  # the hostile case id stayed text

    w, h, bpp, px = _png_pixels(png.read_bytes())
    assert (w, h) == (1280, 1600)
    n = w * h
    lum = px[0::bpp]  # the red channel is enough to see text and highlights
    mean = sum(lum) / n
    var = sum((v - mean) ** 2 for v in lum[::7]) / len(lum[::7])
    assert math.sqrt(var) > 10, f"screenshot looks blank (std {math.sqrt(var):.1f})"
    # the failure highlight (#fdecea) of the top summary row is on screen
    fail_bg = bytes((0xFD, 0xEC, 0xEA))
    hits = sum(1 for i in range(0, len(px) // bpp, 11) if px[i * bpp : i * bpp + 3] == fail_bg)
    assert hits > 50, "no failure highlight visible in the screenshot"
