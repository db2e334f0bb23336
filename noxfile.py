"""nox sessions. `nox -s tests` runs the test suite; `nox -s crossval` is the main job."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

FUZZ_TESTS = ["tests/test_fuzz_gguf.py", "tests/test_fuzz_engine.py", "tests/test_fuzz_inputs.py",
              "tests/test_fuzz_corpus.py"]
# llama-cpp-python compiles llama.cpp on install (minutes on 2 cores; pip caches the wheel afterwards)
BUILD_ENV = {"CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}


def _install(session: nox.Session, extras: str = "test") -> None:
    session.log("installing the project and its test tools; the first time pip compiles mainline llama.cpp "
                "(llama-cpp-python) and the native kernels, about 10 minutes on 2 cores, silently; later runs "
                "reuse pip's wheel cache")
    session.install("-e", f".[{extras}]", env=BUILD_ENV)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite: unit tests and the cross-validation suites against the references present.
    Extra args go to pytest."""
    _install(session)
    session.run("pytest", "-q", "tests", *session.posargs)


@nox.session
def fuzz(session: nox.Session) -> None:
    """Every fuzz property with 1e5 examples in all (BITNET_FUZZ_TOTAL; each property's share is in
    tests/fuzz_budget.py and the README): malformed GGUF files (reader, validator, formats), mutated files that
    still validate through the engine (every profile and format, native kernels and numpy), tokenizers, the
    documents a user writes, JSON-lines engine responses, and the corpus of past crashers."""
    _install(session)
    total = os.environ.get("BITNET_FUZZ_TOTAL", "100000")
    session.run("pytest", "-q", "-p", "no:cacheprovider", *FUZZ_TESTS, *session.posargs,
                env={"BITNET_FUZZ_TOTAL": total})


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (measured, never asserted): the model layer on the full-size 2b-4t I2_S file (written once
    into .nox/bench-models; open + validate), the engine against the references in the same run (tiny and
    large-shapes TQ2_0 against llama.cpp; the 2b-4t I2_S file, pp 512 and tg 128 with 2 threads, against
    bitnet.cpp's llama-bench when BITNET_CPP_DIR is set and against llama.cpp on the TQ2_0 file of the same
    shapes; the exact profile on that TQ2_0 file, peak RSS from a fresh process), then the logits comparison at
    [512, 128256]. Extra args replace bench_engine's."""
    _install(session)
    session.run("python", "-m", "benchmarks.bench_gguf")
    i2s = os.path.join(".nox", "bench-models", "synth-2b-4t-bitnet-b1.58-i2_s-llama3-L30-s0.gguf")
    engine_args = session.posargs or ["--i2s", i2s, "--tq2", "synth", "--exact", "synth"]
    session.run("python", "-m", "benchmarks.bench_engine", *engine_args, env={"BITNET_CPU_THREADS": "2"})
    session.run("python", "-m", "benchmarks.bench_metrics")


@nox.session
def crossval(session: nox.Session) -> None:
    """Main job: the default cases (cases/*.toml) with the Python engine against every reference found;
    writes the HTML report and the JSON records. Extra args go to pytest (e.g. -k tl2 --tolerance=1e-4)."""
    _install(session)
    report = os.path.join("out", "crossval", "report.html")
    history = os.path.join("out", "history")
    session.run("pytest", "-q", "-rsx", "tests/crossval", f"--report-html={report}", f"--history={history}",
                *session.posargs)
    session.log(f"report: {os.path.abspath(report)}")


@nox.session
def train(session: nox.Session) -> None:
    """Train the shipped BitNet b1.58 model from scratch (bitnet_ref/train.py; JAX on CPU, about 20 minutes
    on 2 cores) into models/: the I2_S file, trained-<arch>-loss.png and trained-<arch>-log.json (the log
    has the wall-clock time; the file does not). Same Python, JAX and seed give the same bytes.
    Extra args go to `python -m bitnet_ref.train` (--steps, --seed, -o DIR, --formats f16,tq2_0)."""
    _install(session, "train")
    session.run("python", "-m", "bitnet_ref.train", *session.posargs)


@nox.session
def baselines(session: nox.Session) -> None:
    """Rewrite this platform's baselines (baselines/<platform-id>/) from a crossval run."""
    _install(session)
    session.run("pytest", "-q", "tests/crossval", "--update-baselines", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def neon(session: nox.Session) -> None:
    """The AArch64 NEON kernels against the portable ones on this (x86) machine: tests/test_neon.py
    cross-compiles tests/native/neon_check.c with the kernel sources and runs it under qemu-user. The
    toolchain comes from the system, not from this session:
      apt-get install -y gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
    Without it the tests skip and say which program and package are missing (-rs shows the reason)."""
    session.install("-e", ".", "pytest", "hypothesis", env=BUILD_ENV)
    session.run("pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_neon.py", *session.posargs)


@nox.session
def sanitize(session: nox.Session) -> None:
    """The native kernels built with -fsanitize=address,undefined (a separate build in a temp dir) under
    tests/test_kernels.py, tests/test_layer_kernel.py and the engine-level fuzz property
    (tests/test_fuzz_engine.py: its worker processes inherit the sanitizer environment; BITNET_FUZZ_TOTAL
    raises its example count). The build is loaded through BITNET_KERNELS_PATH (the
    test suite fails if it does not load). A Python host needs the ASan runtime first in the process:
    LD_PRELOAD=$(cc -print-file-name=libasan.so) (the compiler that built the extension);
    ASAN_OPTIONS=detect_leaks=0 because the interpreter itself leaks by design; PYTHONMALLOC=malloc so that
    Python buffers come from malloc, where ASan sees their bounds (pymalloc's arenas hide overflows). UBSan
    aborts on the first report (-fno-sanitize-recover)."""
    import subprocess
    import sysconfig

    session.install("-e", ".", "pytest", "hypothesis", env=BUILD_ENV)
    out = session.create_tmp()
    flags = "-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -O1 -g"
    session.run("python", "native/build_kernels.py", os.path.join(out, "sanitize"),
                env={"BITNET_KERNELS_CFLAGS": flags, "BITNET_KERNELS_LDFLAGS": "-fsanitize=address,undefined"})
    built = [f for f in os.listdir(os.path.join(out, "sanitize")) if f.endswith(".so")]
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    libasan = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    session.run("pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py", "tests/test_layer_kernel.py",
                "tests/test_fuzz_engine.py", *session.posargs,
                env={"BITNET_KERNELS_PATH": os.path.join(out, "sanitize", built[0]), "LD_PRELOAD": libasan,
                     "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1", "PYTHONMALLOC": "malloc",
                     "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1", "BITNET_KERNEL_EXAMPLES": "100"})
