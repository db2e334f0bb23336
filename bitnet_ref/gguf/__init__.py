"""GGUF container: memory-mapped reading (v2, v3), streaming writing (v3), validation findings."""

from .reader import GGUFFile, MetaValue, TensorInfo, open_gguf
from .types import I2_S, TL1, TL2, tensor_nbytes, type_name
from .writer import TensorSpec, write_gguf

__all__ = [
           "I2_S",
           "TL1",
           "TL2",
           "GGUFFile",
           "MetaValue",
           "TensorInfo",
           "TensorSpec",
           "open_gguf",
           "tensor_nbytes",
           "type_name",
           "write_gguf",
]
