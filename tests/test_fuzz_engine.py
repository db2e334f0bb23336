"""Engine-level fuzzing: mutated model files that still validate are loaded and run (teacher-forced logits,
three greedy tokens) by bitnet_ref in every numerics profile and every tiny format, with the native kernels
and with BITNET_KERNELS=0. Only the project's errors may come out: no signal, no other exception, no hang.

Each file runs in a long-lived worker subprocess (tests/fuzz_engine_worker.py; one with kernels, one
without), restarted after a crash, so that a segfault fails the property instead of the test run and
process startup is paid once. `nox -s sanitize` runs this file against the ASan/UBSan build of the kernels
(the workers inherit its environment)."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from fuzz_budget import examples
from gguf_edit import tiny_model
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_fuzz_gguf import apply, overwrite  # no truncation: a cut file never validates

from bitnet_ref.errors import ERROR, ModelError
from bitnet_ref.gguf.validate import validate_file
from bitnet_ref.numerics import PROFILES

WORKER = Path(__file__).parent / "fuzz_engine_worker.py"
FORMATS = {"f32": "bitnet", "f16": "bitnet", "tq1_0": "bitnet", "tq2_0": "bitnet", "i2_s": "bitnet-b1.58"}
TIMEOUT = float(os.environ.get("BITNET_FUZZ_ENGINE_TIMEOUT", "120"))  # seconds per file (ASan is slow)
_DIR = Path(tempfile.mkdtemp(prefix="fuzz-engine-"))
_MODELS: dict[str, bytes] = {}


def model_bytes(fmt: str) -> bytes:
    if fmt not in _MODELS:
        _MODELS[fmt] = tiny_model(_DIR, fmt=fmt, arch=FORMATS[fmt], layers=1).read_bytes()
    return _MODELS[fmt]


class Worker:
    def __init__(self, kernels: bool):
        env = dict(os.environ)
        if not kernels:
            env["BITNET_KERNELS"] = "0"
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        hello = self.read(TIMEOUT)
        self.kernels = hello["kernels"]

    def read(self, timeout: float) -> dict:
        if not self.sel.select(timeout):
            self.kill()
            pytest.fail(f"the engine worker hung for more than {timeout:g} s")
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            err = self.proc.stderr.read()[-4000:]
            pytest.fail(f"the engine worker died (exit status {code}; a negative status is a signal)\n{err}")
        return json.loads(line)

    def run(self, path: Path, profile: str) -> dict:
        self.proc.stdin.write(json.dumps({"path": str(path), "profile": profile}) + "\n")
        self.proc.stdin.flush()
        return self.read(TIMEOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()
        self.sel.close()


_WORKERS: dict[bool, Worker] = {}


@pytest.fixture(autouse=True, scope="module")
def _stop_workers():
    yield
    for w in _WORKERS.values():
        w.kill()
    _WORKERS.clear()


def worker(kernels: bool) -> Worker:
    w = _WORKERS.get(kernels)
    if w is None or not w.alive():
        if w is not None:
            w.kill()
        w = _WORKERS[kernels] = Worker(kernels)
    return w


def run_file(raw: bytes, fmt: str, profile: str, kernels: bool) -> dict:
    path = _DIR / f"mutated-{fmt}.gguf"
    path.write_bytes(raw)
    w = worker(kernels)
    t0 = time.monotonic()
    out = w.run(path, profile)
    assert "crash" not in out, f"{fmt} {profile} kernels={kernels}: not a project error:\n{out['crash']}"
    assert time.monotonic() - t0 < TIMEOUT
    return out


@pytest.mark.parametrize("kernels", [True, False], ids=["native", "numpy"])
def test_unmutated_models_run(kernels):
    """The property's baseline: every format and profile runs the valid file, and the workers use the
    kernels or numpy as asked (a kernels worker without the extension says so here, not silently)."""
    w = worker(kernels)
    if kernels and not w.kernels:
        pytest.skip("the native kernels extension is not built (pip install -e . builds it)")
    assert w.kernels == kernels
    for fmt in FORMATS:
        for profile in PROFILES:
            out = run_file(model_bytes(fmt), fmt, profile, kernels)
            if (fmt, profile) == ("i2_s", "llama-cpp"):  # mainline has no I2_S: the engine refuses it
                assert out.get("code") == "unsupported-format", out
            else:
                assert out.get("ok") is True, (fmt, profile, out)


@settings(max_examples=examples("engine"), suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(fmt=st.sampled_from(sorted(FORMATS)), profile=st.sampled_from(sorted(PROFILES)), kernels=st.booleans(),
       muts=st.lists(overwrite, min_size=1, max_size=3))
def test_mutated_models_that_validate_run_or_give_project_errors(fmt, profile, kernels, muts):
    raw = model_bytes(fmt)
    for m in muts:
        raw = apply(raw, m, len(raw))
    path = _DIR / "validate.gguf"
    path.write_bytes(raw)
    try:
        findings = validate_file(path)
    except ModelError:
        findings = None
    assume(findings is not None and not any(f.severity == ERROR for f in findings))
    out = run_file(raw, fmt, profile, kernels)
    assert out.get("ok") is True or out.get("code"), out
