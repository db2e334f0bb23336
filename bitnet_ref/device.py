"""Where the I2_S products run: the CPU (native kernels / numpy) or a CUDA device.

Environment:
  BITNET_DEVICE            auto (default) | cpu | gpu
  BITNET_GPU_MEMORY_LIMIT  MiB the packed I2_S weights may take on the GPU (a positive integer; unset: no limit)

cpu: the CPU, nothing is probed. auto and gpu: CUDA only when a CUDA driver is present (libcuda), it reports a
device, the packed I2_S weights fit in BITNET_GPU_MEMORY_LIMIT, and the CUDA library (native/i2s_gemv.cu,
compiled at run time by native/build_cuda.py into a cache) builds, loads and itself sees a device
(cudaGetDeviceCount > 0). Anything else is the CPU, with the reason logged once (logger "bitnet_ref") and kept
in `Device.reason`; for gpu (and for auto when a driver and device were found) that is a fallback
(`Device.fallback`), which the engine's receipt shows.

On CUDA, only the bitnet-cpp profile's I2_S x i8_s products of one activation row (decode) go to the GPU, as
exact int32 sums (the same sums as the CPU kernels, so the logits stay bit-identical); prompts, the int16-wrap
profile and everything else stay on the CPU. The CUDA path is UNTESTED ON GPU HARDWARE: the machines this was
written on have nvcc but no GPU, so only its build and its fallbacks are tested.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("bitnet_ref")

ENV_DEVICE = "BITNET_DEVICE"
ENV_LIMIT = "BITNET_GPU_MEMORY_LIMIT"
CHOICES = ("auto", "cpu", "gpu")
MIB = 1 << 20

_state: dict = {"logged": set()}


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" | "cuda"
    reason: str  # why this device (for the CPU: what was missing)
    requested: str = "auto"
    fallback: bool = False  # a GPU was asked for (gpu), or a driver and device were found (auto), but not used

    @property
    def name(self) -> str:
        """The receipt's device: "cpu" or "cuda:0"."""
        return "cuda:0" if self.kind == "cuda" else "cpu"

    def describe(self) -> str:
        return f"{self.name} ({ENV_DEVICE}={self.requested}: {self.reason})"


def library_path() -> str | None:
    """The CUDA kernel library loaded for decode, if any."""
    return _state.get("library_path")


def requested() -> str:
    value = os.environ.get(ENV_DEVICE, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_DEVICE}={os.environ.get(ENV_DEVICE)!r} is not one of {', '.join(CHOICES)}")
    return value


def memory_limit_bytes() -> int | None:
    raw = os.environ.get(ENV_LIMIT)
    if raw is None or not raw.strip():
        return None
    try:
        mib = int(raw.strip())
    except ValueError:
        raise ValueError(f"{ENV_LIMIT}={raw!r} is not a whole number of MiB") from None
    if mib <= 0:
        raise ValueError(f"{ENV_LIMIT}={raw!r} must be a positive number of MiB")
    return mib * MIB


def reset() -> None:
    """Forget the probe, the loaded library and the reasons already logged (for tests)."""
    _state.clear()
    _state["logged"] = set()


