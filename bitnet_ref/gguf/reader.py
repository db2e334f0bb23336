"""Read a GGUF file (versions 2 and 3, little-endian), memory-mapped.

The header (metadata and tensor directory) is parsed eagerly; tensor data is never read: each tensor
is a zero-copy view into the mapping. Anything that keeps the header from being parsed raises
ModelError with a finding code; everything that can be judged after parsing (alignment, overlaps,
sizes, metadata consistency) is left to `validate.py`, so that a damaged file can still be described.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from ..errors import model_error
from .types import tensor_nbytes, type_name

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Limits that keep a corrupt count from turning into a huge allocation. Real files stay far below:
# the Llama 3 vocabulary has 128256 tokens and about 280k merges.
MAX_STRING_BYTES = 1 << 24
MAX_ARRAY_LEN = 1 << 26
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_DIMS = 4

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES = {vt: np.dtype(fmt) for vt, fmt in _SCALAR_FORMATS.items()}


@dataclass
class MetaValue:
    value: object  # str, int, float, bool, list (strings) or np.ndarray (numeric arrays)
    vtype: GGUFValueType
    offset: int  # where the key/value pair starts in the file
    item_type: GGUFValueType | None = None  # for arrays


@dataclass
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    type_id: int
    offset: int  # relative to the start of the data section
    info_offset: int  # where this entry of the tensor directory starts in the file
    data_start: int  # absolute file offset of the data

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order: (..., rows, K)."""
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n

    @property
    def type_name(self) -> str:
        return type_name(self.type_id)

    @property
    def nbytes(self) -> int | None:
        """Bytes the data takes by the type's size rule; None for an unknown type or bad shape."""
        return tensor_nbytes(self.type_id, self.ne)


class _Cursor:
    """Bounds-checked little-endian reads from the mapped header."""

    def __init__(self, buf, path: str):
        self.buf = buf
        self.pos = 0
        self.path = path
        self.section = "header"

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise model_error(
                f"truncated-{self.section}",
                f"the file ends inside the {self.section} while reading {what}: needs {n} bytes at "
                f"offset {self.pos}, the file has {len(self.buf)} bytes",
                "the file is incomplete or damaged: download or write it again",
                path=self.path,
                offset=self.pos,
            )

    def scalar(self, vtype: GGUFValueType, what: str):
        fmt = _SCALAR_FORMATS[vtype]
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str) -> str:
        start = self.pos
        n = self.u64(f"the length of {what}")
        if n > MAX_STRING_BYTES:
            raise model_error(
                "bad-string-length",
                f"{what} claims a length of {n} bytes (limit {MAX_STRING_BYTES})",
                "the length field is corrupt: the file is damaged",
                path=self.path,
                offset=start,
            )
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise model_error(
                "bad-string-encoding",
                f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})",
                "GGUF strings must be UTF-8: the file is damaged or was written by a faulty tool",
                path=self.path,
                offset=start,
            ) from None

    def value_type(self, what: str, key: str) -> GGUFValueType:
        at = self.pos
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise model_error(
                "unknown-value-type",
                f"metadata value type {raw} is not a GGUF type (0..12)",
                "the metadata is corrupt: the file is damaged",
                path=self.path,
                offset=at,
                key=key,
            ) from None

    def value(self, vtype: GGUFValueType, key: str):
        if vtype == GGUFValueType.STRING:
            return self.string(f"the value of {key!r}"), None
        if vtype == GGUFValueType.FLOAT32:
            # the shortest decimal that is this float32 (1e-05, not 9.999999747378752e-06)
            return float(str(np.float32(self.scalar(vtype, f"the value of {key!r}")))), None
        if vtype != GGUFValueType.ARRAY:
            return self.scalar(vtype, f"the value of {key!r}"), None
        item = self.value_type(f"the item type of {key!r}", key)
        at = self.pos
        n = self.u64(f"the length of {key!r}")
        if n > MAX_ARRAY_LEN:
            raise model_error(
                "bad-array-length",
                f"array {key!r} claims {n} items (limit {MAX_ARRAY_LEN})",
                "the length field is corrupt: the file is damaged",
                path=self.path,
                offset=at,
                key=key,
            )
        if item == GGUFValueType.STRING:
            return [self.string(f"item {i} of {key!r}") for i in range(n)], item
        if item == GGUFValueType.ARRAY:
            return [self.value(self.value_type(f"item {i} of {key!r}", key), key)[0] for i in range(n)], item
        dtype = _NUMPY_DTYPES[item]
        self.need(n * dtype.itemsize, f"the items of {key!r}")
        arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
        self.pos += n * dtype.itemsize
        return arr, item


