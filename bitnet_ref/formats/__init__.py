"""Weight formats, one module each, and the registry by name and by ggml type id.

Names are what users type (`--format tq2_0`); type ids are what GGUF files store. I2_S has two
flavours under one type id: `i2_s` (x86, 128-value blocks, the default) and `i2_s_arm`.
"""

from __future__ import annotations

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


__all__ = ["FORMATS", "BY_TYPE_ID", "I2S_FLAVOURS", "get_format", "Ternary", "WeightFormat",
           "absmean_quantize", "FormatError"]
