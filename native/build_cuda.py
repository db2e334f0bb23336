"""Build native/i2s_gemv.cu into a shared library for ctypes (bitnet_ref/device.py), at run time only.

Never run by `pip install`: bitnet_ref/device.py calls `build()` when BITNET_DEVICE asks for a GPU and a CUDA
driver with a device is present. The library is cached under BITNET_CUDA_CACHE (default
~/.cache/bitnet-crossval/), named by a hash of the source, the compiler and the flags, so it is compiled once.
By hand: `python native/build_cuda.py [CACHE_DIR]` prints the library's path. Environment:
  BITNET_NVCC              the CUDA compiler (default: nvcc on PATH)
  BITNET_CUDA_NVCCFLAGS    extra nvcc flags (e.g. "-arch=sm_90")
  BITNET_CUDA_CACHE        where the library is kept
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "i2s_gemv.cu"
BASE_FLAGS = ["-O3", "-shared", "-Xcompiler", "-fPIC", "--cudart", "shared"]
TIMEOUT_S = 300


class CudaBuildError(RuntimeError):
    """Why the CUDA library could not be built (the message names what is missing)."""


def cache_dir() -> Path:
    env = os.environ.get("BITNET_CUDA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "bitnet-crossval"


def find_nvcc() -> str:
    env = os.environ.get("BITNET_NVCC")
    nvcc = shutil.which(env) if env else shutil.which("nvcc")
    if not nvcc:
        raise CudaBuildError(f"no nvcc ({'BITNET_NVCC=' + env + ' not found' if env else 'not on PATH'})")
    return nvcc


def _flags() -> list[str]:
    return BASE_FLAGS + shlex.split(os.environ.get("BITNET_CUDA_NVCCFLAGS", ""))


def library_path(nvcc: str, directory: Path) -> Path:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(("\0".join([os.path.realpath(nvcc)] + _flags())).encode())
    return directory / f"libbitnet_i2s_cuda-{h.hexdigest()[:16]}.so"


def build(directory: str | os.PathLike | None = None, force: bool = False) -> Path:
    """The cached library's path, compiling it first when it is missing; CudaBuildError on any failure."""
    nvcc = find_nvcc()
    out_dir = Path(directory) if directory else cache_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CudaBuildError(f"cannot create the CUDA cache {out_dir}: {e}") from e
    lib = library_path(nvcc, out_dir)
    if lib.exists() and not force:
        return lib
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # not a sanitizer session's libasan
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_lib = Path(tmp) / lib.name
        try:
            r = subprocess.run([nvcc, *_flags(), "-o", str(tmp_lib), str(SOURCE)], capture_output=True,
                               text=True, env=env, timeout=TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CudaBuildError(f"nvcc could not run: {e}") from e
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise CudaBuildError(f"nvcc failed (exit {r.returncode}): {' | '.join(tail)}")
        os.replace(tmp_lib, lib)  # atomic: a concurrent build leaves one complete file
    return lib


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    dirs = [a for a in argv if a != "--force"]
    try:
        print(build(dirs[0] if dirs else None, force="--force" in argv))
    except CudaBuildError as e:
        print(f"build_cuda: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
