"""Validation modes: how a system under test is judged against a reference.

- ``bit-exact``: the system under test claims to reproduce the reference's arithmetic (bitnet_ref's
  emulation profiles `llama-cpp` and `bitnet-cpp`). Limits are the per-profile defaults of
  harness/tolerances.py (max |Δ| <= 1e-4, top-1 agreement 1.0, ...); for bitnet_ref's `exact` profile,
  that profile's measured defaults.
- ``independent``: the system under test computes the same model with its own, legitimately different
  numerics (float activations, other summation orders, fused kernels). Limits are a stated multiple of a
  noise floor the harness measures itself: how far the reference is from the mathematical definition
  (bitnet_ref's `exact` profile) on the same model and prompts (harness/noise_floor.py).

Selection, highest first: the `--validation` pytest option, the case field `validation`, then the
default: bit-exact for bitnet_ref (the harness's own engine, whose per-profile limits were each measured
against the references: its emulation profiles, and its `exact` profile with that profile's defaults),
independent for every other engine.
"""

from __future__ import annotations

MODES = ("bit-exact", "independent")
EMULATION_PROFILES = ("llama-cpp", "bitnet-cpp")


class ValidationError(ValueError):
    """An unknown validation mode; says where it came from."""


def default_mode(sut: str, profile: str | None) -> str:
    return "bit-exact" if sut == "bitnet_ref" or sut.startswith("bitnet_ref:") else "independent"


def resolve_mode(sut: str, profile: str | None, case_mode: str | None = None, cli_mode: str | None = None,
                 case_file: str = "<case>") -> tuple[str, str]:
    """(mode, where it came from: "cli:--validation" | "case:FILE" | "default")."""
    for value, source in ((cli_mode, "cli:--validation"), (case_mode, f"case:{case_file}")):
        if value is not None:
            if value not in MODES:
                raise ValidationError(f"{source}: unknown validation mode {value!r}; modes: {', '.join(MODES)}")
            return value, source
    return default_mode(sut, profile), "default"


__all__ = ["EMULATION_PROFILES", "MODES", "ValidationError", "default_mode", "resolve_mode"]
