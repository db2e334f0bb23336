"""harness/engines/serve.py: any registry engine behind the JSON-lines protocol in a process of its own (how
the TL2 build is isolated). Tested with bitnet_ref, which needs no bitnet.cpp: the isolated engine answers
exactly what the in-process one does, reports its receipt, and survives an operation that fails."""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_ref.synth import SynthSpec, synthesize
from harness.engines.base import EngineError
from harness.engines.jsonl import JsonlEngine
from harness.engines.registry import open_engine

TEXT = "The quick brown fox jumps over the lazy dog. " * 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synthesize(SynthSpec(preset="tiny", arch="bitnet", format="tq2_0"), tmp_path_factory.mktemp("serve"))


def test_isolated_engine_answers_what_the_in_process_one_does(model):
    with open_engine("bitnet_ref", model, "llama-cpp", {"n_ubatch": 4}) as local, \
            open_engine("bitnet_ref", model, "llama-cpp", {"n_ubatch": 4}, isolate=True) as served:
        assert isinstance(served, JsonlEngine) and not isinstance(local, JsonlEngine)
        ids = local.tokenize(TEXT)
        assert served.tokenize(TEXT) == ids and served.detokenize(ids[1:]) == local.detokenize(ids[1:])
        a, b = local.logits(ids), served.logits(ids)
        assert a.dtype == b.dtype == np.float32 and a.tobytes() == b.tobytes()
        assert served.generate(ids[:8], 6) == local.generate(ids[:8], 6)
        pa, pb = local.perplexity(ids, 32), served.perplexity(ids, 32)
        assert pa.ppl == pb.ppl and pa.n_scored == pb.n_scored
        r, s = local.receipt, served.receipt
        assert (s.engine, s.model_sha256, s.artifact_sha256, s.profile) == (r.engine, r.model_sha256,
                                                                              r.artifact_sha256, "llama-cpp")
        names = ["Qcur-0", "l_out-1", "result_output"]
        got, want = served.intermediates(ids, names), local.intermediates(ids, names)
        assert all(got[n].tobytes() == want[n].tobytes() for n in names)
        assert got["result_output"].tobytes() == a.tobytes()  # in the same micro-batches as logits()
        with pytest.raises(EngineError, match=r"token-out-of-range.*token id 1000000 .*outside the vocabulary"):
            served.logits([10**6])
        assert served.generate(ids[:8], 2) == local.generate(ids[:8], 2)  # still usable after the error
