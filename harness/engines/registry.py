"""Engines by name: what `--engine` / `--reference` and `bitnet-xval engines` accept.

  bitnet_ref       the Python engine (numpy; the default system under test)
  bitnet_ref:PROFILE  the Python engine in that numerics profile whatever profile the caller asks for (e.g. as
                   a reference: `bitnet_ref:bitnet-cpp` computes bitnet.cpp's arithmetic where no build is here)
  llama_cpp        mainline llama.cpp in-process (libllama from llama-cpp-python, or LLAMA_CPP_LIB)
  bitnet_cpp       bitnet.cpp in-process (libllama of the build named by BITNET_CPP_DIR)
  bitnet_cpp_tl2   bitnet.cpp in-process, from a build with TL2 kernels (BITNET_CPP_TL2_DIR)
  bitnet_cpp_cli   bitnet.cpp's tools (llama-cli, llama-perplexity, llama-bench in BITNET_CPP_DIR/bin)
  llama_cpp_cli    mainline llama.cpp's tools (llama-completion, llama-perplexity, llama-tokenize, llama-bench in
                   LLAMA_CPP_DIR/bin; `bitnet-xval reference llama.cpp` builds them)
  jsonl:COMMAND    any engine that speaks the JSON-lines protocol (harness/engines/jsonl.py); "{model}"
                   in COMMAND is replaced by the model's path
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from .base import Engine, EngineError, ReferenceUnavailable

NAMES = ("bitnet_ref", "llama_cpp", "bitnet_cpp", "bitnet_cpp_tl2", "bitnet_cpp_cli", "llama_cpp_cli")


@dataclass
class EngineStatus:
    name: str
    available: bool
    version: str = ""
    detail: str = ""  # where it is and what it supports, or what to set when it is missing


# Engines run behind the JSON-lines protocol in a process of their own (harness/engines/serve.py): a
# second bitnet.cpp build cannot share a process with the first (both name their library libggml.so).
ISOLATED = ("bitnet_cpp_tl2",)


def open_engine(spec: str, model, profile: str = "exact", options: dict | None = None,
                isolate: bool | None = None) -> Engine:
    """An engine on `model`. `profile` applies to bitnet_ref; references compute as they do. `options`
    go to the in-process adapters (e.g. n_ubatch, n_batch, kv_type)."""
    options = options or {}
    if spec in ISOLATED if isolate is None else isolate:
        return _isolated(spec, model, profile, options)
    if spec == "bitnet_ref" or spec.startswith("bitnet_ref:"):
        from .python_engine import PythonEngine

        fixed = spec.partition(":")[2]
        return PythonEngine(model, fixed or profile, n_ubatch=options.get("n_ubatch"))
    if spec == "llama_cpp":
        from .llama_ffi import LlamaLibEngine, mainline_library

        return LlamaLibEngine(model, mainline_library(), name="llama.cpp", **options)
    if spec in ("bitnet_cpp", "bitnet_cpp_tl2"):
        from .discovery import find_build
        from .llama_ffi import LlamaLibEngine

        variable = "BITNET_CPP_TL2_DIR" if spec == "bitnet_cpp_tl2" else "BITNET_CPP_DIR"
        build = find_build(variable)
        engine = LlamaLibEngine(model, build.library("llama"), name="bitnet.cpp", variable=variable, **options)
        engine.receipt.source = build.source_commit
        return engine
    if spec in ("bitnet_cpp_cli", "llama_cpp_cli"):
        from .cli_tools import CliToolsEngine
        from .discovery import find_build

        bitnet = spec == "bitnet_cpp_cli"
        variable, name = ("BITNET_CPP_DIR", "bitnet.cpp") if bitnet else ("LLAMA_CPP_DIR", "llama.cpp")
        build = find_build(variable)
        # mainline's tools default to flash attention and an f16 KV cache; the in-process adapter and the
        # llama-cpp profile compute without flash attention over an F32 cache, so the tools are run that way
        mainline = ["-fa", "off", "-ctk", "f32", "-ctv", "f32"]
        extra = {} if spec == "bitnet_cpp_cli" else {"llama-completion": mainline, "llama-perplexity": mainline}
        engine = CliToolsEngine(model, build, name=name, extra_args=extra)
        engine.receipt.source = build.source_commit
        return engine
    if spec.startswith("jsonl:"):
        from .jsonl import JsonlEngine

        command = [a.replace("{model}", str(model)) for a in shlex.split(spec[len("jsonl:"):])]
        if not command:
            raise EngineError("jsonl: needs a command line, e.g. 'jsonl:./my-engine --threads 2'")
        return JsonlEngine(command, model)
    raise EngineError(f"unknown engine {spec!r}; known: {', '.join(NAMES)}, jsonl:COMMAND")


def _isolated(spec: str, model, profile: str, options: dict) -> Engine:
    import sys

    from .discovery import find_build
    from .jsonl import JsonlEngine

    if spec == "bitnet_cpp_tl2":
        find_build("BITNET_CPP_TL2_DIR").library("llama")  # ReferenceUnavailable before a process starts
    command = [sys.executable, "-m", "harness.engines.serve", spec, "--model", str(model), "--profile", profile]
    command += [f"--option={k}={v}" for k, v in options.items()]
    return JsonlEngine(command, model)


def _library_status(name: str, find) -> EngineStatus:
    from .llama_ffi import _Library

    try:
        path, variable = find()
        lib = _Library.get(path, variable)
    except EngineError as e:
        return EngineStatus(name, False, detail=str(e))
    return EngineStatus(name, True, f"{lib.generation} {lib.version}", f"{lib.path}")


def _mainline():
    from .llama_ffi import mainline_library

    return mainline_library(), "LLAMA_CPP_LIB"


def _fork(variable: str):
    from .discovery import find_build

    return find_build(variable).library("llama"), variable


def probe_all() -> list[EngineStatus]:
    """Every named engine: found or not, its version, and for a missing one the variable to set."""
    import bitnet_ref
    from bitnet_ref import kernels

    from .discovery import TOOLS, find_build

    why = kernels.unavailable_reason()
    kernel_set = kernels.active() + (f" ({why})" if why else "")
    try:
        from bitnet_ref.device import select_device

        device = select_device().describe()
    except ValueError as e:
        device = f"cpu ({e})"
    out = [EngineStatus("bitnet_ref", True, bitnet_ref.__version__,
                        f"kernels: {kernel_set}; device: {device}; profiles exact, llama-cpp, bitnet-cpp")]
    out.append(_library_status("llama_cpp", _mainline))
    out.append(_library_status("bitnet_cpp", lambda: _fork("BITNET_CPP_DIR")))
    out.append(_library_status("bitnet_cpp_tl2", lambda: _fork("BITNET_CPP_TL2_DIR")))
    for name, variable, completion in (("bitnet_cpp_cli", "BITNET_CPP_DIR", "llama-cli"),
                                       ("llama_cpp_cli", "LLAMA_CPP_DIR", "llama-completion")):
        try:
            build = find_build(variable)
            tools = [t for t in TOOLS if t in build.tools]
            out.append(EngineStatus(name, completion in build.tools, build.source_commit or "",
                                    f"{build.root}/bin: {', '.join(tools) or 'no tools'}"))
        except ReferenceUnavailable as e:
            out.append(EngineStatus(name, False, detail=str(e)))
    return out
