"""bitnet_ref: a readable reference implementation of BitNet b1.58 inference."""

__version__ = "0.1.0"
