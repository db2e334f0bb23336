"""BITNET_DEVICE / BITNET_GPU_MEMORY_LIMIT: the device decision and its CPU fallbacks (bitnet_ref/device.py).

Without a CUDA device the gemv comparisons skip (they compare the CUDA gemv with the CPU kernel bit for bit
where one exists); the library's build (when nvcc exists) and every fallback run everywhere."""

from __future__ import annotations

import logging
import shutil
import time

import numpy as np
import pytest

from bitnet_ref import device
from bitnet_ref.synth import SynthSpec, synthesize


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    for var in ("BITNET_DEVICE", "BITNET_GPU_MEMORY_LIMIT", "BITNET_NVCC", "BITNET_CUDA_NVCCFLAGS"):
        monkeypatch.delenv(var, raising=False)
    device.reset()
    yield
    device.reset()


@pytest.fixture(scope="module")
def cuda_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda-cache")


def _warnings(caplog, level=logging.WARNING):
    return [r for r in caplog.records if r.name == "bitnet_ref" and r.levelno == level]


def _no_probe(*a, **k):
    raise AssertionError("BITNET_DEVICE=cpu must not probe")


def test_cpu_does_not_probe(monkeypatch, caplog):
    monkeypatch.setenv("BITNET_DEVICE", "cpu")
    monkeypatch.setattr(device, "_driver_devices", _no_probe)
    monkeypatch.setattr(device, "_load_library", _no_probe)
    d = device.select_device(10**12)
    assert (d.kind, d.name, d.fallback) == ("cpu", "cpu", False)
    assert "BITNET_DEVICE=cpu" in d.reason
    assert not _warnings(caplog)


@pytest.mark.parametrize("req", ["auto", "gpu"])
def test_this_machine_falls_back_with_reason_logged_once(monkeypatch, caplog, req):
    monkeypatch.setenv("BITNET_DEVICE", req)
    caplog.set_level(logging.INFO, logger="bitnet_ref")
    first = device.select_device()
    if first.kind == "cuda":
        pytest.skip("a CUDA device is usable here")
    assert first.name == "cpu"
    assert any(w in first.reason for w in ("no CUDA driver", "no CUDA device", "no nvcc", "nvcc failed",
                                           "cudaGetDeviceCount"))
    assert device.select_device() == first
    # a GPU asked for and not usable is a warning; auto on a machine without a GPU only informs
    level = logging.WARNING if req == "gpu" or device._driver()[0] > 0 else logging.INFO
    logged = _warnings(caplog, level)
    assert len(logged) == 1 and first.reason in logged[0].getMessage()
    if req == "gpu":
        assert first.fallback


@pytest.mark.parametrize("var,value", [("BITNET_DEVICE", "tpu"), ("BITNET_GPU_MEMORY_LIMIT", "0"),
                                       ("BITNET_GPU_MEMORY_LIMIT", "-5"), ("BITNET_GPU_MEMORY_LIMIT", "lots")])
