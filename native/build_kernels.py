"""cffi (API mode) build of the native kernels: `bitnet_ref._bitnet_kernels`.

Used by setup.py (`cffi_modules`), so `pip install` of the project builds it; by hand,
`python native/build_kernels.py` builds it in place into bitnet_ref/. Environment:
  BITNET_KERNELS_CFLAGS   extra compiler flags (e.g. "-fsanitize=address,undefined -O1 -g")
  BITNET_KERNELS_LDFLAGS  extra linker flags
  BITNET_KERNELS_OUTDIR   where the by-hand build puts the module (default: bitnet_ref/)
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = HERE / "bitnet_kernels.h"
MODULE = "bitnet_ref._bitnet_kernels"
SOURCES = ("bitnet_kernels.c", "bk_pool.c", "bk_neon.c", "bk_layer.c", "bk_i2s_gemm.c", "bk_attention.c",
           "bk_exact.c", "bk_ggml_layer.c", "bk_attention_f32.c")


def _cdef() -> str:
    """The header's declarations without preprocessor lines (cffi's cdef takes plain C)."""
    text = HEADER.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    keep = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    defines = "\n".join(f"#define {name} ..." for name in ("BK_EBADK", "BK_EBADARG", "BK_ENOMEM", "BK_TQ1_0",
                                                                 "BK_TQ2_0", "BK_F16_VEC_DOT", "BK_F16_GEMM",
                                                                 "BK_F32", "BK_F16", "BK_EXACT_MANY"))
    return defines + "\n" + "\n".join(keep)


def make_ffibuilder(module: str = MODULE, absolute: bool = False) -> FFI:
    ffibuilder = FFI()
    ffibuilder.cdef(_cdef())
    cflags = ["-O3", "-std=c11", "-fno-fast-math", "-ffp-contract=off", "-fno-strict-aliasing"]
    cflags += shlex.split(os.environ.get("BITNET_KERNELS_CFLAGS", ""))
    ldflags = shlex.split(os.environ.get("BITNET_KERNELS_LDFLAGS", ""))
    # setuptools builds from the project root and wants relative sources; cffi's compile() changes directory
    def path(p: Path) -> str:
        return str(p) if absolute else os.path.relpath(p, Path.cwd())

    ffibuilder.set_source(
        module,
        '#include "bitnet_kernels.h"',
        sources=[path(HERE / name) for name in SOURCES],
        depends=[path(HEADER), path(HERE / "bk_internal.h")],
        include_dirs=[str(HERE)],
        libraries=["m", "pthread"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    return ffibuilder


ffibuilder = make_ffibuilder()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    outdir = Path(argv[0] if argv else os.environ.get("BITNET_KERNELS_OUTDIR", HERE.parent / "bitnet_ref"))
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        verbose = bool(os.environ.get("BITNET_KERNELS_VERBOSE"))
        built = Path(make_ffibuilder(absolute=True).compile(tmpdir=tmp, verbose=verbose))
        dest = outdir / built.name
        shutil.copy2(built, dest)
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
