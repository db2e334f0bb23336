"""Weight formats, one module each, and the registry by name and by ggml type id.

Names are what users type (`--format tq2_0`); type ids are what GGUF files store. I2_S has two
flavours under one type id: `i2_s` (x86, 128-value blocks, the default) and `i2_s_arm`.
"""

from __future__ import annotations

import os

from ..errors import FormatError
from .base import Ternary, WeightFormat, absmean_quantize
from .floats import BF16, F16, F32
from .i2s import I2S_ARM, I2S_X86
from .iq2s import IQ2_S
from .tl1 import TL1Format
from .tl2 import TL2Format
from .tq import TQ1_0, TQ2_0

TL1 = TL1Format()
TL2 = TL2Format()

FORMATS: dict[str, WeightFormat] = {
    f.name: f for f in (F32, F16, BF16, TQ1_0, TQ2_0, I2S_X86, I2S_ARM, TL1, TL2, IQ2_S)
}
# the format a type id means when nothing else is known (I2_S: the x86 flavour)
BY_TYPE_ID: dict[int, WeightFormat] = {
    f.type_id: f for f in (F32, F16, BF16, TQ1_0, TQ2_0, I2S_X86, TL1, TL2, IQ2_S)
}
I2S_FLAVOURS = {"x86": I2S_X86, "arm": I2S_ARM}


def get_format(key: str | int) -> WeightFormat:
    if isinstance(key, int):
        if key in BY_TYPE_ID:
            return BY_TYPE_ID[key]
        raise FormatError(f"ggml type id {key} is not a weight format this tool reads "
                          f"(known: {sorted(BY_TYPE_ID)})")
    name = key.lower()
    if name in FORMATS:
        return FORMATS[name]
    raise FormatError(f"unknown weight format {key!r}; known: {', '.join(FORMATS)}")


I2S_FLAVOUR_KEY = "bitnet_crossval.i2_s.block"


def i2s_flavour(block_key: int | None = None) -> WeightFormat:
    """The I2_S flavour to read a file with: the file's own block-size key (written by our synth), else
    BITNET_I2S_FLAVOUR (x86 or arm), else x86. The bytes cannot tell (validation warns)."""
    if block_key is not None:
        for fmt in I2S_FLAVOURS.values():
            if fmt.block == block_key:
                return fmt
        raise FormatError(f"{I2S_FLAVOUR_KEY} = {block_key}: I2_S blocks are 128 (x86) or 64 (arm) values")
    name = os.environ.get("BITNET_I2S_FLAVOUR", "x86").lower()
    if name not in I2S_FLAVOURS:
        raise FormatError(f"BITNET_I2S_FLAVOUR={name!r}: use x86 or arm")
    return I2S_FLAVOURS[name]


def format_for(gf, tensor) -> WeightFormat:
    """The format that decodes `tensor` of the open GGUF file `gf`."""
    if tensor.type_id == I2S_X86.type_id:
        return i2s_flavour(gf.get(I2S_FLAVOUR_KEY))
    return get_format(tensor.type_id)


__all__ = [
    "BY_TYPE_ID",
    "FORMATS",
    "I2S_FLAVOURS",
    "FormatError",
    "Ternary",
    "WeightFormat",
    "absmean_quantize",
    "format_for",
    "get_format",
    "i2s_flavour",
]
