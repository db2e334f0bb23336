"""The AArch64 NEON kernels (native/bk_neon.c) against the portable ones, on any Linux machine with a cross
toolchain: tests/native/neon_check.c and the kernel sources (build_kernels.SOURCES) cross-compiled for AArch64,
-static so that qemu-user needs no sysroot, and run under qemu. The driver runs every public function with
the "portable" and the "neon" variant on the same inputs and exits non-zero on any difference.

Runs: an armv8.2-a+dotprod build on a CPU with dotprod (the SDOT row dot), a plain armv8-a build on the same
CPU (SDOT reached through the run-time HWCAP check) and on a Cortex-A53 (no dotprod: the SMLAL fallback).

Needs (Debian/Ubuntu): apt-get install -y gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
(qemu-user-static also works). Without them the tests skip, naming the missing program and its package.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "native"
DRIVER = ROOT / "tests" / "native" / "neon_check.c"
CC = "aarch64-linux-gnu-gcc"
QEMUS = ("qemu-aarch64", "qemu-aarch64-static")
# as native/build_kernels.py builds the extension (no FMA contraction: the float lane order is the contract)
CFLAGS = ["-O2", "-std=c11", "-fno-fast-math", "-ffp-contract=off", "-fno-strict-aliasing", "-Wall", "-Werror"]
BUILDS = {"dotprod": "armv8.2-a+dotprod", "armv8": "armv8-a"}


def kernel_sources() -> list[Path]:
    """build_kernels.SOURCES, read without importing it (that needs cffi)."""
    tree = ast.parse((NATIVE / "build_kernels.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SOURCES" for t in node.targets):
            return [NATIVE / name for name in ast.literal_eval(node.value)]
    raise AssertionError("native/build_kernels.py defines no SOURCES")


def missing_tool() -> str | None:
    """Why the cross check cannot run here (the program and the apt package that provides it), or None."""
    if shutil.which(CC) is None:
        return f"{CC} not found (apt package gcc-aarch64-linux-gnu)"
    libc = subprocess.run([CC, "-print-file-name=libc.a"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libc):  # gcc echoes the bare name when it has no such file
        return "libc.a for aarch64-linux-gnu not found (apt package libc6-dev-arm64-cross)"
    if qemu() is None:
        return "qemu-aarch64 not found (apt package qemu-user, or qemu-user-static for qemu-aarch64-static)"
    return None


def qemu() -> str | None:
    return next((p for p in map(shutil.which, QEMUS) if p), None)


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    why = missing_tool()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("neon")
    exes = {}
    for name, march in BUILDS.items():
        exe = out / f"neon_check_{name}"
        cmd = [CC, *CFLAGS, f"-march={march}", "-static", f"-I{NATIVE}", str(DRIVER),
               *map(str, kernel_sources()), "-o", str(exe), "-lpthread", "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
        exes[name] = exe
    return exes


@pytest.mark.parametrize(("build", "cpu", "dotprod"), [
    ("dotprod", "max", 1),
    ("armv8", "max", 1),
    ("armv8", "cortex-a53", 0),
])
def test_neon_matches_portable(builds, build, cpu, dotprod):
    cmd = [qemu(), "-cpu", cpu, str(builds[build]), "--expect-dotprod", str(dotprod), "--rounds", "100"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "bk_isa() = neon" in r.stdout and " 0 mismatches" in r.stdout, r.stdout


def test_skip_reason_names_program_and_package(monkeypatch):
    """Where the toolchain is absent the reason says what to install."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert missing_tool() == f"{CC} not found (apt package gcc-aarch64-linux-gnu)"
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name == CC else None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "libc.a\n", ""))
    assert "libc6-dev-arm64-cross" in missing_tool()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "/x/libc.a\n", ""))
    assert missing_tool().startswith("qemu-aarch64 not found (apt package qemu-user")


def test_extension_isa_names():
    """The built extension: on AArch64 "neon" is the default; elsewhere it is refused and changes nothing."""
    from bitnet_ref import kernels

    if not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.unavailable_reason()}")
    before = kernels.active()
    try:
        if os.uname().machine in ("aarch64", "arm64"):
            assert kernels.set_isa("auto") and kernels.active() == "neon"
        else:
            assert not kernels.set_isa("neon") and kernels.active() == before
    finally:
        kernels.set_isa(before)
