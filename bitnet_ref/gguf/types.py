"""ggml tensor types: names, block sizes and the rule that gives a tensor's byte size.

Standard types come from the `gguf` package's table. bitnet.cpp adds types the package does not know
(I2_S = 36, TL1 = 38, TL2 = 39) whose sizes follow rules of their own (bitnet.cpp's `ggml_nbytes`).
Type id 39 is MXFP4 in mainline ggml and TL2 in bitnet.cpp: this project reads it as TL2 (a BitNet
tool) and validation reports a file whose byte sizes fit MXFP4 instead.
"""

from __future__ import annotations

from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES

I2_S = 36
I8_S = 37
TL1 = 38
TL2 = 39
MXFP4 = 39  # mainline's meaning of the same id

BITNET_TYPES = {I2_S: "I2_S", I8_S: "I8_S", TL1: "TL1", TL2: "TL2"}

# llama file types (general.file_type) of the BitNet formats
FILE_TYPES = {0: "ALL_F32", 1: "MOSTLY_F16", 32: "MOSTLY_BF16", 36: "MOSTLY_TQ1_0", 37: "MOSTLY_TQ2_0",
              38: "MOSTLY_TL1", 39: "MOSTLY_TL2", 40: "MOSTLY_I2_S"}


def type_name(type_id: int) -> str:
    if type_id in BITNET_TYPES:
        return BITNET_TYPES[type_id]
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"unknown({type_id})"


def is_known(type_id: int) -> bool:
    if type_id in (I2_S, TL1, TL2):
        return True
    try:
        GGMLQuantizationType(type_id)
    except ValueError:
        return False
    return type_id != I8_S


def block_size(type_id: int) -> tuple[int, int] | None:
    """(values per block, bytes per block) for the standard block types; None otherwise."""
    if type_id in BITNET_TYPES:
        return None
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        return None


def i2s_nbytes(n_elements: int) -> int:
    """I2_S (and TL1): 2 bits a value plus a 32-byte tail whose first 4 bytes hold the float scale."""
    return n_elements // 4 + 32


def tl2_nbytes(k: int, rows: int) -> int:
    """TL2 size rule of bitnet.cpp's ggml_nbytes (C integer arithmetic, left to right): the
    three-weight part at 5 bits per 3 weights, a 256-column two-weight part at 4 bits per 2 weights,
    rounded up to 32, plus a 32-byte tail holding the float scale."""
    n = (k - 256) * rows // 3 * 5 // 8 + 256 * rows // 2 * 4 // 8
    if n % 32:
        n += 32 - n % 32
    return n + 32


def tensor_nbytes(type_id: int, ne: tuple[int, ...]) -> int | None:
    """Bytes a tensor of ggml shape `ne` takes; None when the type is unknown or the shape cannot
    be stored in it (row length not a multiple of the block)."""
    if any(d <= 0 for d in ne):
        return 0
    n = 1
    for d in ne:
        n *= d
    if type_id in (I2_S, TL1):
        return i2s_nbytes(n)
    if type_id == TL2:
        if len(ne) != 2 or ne[0] < 256:
            return None
        return tl2_nbytes(ne[0], ne[1])
    bs = block_size(type_id)
    if bs is None:
        return None
    per_block, nbytes = bs
    if ne[0] % per_block:
        return None
    return n // per_block * nbytes