class GGUFFile:
    """A parsed GGUF file. Use as a context manager, or call close()."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._file = open(self.path, "rb")
        try:
            self.file_size = os.fstat(self._file.fileno()).st_size
            if self.file_size == 0:
                raise model_error(
                    "truncated-header", "the file is empty", "write or download the file again", path=self.path
                )
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self.data = np.frombuffer(self._mm, dtype=np.uint8)
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- parsing ---------------------------------------------------------------------------------
    def _parse(self) -> None:
        cur = _Cursor(self._mm, self.path)
        cur.need(4, "the magic")
        magic = bytes(self._mm[0:4])
        if magic != GGUF_MAGIC:
            raise model_error(
                "bad-magic",
                f"the file starts with {magic!r}, not {GGUF_MAGIC!r}",
                "this is not a GGUF file (a safetensors or .bin checkpoint must be converted first)",
                path=self.path,
                offset=0,
            )
        cur.pos = 4
        self.version = cur.u32("the version")
        if self.version not in SUPPORTED_VERSIONS:
            swapped = struct.unpack("<I", struct.pack(">I", self.version))[0]
            hint = (
                "this looks like a big-endian GGUF: convert it to little-endian"
                if swapped in SUPPORTED_VERSIONS
                else "GGUF version 1 files must be converted with a current llama.cpp"
                if self.version == 1
                else "the file is damaged or from an unknown tool"
            )
            raise model_error(
                "unsupported-version",
                f"GGUF version {self.version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})",
                hint,
                path=self.path,
                offset=4,
            )
        n_tensors = cur.u64("the tensor count")
        n_kv = cur.u64("the metadata count")
        for count, limit, what in ((n_tensors, MAX_TENSORS, "tensor"), (n_kv, MAX_KV, "metadata")):
            if count > limit:
                raise model_error(
                    "bad-count",
                    f"the header claims {count} {what} entries (limit {limit})",
                    "the count is corrupt: the file is damaged",
                    path=self.path,
                    offset=8 if what == "tensor" else 16,
                )

        cur.section = "metadata"
        self.metadata: dict[str, MetaValue] = {}
        self.duplicate_keys: list[tuple[str, int]] = []
        for i in range(n_kv):
            at = cur.pos
            key = cur.string(f"metadata key {i}")
            vtype = cur.value_type(f"the type of {key!r}", key)
            value, item = cur.value(vtype, key)
            if key in self.metadata:
                self.duplicate_keys.append((key, at))
            self.metadata[key] = MetaValue(value, vtype, at, item)

        cur.section = "tensor-directory"
        self.tensors: list[TensorInfo] = []
        raw = []
        for i in range(n_tensors):
            at = cur.pos
            name = cur.string(f"tensor name {i}")
            n_dims = cur.u32(f"the dimension count of {name!r}")
            if n_dims == 0 or n_dims > MAX_DIMS:
                raise model_error(
                    "bad-dimensions",
                    f"tensor {name!r} claims {n_dims} dimensions (1..{MAX_DIMS})",
                    "the tensor directory is corrupt: the file is damaged",
                    path=self.path,
                    offset=at,
                    tensor=name,
                )
            ne = tuple(cur.u64(f"dimension {d} of {name!r}") for d in range(n_dims))
            type_id = cur.u32(f"the type of {name!r}")
            offset = cur.u64(f"the data offset of {name!r}")
            raw.append((name, ne, type_id, offset, at))

        align = self.metadata.get("general.alignment")
        self.alignment = DEFAULT_ALIGNMENT
        if align is not None and isinstance(align.value, int) and not isinstance(align.value, bool):
            self.alignment = int(align.value)
        self.header_end = cur.pos
        a = self.alignment if self.alignment > 0 else DEFAULT_ALIGNMENT
        self.data_offset = (cur.pos + a - 1) // a * a
        for name, ne, type_id, offset, at in raw:
            self.tensors.append(TensorInfo(name, ne, type_id, offset, at, self.data_offset + offset))
        self._by_name = {}
        for t in self.tensors:
            self._by_name.setdefault(t.name, t)

    # -- access ----------------------------------------------------------------------------------
    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.data = None
        mm = getattr(self, "_mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # numpy views still alive; the mapping closes when they go
            self._mm = None
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None

    def get(self, key: str, default=None):
        mv = self.metadata.get(key)
        return default if mv is None else mv.value

    @property
    def architecture(self) -> str | None:
        arch = self.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise model_error(
                "missing-tensor",
                f"no tensor named {name!r} ({len(self.tensors)} tensors in the file)",
                "the model lacks a tensor its architecture needs: check the converter",
                path=self.path,
                tensor=name,
            ) from None

    def has_tensor(self, name: str) -> bool:
        return name in self._by_name

    def tensor_bytes(self, name_or_info: str | TensorInfo) -> np.ndarray:
        """The tensor's stored bytes as a zero-copy uint8 view of the mapping."""
        t = self.tensor(name_or_info) if isinstance(name_or_info, str) else name_or_info
        n = t.nbytes
        if n is None:
            raise model_error(
                "unknown-type",
                f"tensor {t.name!r} has type id {t.type_id}, whose size rule is unknown",
                "this tool does not know the type; check that the file was made for BitNet or llama.cpp",
                path=self.path,
                offset=t.info_offset,
                tensor=t.name,
            )
        if t.data_start + n > self.file_size:
            raise model_error(
                "tensor-out-of-bounds",
                f"tensor {t.name!r} needs bytes {t.data_start}..{t.data_start + n} but the file has "
                f"{self.file_size}",
                "the file is truncated: download or write it again",
                path=self.path,
                offset=t.data_start,
                tensor=t.name,
            )
        return self.data[t.data_start : t.data_start + n]

    def resident_copy(self, name_or_info: str | TensorInfo, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor's bytes copied into process memory (`out`, uint8 of the tensor's size, or a new array;
        large arrays get transparent huge pages from numpy, which stream faster than 4 KiB page-cache pages),
        then the pages of the mapping they came from dropped from this process (MADV_DONTNEED; the page cache
        keeps them): the process holds one copy."""
        view = self.tensor_bytes(name_or_info)
        t = self.tensor(name_or_info) if isinstance(name_or_info, str) else name_or_info
        out = np.empty(view.size, np.uint8) if out is None else out
        page, chunk = mmap.PAGESIZE, 1 << 26
        for lo in range(0, view.size, chunk):  # chunk by chunk, so the process never holds both whole copies
            hi = min(lo + chunk, view.size)
            out[lo:hi] = view[lo:hi]
            start = -(-(t.data_start + lo) // page) * page
            stop = (t.data_start + hi) // page * page
            if self._mm is not None and stop > start and hasattr(self._mm, "madvise"):
                self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
        return out


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    p = Path(path)
    if not p.exists():
        raise model_error(
            "file-not-found", f"no file at {p}", "check the path (or set BITNET_GGUF)", path=str(p)
        )
    if p.is_dir():
        raise model_error("not-a-file", f"{p} is a directory", "name the .gguf file itself", path=str(p))
    return GGUFFile(p)
