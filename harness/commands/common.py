"""Arguments and loading shared by the commands that run the Python engine."""

from __future__ import annotations

import sys

PROFILES = ("exact", "llama-cpp", "bitnet-cpp")
# the reference each weight format is made for, and so the profile that computes as that reference does
PROFILE_FOR_FORMAT = {"i2_s": ("bitnet-cpp", "bitnet.cpp"), "tl1": ("bitnet-cpp", "bitnet.cpp"),
                      "tl2": ("bitnet-cpp", "bitnet.cpp"), "tq1_0": ("llama-cpp", "mainline llama.cpp"),
                      "tq2_0": ("llama-cpp", "mainline llama.cpp")}


def add_model_args(p) -> None:
    p.add_argument("--model", default=None, help="the .gguf file (default: $BITNET_GGUF)")
    p.add_argument("--profile", default=None,
                   help="numerics profile (default: the profile of the reference the file is made for: I2_S, TL1, "
                        "TL2 -> bitnet-cpp; TQ1_0, TQ2_0 -> llama-cpp; other formats -> exact)")


def default_profile(path) -> tuple[str, str]:
    """(profile, why) for a model file whose user named no profile."""
    from harness.cases import describe_model

    _, fmt = describe_model(path)
    if fmt in PROFILE_FOR_FORMAT:
        profile, reference = PROFILE_FOR_FORMAT[fmt]
        return profile, f"the file's projections are {fmt.upper()}, a {reference} format"
    return "exact", f"the file's projections are {(fmt or 'unknown').upper()}: the mathematical definition"


def load_engine(args):
    """The Python engine on the chosen model, or None after printing why it cannot load. Without --profile,
    the profile is the file's reference's, and the choice is said on stderr."""
    from bitnet_ref.errors import ModelError
    from bitnet_ref.hub import default_model
    from harness.engines.base import EngineError
    from harness.engines.python_engine import PythonEngine

    try:
        path = default_model(args.model)
        if args.profile is None:
            args.profile, why = default_profile(path)
            print(f"{args.command}: profile {args.profile} ({why}; --profile to choose)", file=sys.stderr)
        return PythonEngine(path, args.profile)
    except (ModelError, EngineError) as e:
        print(f"{args.command}: {e}", file=sys.stderr)
        return None
