"""Build hook for the native kernels (everything else is in pyproject.toml).

`cffi_modules` compiles native/ into `bitnet_ref._bitnet_kernels` (cffi API mode) during `pip install`.
A machine without a working C compiler still installs: the build step only warns, and
bitnet_ref.kernels falls back to numpy (and says so once).
"""

from __future__ import annotations

import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext whose failures (no compiler, a compile or link error) become a warning."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - CCompilerError, CompileError, LinkError, PlatformError, OSError
            self._warn(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            self._warn(e, ext.name)

    @staticmethod
    def _warn(e: Exception, name: str = "native kernels") -> None:
        sys.stderr.write(f"WARNING: building {name} failed ({type(e).__name__}: {e}); "
                         "bitnet_ref will use its numpy kernels\n")


setup(
    cffi_modules=["native/build_kernels.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt},
)