def test_bad_values_name_the_variable(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        device.select_device()


def test_missing_nvcc_is_the_reason(monkeypatch, caplog):
    monkeypatch.setenv("BITNET_DEVICE", "gpu")
    monkeypatch.setenv("BITNET_NVCC", "/nonexistent/nvcc")
    monkeypatch.setattr(device, "_driver_devices", lambda: (1, None))  # pretend a driver and a device
    d = device.select_device()
    assert d.kind == "cpu" and d.fallback and "no nvcc" in d.reason


def test_memory_limit_falls_back(monkeypatch):
    monkeypatch.setenv("BITNET_DEVICE", "auto")
    monkeypatch.setenv("BITNET_GPU_MEMORY_LIMIT", "1")
    monkeypatch.setattr(device, "_driver_devices", lambda: (1, None))
    monkeypatch.setattr(device, "_load_library", _no_probe)
    d = device.select_device(3 * device.MIB)
    assert d.kind == "cpu" and d.fallback and "BITNET_GPU_MEMORY_LIMIT=1 MiB" in d.reason


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc: the CUDA library cannot be built")
def test_build_cuda_compiles_and_caches(monkeypatch, cuda_cache):
    monkeypatch.setenv("BITNET_CUDA_CACHE", str(cuda_cache))
    bc = device._build_module()
    lib = bc.build()
    assert lib.exists() and lib.parent == cuda_cache
    mtime = lib.stat().st_mtime_ns
    t0 = time.monotonic()
    assert bc.build() == lib and lib.stat().st_mtime_ns == mtime  # cached: not compiled again
    assert time.monotonic() - t0 < 1.0
    # with a driver faked, the real library loads; on a machine without a GPU its cudaGetDeviceCount fails
    monkeypatch.setenv("BITNET_DEVICE", "gpu")
    monkeypatch.setattr(device, "_driver_devices", lambda: (1, None))
    d = device.select_device()
    if d.kind == "cpu":
        assert "cudaGetDeviceCount" in d.reason or "no CUDA device" in d.reason


def _cuda_or_skip(monkeypatch) -> device.Device:
    monkeypatch.setenv("BITNET_DEVICE", "gpu")
    d = device.select_device()
    if d.kind != "cuda":
        pytest.skip(f"no usable CUDA device here ({d.reason}): the CUDA gemv cannot be compared with the CPU")
    return d


def test_a_gpu_asked_for_and_not_usable_says_so_in_the_receipt(monkeypatch, tmp_path):
    from harness.engines.python_engine import PythonEngine

    monkeypatch.setenv("BITNET_DEVICE", "gpu")
    if device.select_device().kind == "cuda":
        pytest.skip("a CUDA device is usable here: no fallback to show")
    path = synthesize(SynthSpec(arch="bitnet-b1.58", format="i2_s", layers=1), tmp_path)
    with PythonEngine(path, "bitnet-cpp") as gpu:
        assert gpu.receipt.device == "cpu" and gpu.model.device.fallback
        assert gpu.model.device.reason in gpu.receipt.version


@pytest.mark.gpu
@pytest.mark.parametrize("rows, k", [(1, 128), (7, 256), (256, 2560), (6912, 2560), (2560, 6912)])
def test_cuda_gemv_equals_the_cpu_kernel_bit_for_bit(monkeypatch, rows, k):
    """The CUDA I2_S gemv's int32 sums against the CPU kernels' (kernels.i2s_raw) on random codes and
    activations, including the extremes (all codes 3 against -128)."""
    from types import SimpleNamespace

    from bitnet_ref import kernels

    _cuda_or_skip(monkeypatch)
    rng = np.random.default_rng(rows * 31 + k)
    lib, why = device._library()
    assert lib is not None, why
    gpu = device.CudaI2S(lib, "gpu")
    try:
        for packed, q in ((rng.integers(0, 256, rows * k // 4, dtype=np.uint8), rng.integers(-128, 128, (1, k))),
                          (np.full(rows * k // 4, 0xFF, np.uint8), np.full((1, k), -128))):
            q = q.astype(np.int8)
            lin = SimpleNamespace(shape=(rows, k), packed=packed, name=f"w{rows}x{k}")
            got = gpu.raw(lin, q)
            assert gpu.failed is None and got is not None, gpu.failed
            want = kernels.i2s_raw(q, packed, rows)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
            gpu.close()
    finally:
        gpu.close()


@pytest.mark.gpu
def test_engine_decode_same_on_gpu_and_cpu(monkeypatch, tmp_path):
    """Decode (one row at a time: the CUDA gemv's case) gives the CPU's logits, bit for bit."""
    from harness.engines.python_engine import PythonEngine

    path = synthesize(SynthSpec(arch="bitnet-b1.58", format="i2_s", layers=1), tmp_path)
    ids = [1, 2, 3, 4]

    def decode(engine):
        state = engine.model.new_state()
        return np.concatenate([engine.model.forward([i], state) for i in ids])

    monkeypatch.setenv("BITNET_DEVICE", "cpu")
    with PythonEngine(path, "bitnet-cpp") as cpu:
        want = decode(cpu)
    _cuda_or_skip(monkeypatch)
    with PythonEngine(path, "bitnet-cpp") as gpu:
        assert gpu.receipt.device == "cuda:0"
        got = decode(gpu)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def test_engines_line_shows_the_device(monkeypatch):
    from harness.engines.registry import probe_all

    monkeypatch.setenv("BITNET_DEVICE", "cpu")
    line = next(s for s in probe_all() if s.name == "bitnet_ref")
    assert "device: cpu (BITNET_DEVICE=cpu" in line.detail
    monkeypatch.setenv("BITNET_DEVICE", "bogus")
    line = next(s for s in probe_all() if s.name == "bitnet_ref")
    assert "BITNET_DEVICE" in line.detail
