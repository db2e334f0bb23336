"""`bitnet-xval reference`: build a reference into the cache and print the variables that name it.

  bitnet-xval reference bitnet.cpp --src DIR_OR_TARBALL [--variant i2_s|tl2] [--model M ...] [--preset-shapes P|none]
  bitnet-xval reference bitnet.cpp --git URL --commit SHA [--variant ...]
  bitnet-xval reference llama.cpp [--src SDIST_OR_DIR]      (default: the pinned llama-cpp-python sdist)

Standard output holds only `export VAR=...` lines, so `eval "$(bitnet-xval reference ...)"` sets them; what
the build does goes to standard error (a progress line on a terminal). Exit 0 built or cached, 1 the build
failed, 2 bad arguments or a missing tool.
"""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("reference", help="build bitnet.cpp or llama.cpp's tools (cached) and print export lines",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("name", choices=("bitnet.cpp", "llama.cpp"), help="which reference to build")
    p.add_argument("--src", help="a source directory or tarball (llama.cpp: a llama-cpp-python sdist or a llama.cpp "
                                 "tree; default: the pinned llama-cpp-python sdist from the package index)")
    p.add_argument("--git", help="bitnet.cpp: a repository URL to clone recursively (needs --commit)")
    p.add_argument("--commit", help="the full commit sha to check out with --git")
    p.add_argument("--variant", default="i2_s", choices=("i2_s", "tl2", "tl1"),
                   help="bitnet.cpp: i2_s (default), or tl2 with kernels generated for --model's shapes (x86); "
                        "tl1 is ARM-only")
    p.add_argument("--model", action="append", default=[],
                   help="bitnet.cpp tl2: also generate kernels for this GGUF's projection shapes (repeatable; one "
                        "build holds the union of the shapes)")
    p.add_argument("--preset-shapes", default="large-shapes",
                   help="bitnet.cpp tl2: the synth preset whose shapes the build always holds (default: "
                        "large-shapes; 'none': only the --model shapes)")
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="json: the build's manifest on stdout instead of export lines")
    p.set_defaults(func=run)


def _progress_printer():
    """A one-line progress display on a terminal; nothing when stderr is not one."""
    if not sys.stderr.isatty():
        return lambda line: None

    def show(line: str) -> None:
        sys.stderr.write("\r\033[K" + line[:110])
        sys.stderr.flush()

    return show


def run(args) -> int:
    import json
    from dataclasses import asdict

    from harness import references as R

    def log(msg: str) -> None:
        print(f"reference: {msg}", file=sys.stderr, flush=True)

    progress = _progress_printer()
    try:
        if args.name == "bitnet.cpp":
            source = R.resolve_source(args.src, args.git, args.commit)
            shapes = R.tl2_shapes(args.model, args.preset_shapes) if args.variant == "tl2" else None
            build = R.build_bitnet_cpp(source, args.variant, shapes, progress=progress, log=log)
        else:
            if args.git:
                raise R.BuildError("llama.cpp builds from a source directory or tarball (--src), or by default "
                                   "from the pinned llama-cpp-python sdist")
            source = R.resolve_source(args.src or str(R.llama_cpp_sdist(log=log)))
            build = R.build_llama_cpp_tools(source, progress=progress, log=log)
    except R.BuildError as e:
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        print(f"reference: {e}", file=sys.stderr)
        failed_step = "step failed" in str(e)
        return 1 if failed_step else 2
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    how = "cached" if build.cached else f"built in {build.seconds:.0f} s"
    log(f"{build.reference} {build.variant}: {how}: {build.directory}")
    if args.format == "json":
        data = asdict(build)
        data["exports"] = build.exports()
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(build.exports()))
    return 0
