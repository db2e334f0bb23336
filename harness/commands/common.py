"""Arguments and loading shared by the commands that run the Python engine."""

from __future__ import annotations

import sys


def add_model_args(p) -> None:
    p.add_argument("--model", default=None, help="the .gguf file (default: $BITNET_GGUF)")
    p.add_argument("--profile", default="exact", help="numerics profile: exact, llama-cpp, bitnet-cpp")


def load_engine(args):
    """The Python engine on the chosen model, or None after printing why it cannot load."""
    from bitnet_ref.errors import ModelError
    from bitnet_ref.hub import default_model
    from harness.engines.base import EngineError
    from harness.engines.python_engine import PythonEngine

    try:
        return PythonEngine(default_model(args.model), args.profile)
    except (ModelError, EngineError) as e:
        print(f"{args.command}: {e}", file=sys.stderr)
        return None
