"""The Python engine against the references through the adapters, as the harness will run them: same
model, same tokens, receipts on both sides. Mainline llama.cpp runs in every test run; bitnet.cpp where
BITNET_CPP_DIR names a build."""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_ref.synth import SynthSpec, synthesize
from harness.engines.base import EngineError, file_sha256, require_receipt
from harness.engines.registry import open_engine

PROMPT = ("The committee met on Tuesday to review the budget for 2027; after a long debate about roads, "
          "schools and the new library, they agreed to postpone the vote until the auditors reported back.")


def receipts_agree(sut, ref, model):
    a, b = require_receipt("bitnet_ref", sut.receipt), require_receipt(ref.receipt.engine, ref.receipt)
    assert a.model_sha256 == b.model_sha256 == file_sha256(model)
    assert b.artifact and b.artifact_sha256 and len(b.artifact_sha256) == 64


@pytest.mark.llama_cpp
@pytest.mark.parametrize("fmt", ["f32", "tq1_0", "tq2_0"])
def test_python_engine_matches_mainline_through_the_ffi_adapter(tmp_path, fmt):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")
    model = synthesize(SynthSpec(arch="bitnet", format=fmt), tmp_path)
    with open_engine("bitnet_ref", model, "llama-cpp") as sut, open_engine("llama_cpp", model) as ref:
        ids = ref.tokenize(PROMPT)
        assert sut.tokenize(PROMPT) == ids
        ids = (ids * 4)[:128]
        delta = np.abs(sut.logits(ids) - ref.logits(ids)).max(axis=1)
        assert delta.max() <= 1e-4, f"first position over 1e-4: {int(np.argmax(delta > 1e-4))}, max {delta.max()}"
        assert sut.generate(ids[:32], 64) == ref.generate(ids[:32], 64)
        receipts_agree(sut, ref, model)


def _bitnet_cpp_or_skip(name, model):
    try:
        return open_engine(name, model)
    except EngineError as e:
        if "BITNET_CPP_DIR" in str(e):
            pytest.skip(str(e))
        raise


@pytest.mark.bitnet_cpp
def test_bitnet_cpp_ffi_and_cli_adapters_agree(tmp_path):
    model = synthesize(SynthSpec(arch="bitnet-b1.58", format="i2_s"), tmp_path)
    ffi = _bitnet_cpp_or_skip("bitnet_cpp", model)
    cli = _bitnet_cpp_or_skip("bitnet_cpp_cli", model)
    with ffi, cli:
        ids = ffi.tokenize(PROMPT)
        out = ffi.generate(ids, 16)
        gen = cli.generate_text(PROMPT, 16)
        if gen.ids is not None:
            assert gen.ids == out
        assert gen.text == ffi.detokenize(out)
        names = ["attn_norm-0", "attn_sub_norm-0", "ffn_sub_norm-0", "l_out-0"]
        inter = ffi.intermediates(ids, names)
        assert set(inter) == set(names) and inter["l_out-0"].shape == (len(ids), 256)
        require_receipt("bitnet.cpp", ffi.receipt)
        require_receipt("bitnet.cpp", cli.receipt)
