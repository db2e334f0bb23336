"""Finding the reference builds on this machine, from configuration only (never built here).

bitnet.cpp: BITNET_CPP_DIR names its cmake build directory (a build with TL2 kernels, which run only
for the shapes they were generated for, may be named separately by BITNET_CPP_TL2_DIR).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = ("llama-cli", "llama-perplexity", "llama-bench", "llama-eval-callback", "llama-quantize")
# where a cmake build of bitnet.cpp (or of llama.cpp) puts its shared libraries
LIB_DIRS = ("3rdparty/llama.cpp/src", "3rdparty/llama.cpp/ggml/src", "src", "ggml/src", "bin", "lib", ".")


class ReferenceMissing(Exception):
    """A reference is not configured or not usable here; the message says what to set or build."""


@dataclass
class NativeBuild:
    root: Path
    variable: str
    libllama: Path | None = None
    libggml: Path | None = None
    tools: dict[str, Path] = field(default_factory=dict)

    def tool(self, name: str) -> Path:
        if name not in self.tools:
            raise ReferenceMissing(f"{name} is not in {self.root}/bin (named by {self.variable}): build that target")
        return self.tools[name]

    def library(self, name: str) -> Path:
        path = {"llama": self.libllama, "ggml": self.libggml}[name]
        if path is None:
            raise ReferenceMissing(f"lib{name}.so is not under {self.root} (named by {self.variable}); looked in "
                                   f"{', '.join(LIB_DIRS)}")
        return path


def _find(root: Path, filename: str) -> Path | None:
    for d in LIB_DIRS:
        p = root / d / filename
        if p.is_file():
            return p
    return None


def find_build(variable: str = "BITNET_CPP_DIR") -> NativeBuild:
    value = os.environ.get(variable)
    if not value:
        raise ReferenceMissing(f"bitnet.cpp is not configured: set {variable} to its cmake build directory")
    root = Path(value).expanduser()
    if not root.is_dir():
        raise ReferenceMissing(f"{variable}={value} is not a directory")
    build = NativeBuild(root=root, variable=variable, libllama=_find(root, "libllama.so"),
                        libggml=_find(root, "libggml.so"))
    for tool in TOOLS:
        p = root / "bin" / tool
        if p.is_file() and os.access(p, os.X_OK):
            build.tools[tool] = p
    if build.libllama is None and not build.tools:
        raise ReferenceMissing(f"{variable}={value} holds neither libllama.so nor bin/llama-cli: is it a build dir?")
    return build
