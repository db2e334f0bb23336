"""Finding the reference builds on this machine, from configuration.

bitnet.cpp: BITNET_CPP_DIR names its cmake build directory (a build with TL2 kernels, which run only
for the shapes they were generated for, may be named separately by BITNET_CPP_TL2_DIR). Mainline
llama.cpp's command-line tools: LLAMA_CPP_DIR. `bitnet-xval reference` (harness/references.py) builds
them and prints these variables; a build it made carries a manifest (source, commit, flags, fixes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .base import ReferenceUnavailable

TOOLS = ("llama-cli", "llama-completion", "llama-perplexity", "llama-bench", "llama-tokenize", "llama-eval-callback",
         "llama-quantize")
WHAT = {"BITNET_CPP_DIR": "bitnet.cpp", "BITNET_CPP_TL2_DIR": "bitnet.cpp (TL2 build)",
        "LLAMA_CPP_DIR": "mainline llama.cpp's tools"}
HOW = {"BITNET_CPP_DIR": "bitnet-xval reference bitnet.cpp --src DIR_OR_TARBALL",
       "BITNET_CPP_TL2_DIR": "bitnet-xval reference bitnet.cpp --variant tl2 --src DIR_OR_TARBALL",
       "LLAMA_CPP_DIR": "bitnet-xval reference llama.cpp"}
# where a cmake build of bitnet.cpp (or of llama.cpp) puts its shared libraries
LIB_DIRS = ("3rdparty/llama.cpp/src", "3rdparty/llama.cpp/ggml/src", "src", "ggml/src", "bin", "lib", ".")


@dataclass
class NativeBuild:
    root: Path
    variable: str
    libllama: Path | None = None
    libggml: Path | None = None
    tools: dict[str, Path] = field(default_factory=dict)
    manifest: dict | None = None  # written by `bitnet-xval reference`; None for a build made another way

    @property
    def source_commit(self) -> str | None:
        """The upstream commit the build was made from: its manifest's, else the git checkout above it."""
        if self.manifest:
            return (self.manifest.get("source") or {}).get("commit")
        import subprocess

        for d in (self.root, self.root.parent):
            if (d / ".git").exists():
                r = subprocess.run(["git", "-C", str(d), "rev-parse", "HEAD"], capture_output=True, text=True)
                if r.returncode == 0:
                    return r.stdout.strip()
        return None

    def tool(self, name: str) -> Path:
        if name not in self.tools:
            raise ReferenceUnavailable(f"{name} is not in {self.root}/bin (named by {self.variable}): "
                                       "build that target")
        return self.tools[name]

    def library(self, name: str) -> Path:
        path = {"llama": self.libllama, "ggml": self.libggml}[name]
        if path is None:
            raise ReferenceUnavailable(f"lib{name}.so is not under {self.root} (named by {self.variable}); looked in "
                                   f"{', '.join(LIB_DIRS)}")
        return path


def _find(root: Path, filename: str) -> Path | None:
    for d in LIB_DIRS:
        p = root / d / filename
        if p.is_file():
            return p
    return None


def find_build(variable: str = "BITNET_CPP_DIR") -> NativeBuild:
    from harness.references import read_manifest

    value = os.environ.get(variable)
    if not value:
        what = WHAT.get(variable, "the reference")
        how = f" (`eval \"$({HOW[variable]})\"` builds it and sets it)" if variable in HOW else ""
        raise ReferenceUnavailable(f"{what} is not configured: set {variable} to its cmake build directory{how}")
    root = Path(value).expanduser()
    if not root.is_dir():
        raise ReferenceUnavailable(f"{variable}={value} is not a directory")
    build = NativeBuild(root=root, variable=variable, libllama=_find(root, "libllama.so"),
                        libggml=_find(root, "libggml.so"), manifest=read_manifest(root))
    for tool in TOOLS:
        p = root / "bin" / tool
        if p.is_file() and os.access(p, os.X_OK):
            build.tools[tool] = p
    if build.libllama is None and not build.tools:
        raise ReferenceUnavailable(f"{variable}={value} holds neither libllama.so nor bin/llama-cli: "
                                   "is it a build dir?")
    return build
