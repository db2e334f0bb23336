"""BITNET_CPU_THREADS: one reader (bitnet_ref.kernels.threads) for every engine; a bad value is a clear
error, never a crash deep inside or a silent default."""

from __future__ import annotations

import pytest

from bitnet_ref import kernels
from bitnet_ref.synth import SynthSpec, synthesize
from harness.engines.python_engine import PythonEngine


@pytest.mark.parametrize("value, expected", [(None, 2), ("", 2), ("1", 1), (" 7 ", 7)])
def test_good_values(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("BITNET_CPU_THREADS", raising=False)
    else:
        monkeypatch.setenv("BITNET_CPU_THREADS", value)
    assert kernels.threads() == expected


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_values_are_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("BITNET_CPU_THREADS", value)
    with pytest.raises(ValueError, match=f"BITNET_CPU_THREADS={value!r} is not a positive integer"):
        kernels.threads()


def test_engines_record_the_same_threads(monkeypatch, tmp_path):
    path = synthesize(SynthSpec(preset="tiny", arch="bitnet", format="tq2_0", layers=1), tmp_path)
    monkeypatch.setenv("BITNET_CPU_THREADS", "3")
    with PythonEngine(path, "exact") as e:
        assert e.receipt.threads == 3
    try:
        from harness.engines.llama_ffi import LlamaLibEngine, mainline_library

        library = mainline_library()
    except Exception as e:  # noqa: BLE001 - the llama.cpp half needs llama-cpp-python
        pytest.skip(f"mainline llama.cpp is not installed here: {e}")
    with LlamaLibEngine(path, library) as e:
        assert e.threads == 3 and e.receipt.threads == 3
    monkeypatch.setenv("BITNET_CPU_THREADS", "0")
    with pytest.raises(ValueError, match="BITNET_CPU_THREADS"):
        PythonEngine(path, "exact")
    with pytest.raises(ValueError, match="BITNET_CPU_THREADS"):
        LlamaLibEngine(path, library)