# -- probing ------------------------------------------------------------------------------------------
def _driver_devices() -> tuple[int, str | None]:
    """(devices the CUDA driver reports, None) or (0, what is missing)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return 0, f"no CUDA driver ({e})"
    rc = cuda.cuInit(0)
    if rc != 0:
        return 0, f"no CUDA device (cuInit error {rc})"
    n = ctypes.c_int(0)
    rc = cuda.cuDeviceGetCount(ctypes.byref(n))
    if rc != 0:
        return 0, f"no CUDA device (cuDeviceGetCount error {rc})"
    if n.value <= 0:
        return 0, "no CUDA device (the driver reports 0)"
    return n.value, None


def _build_module():
    path = Path(__file__).resolve().parents[1] / "native" / "build_cuda.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (the CUDA build needs a source checkout)")
    spec = importlib.util.spec_from_file_location("bitnet_build_cuda", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load_library() -> tuple[ctypes.CDLL | None, str | None]:
    """The CUDA kernel library, built (cached) and loaded, that sees a device; or (None, why not)."""
    try:
        path = _build_module().build()
    except Exception as e:  # CudaBuildError (no nvcc, compile error), a missing native/
        return None, str(e)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"the CUDA library does not load ({e})"
    _state["library_path"] = str(path)  # for the receipt's artifact hash
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.bk_cuda_device_count.argtypes = [ctypes.POINTER(ctypes.c_int)]
    lib.bk_cuda_upload.argtypes = [vp, i64, ctypes.POINTER(vp)]
    lib.bk_cuda_free.argtypes = [vp]
    lib.bk_cuda_i2s_gemv.argtypes = [vp, vp, vp, i64, i64]
    n = ctypes.c_int(0)
    rc = lib.bk_cuda_device_count(ctypes.byref(n))
    if rc != 0:
        return None, f"cudaGetDeviceCount failed (error {rc})"
    if n.value <= 0:
        return None, "no CUDA device (cudaGetDeviceCount = 0)"
    return lib, None


def _driver() -> tuple[int, str | None]:
    if "driver" not in _state:
        _state["driver"] = _driver_devices()
    return _state["driver"]


def _library() -> tuple[ctypes.CDLL | None, str | None]:
    if "library" not in _state:
        _state["library"] = _load_library()
    return _state["library"]


def _cpu(req: str, reason: str, fallback: bool) -> Device:
    if reason not in _state["logged"]:
        _state["logged"].add(reason)
        # a GPU that was asked for, or found and then failed, is a warning; a CPU-only machine is not
        level = logging.WARNING if req == "gpu" or _driver()[0] > 0 else logging.INFO
        log.log(level, "%s=%s: the I2_S products run on the CPU: %s", ENV_DEVICE, req, reason)
    return Device("cpu", reason, req, fallback)


def select_device(weights_bytes: int | None = None) -> Device:
    """The device for a model whose packed I2_S weights take `weights_bytes` (None: not known, not checked).
    ValueError for a bad BITNET_DEVICE or BITNET_GPU_MEMORY_LIMIT."""
    req = requested()
    limit = memory_limit_bytes()
    if req == "cpu":
        return Device("cpu", f"{ENV_DEVICE}=cpu", req)
    count, why = _driver()
    if why:
        return _cpu(req, why, fallback=req == "gpu")
    if limit is not None and weights_bytes is not None and weights_bytes > limit:
        return _cpu(req, f"the packed I2_S weights ({weights_bytes / MIB:.1f} MiB) exceed "
                         f"{ENV_LIMIT}={limit // MIB} MiB", fallback=True)
    lib, why = _library()
    if lib is None:
        return _cpu(req, why, fallback=True)
    return Device("cuda", f"{count} CUDA device(s); the CUDA I2_S gemv computes decode products", req)


# -- the model's hook -----------------------------------------------------------------------------------
class CudaI2S:
    """I2_S x i8_s exact int32 sums of one activation row on the GPU; weights uploaded on first use.
    UNTESTED ON GPU HARDWARE. Any CUDA error logs once and turns it off: `raw` then returns None and the
    caller computes on the CPU."""

    def __init__(self, lib: ctypes.CDLL, req: str = "auto"):
        self.lib, self.req = lib, req
        self.buffers: dict[int, ctypes.c_void_p] = {}
        self.failed: str | None = None

    def _fail(self, why: str) -> None:
        self.failed = why
        _cpu(self.req, f"CUDA failed, the CPU takes over: {why}", fallback=True)
        self.close()

    def raw(self, lin, q: np.ndarray) -> np.ndarray | None:
        """Σ code·q for q int8 (1, K) against lin's packed I2_S bytes: int32 (1, rows); None: use the CPU."""
        if self.failed is not None or q.shape[0] != 1:
            return None
        rows, k = lin.shape
        buf = self.buffers.get(id(lin))
        if buf is None:
            w = np.ascontiguousarray(np.asarray(lin.packed).reshape(-1)[: rows * k // 4], dtype=np.uint8)
            buf = ctypes.c_void_p()
            rc = self.lib.bk_cuda_upload(w.ctypes.data, w.nbytes, ctypes.byref(buf))
            if rc != 0:
                self._fail(f"upload of {lin.name} (error {rc})")
                return None
            self.buffers[id(lin)] = buf
        q = np.ascontiguousarray(q, dtype=np.int8)
        out = np.empty((1, rows), np.int32)
        rc = self.lib.bk_cuda_i2s_gemv(buf, q.ctypes.data, out.ctypes.data, rows, k)
        if rc != 0:
            self._fail(f"gemv on {lin.name} (error {rc})")
            return None
        return out

    def close(self) -> None:
        for buf in self.buffers.values():
            self.lib.bk_cuda_free(buf)
        self.buffers.clear()


def for_model(layers) -> tuple[Device, CudaI2S | None]:
    """The device decision for a loaded model's layers, and the GPU hook when it is CUDA."""
    packed = [lin for layer in layers for lin in layer.proj.values()
              if lin.packed is not None and lin.fmt == "i2_s" and lin.values is None]
    req = requested()
    memory_limit_bytes()  # validate it whatever the model
    if req != "cpu" and not packed:
        reason = "no packed I2_S x i8_s products in this profile (bitnet-cpp with the native kernels has them)"
        if req == "gpu":
            return _cpu(req, reason, fallback=True), None
        return Device("cpu", reason, req), None
    dev = select_device(sum(lin.shape[0] * lin.shape[1] // 4 for lin in packed))
    if dev.kind != "cuda":
        return dev, None
    return dev, CudaI2S(_library()[0], req)


__all__ = ["CHOICES", "CudaI2S", "Device", "for_model", "memory_limit_bytes", "requested", "reset",
           "select_device"]
