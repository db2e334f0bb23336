"""bitnet_ref's receipt: its artifact hash covers every file of the package and the loaded kernel library,
so any change to the engine (kernels, formats, tokenizer, numerics, not only model.py) changes receipts and
the baselines' engine summaries."""

from __future__ import annotations

import shutil
from pathlib import Path

import bitnet_ref
from bitnet_ref import kernels
from bitnet_ref.synth import SynthSpec, synthesize
from harness.engines.python_engine import PythonEngine, artifact_sha256

PACKAGE = Path(bitnet_ref.__file__).parent


def test_every_source_file_and_the_library_count(tmp_path):
    pkg = tmp_path / "bitnet_ref"
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("*.so"))
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"kernels v1")
    base = artifact_sha256(pkg, [str(lib)])
    assert base == artifact_sha256(pkg, [str(lib)])
    for rel in ("formats/tq.py", "tokenizer.py", "numerics.py", "kernels.py", "gguf/reader.py"):
        f = pkg / rel
        text = f.read_bytes()
        f.write_bytes(text + b"\n# changed\n")
        assert artifact_sha256(pkg, [str(lib)]) != base, rel
        f.write_bytes(text)
    (pkg / "formats" / "new_format.py").write_text("X = 1\n")
    assert artifact_sha256(pkg, [str(lib)]) != base
    (pkg / "formats" / "new_format.py").unlink()
    lib.write_bytes(b"kernels v2")
    assert artifact_sha256(pkg, [str(lib)]) != base
    assert artifact_sha256(pkg, [None]) != base  # numpy computes: not the same engine
    lib.write_bytes(b"kernels v1")
    (pkg / "__pycache__").mkdir(exist_ok=True)
    (pkg / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"cache")
    assert artifact_sha256(pkg, [str(lib)]) == base  # byte-code caches are not the engine


def test_the_receipt_carries_it(tmp_path):
    path = synthesize(SynthSpec(preset="tiny", arch="bitnet", format="tq2_0", layers=1), tmp_path)
    with PythonEngine(path, "exact") as e:
        assert e.receipt.artifact == str(PACKAGE)
        assert e.receipt.artifact_sha256 == artifact_sha256(PACKAGE, [kernels.library_path()])
    if kernels.available():
        assert kernels.library_path() and Path(kernels.library_path()).is_file()
