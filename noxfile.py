"""nox sessions. `nox -s tests` runs the test suite; `nox -s crossval` is the main job."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

# llama-cpp-python compiles llama.cpp on install (minutes on 2 cores; pip caches the wheel afterwards)
BUILD_ENV = {"CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}


def _install(session: nox.Session, extras: str = "test") -> None:
    session.install("-e", f".[{extras}]", env=BUILD_ENV)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (unit tests, and the references that are present). Extra args go to pytest."""
    _install(session)
    session.run("pytest", "-q", *session.posargs)


@nox.session
def fuzz(session: nox.Session) -> None:
    """The malformed-file property tests with many more examples than the default run."""
    _install(session)
    session.run("pytest", "-q", "tests/test_fuzz_gguf.py", *session.posargs, env={"BITNET_FUZZ_EXAMPLES": "3000"})


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (measured, never asserted): the engine against llama.cpp on the same files (tokens/s and
    their ratio), then the model layer on the full-size 2b-4t file (written once; open + validate)."""
    _install(session)
    session.run("python", "-m", "benchmarks.bench_engine", *session.posargs)
    session.run("python", "-m", "benchmarks.bench_gguf")


@nox.session
def crossval(session: nox.Session) -> None:
    """Main job. Until the cross-validation suites land (issue #5) this synthesizes the default tiny
    models in every format, validates each, and checks that mainline llama.cpp loads the ones it can run."""
    _install(session)
    session.run("python", "-m", "harness.preview_crossval", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
