"""IQ2_S (read-only, through the gguf package) against values derived by hand from the block layout, and the
optional per-projection `blk.N.<proj>.scale` tensors (shape {1}) that mainline multiplies into a product."""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_ref.errors import FormatError
from bitnet_ref.formats import get_format
from bitnet_ref.formats.iq2s import IQ2_S
from bitnet_ref.gguf import TensorSpec, open_gguf, write_gguf
from bitnet_ref.gguf.validate import validate_file
from bitnet_ref.model import Model
from bitnet_ref.synth import SynthSpec, synthesize


def block(d: float = 1.0) -> np.ndarray:
    """One IQ2_S block (82 bytes): d (f16), qs[64] (grid indices, then sign bits), qh[8], scales[8]."""
    b = np.zeros(82, np.uint8)
    b[0:2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
    return b


def test_iq2s_block_layout_by_hand():
    """Grid entry 0 is eight 8s; a value is d * (0.5 + scale nibble) / 4 * 8, negative where its sign bit is
    set; the low nibble of scales[ib] serves the first 16 values of group ib, the high nibble the next 16."""
    assert get_format(22) is IQ2_S
    assert (IQ2_S.decode(block(1.0), (1, 256)) == 1.0).all()
    assert (IQ2_S.decode(block(2.0), (1, 256)) == 2.0).all()
    b = block(1.0)
    b[2 + 32] = 0xFF  # the sign bits of the first 8 values
    v = IQ2_S.decode(b, (1, 256))[0]
    assert (v[:8] == -1.0).all() and (v[8:] == 1.0).all()
    b = block(1.0)
    b[2 + 64 + 8] = 0x21  # scales[0]: low nibble 1, high nibble 2
    v = IQ2_S.decode(b, (1, 256))[0]
    assert (v[:16] == 3.0).all() and (v[16:32] == 5.0).all() and (v[32:] == 1.0).all()
    two_rows = IQ2_S.decode(np.concatenate([block(1.0), block(-0.5)]), (2, 256))
    assert (two_rows[0] == 1.0).all() and (two_rows[1] == -0.5).all()


def test_iq2s_refuses_what_it_cannot_do():
    assert IQ2_S.nbytes((3, 512)) == 3 * 2 * 82
    with pytest.raises(FormatError, match="not a multiple of 256"):
        IQ2_S.nbytes((1, 100))
    with pytest.raises(FormatError, match="81 bytes given for shape"):
        IQ2_S.decode(np.zeros(81, np.uint8), (1, 256))
    with pytest.raises(FormatError, match="read-only"):
        IQ2_S.encode(np.zeros((1, 256), np.float32))


def _with_scales(src, dst, scales: dict[str, float], double: tuple[str, ...] = ()):
    """A copy of an F32 model with `.scale` tensors added, or with the named projections' weights doubled."""
    with open_gguf(src) as gf:
        meta = [(k, mv.value, mv.vtype, mv.item_type) for k, mv in gf.metadata.items()]
        tensors = []
        for t in gf.tensors:
            data = gf.tensor_bytes(t).copy()
            if t.name in double:
                data = (data.view(np.float32) * np.float32(2)).view(np.uint8)
            tensors.append(TensorSpec(t.name, t.shape, t.type_id, data))
    tensors += [TensorSpec(name, (1,), 0, np.array([v], np.float32)) for name, v in scales.items()]
    return write_gguf(dst, meta, tensors)


@pytest.mark.parametrize("profile", ["exact", "llama-cpp"])
def test_scale_tensors_multiply_the_product(tmp_path, profile):
    """A `.scale` of 2 on a projection computes what doubling its weights computes (exact in float), and
    validation does not call the scale tensors unused."""
    base = synthesize(SynthSpec(preset="tiny", arch="bitnet", format="f32", layers=1), tmp_path)
    projs = ("blk.0.attn_q", "blk.0.ffn_down")
    scaled = _with_scales(base, tmp_path / "scaled.gguf", {f"{p}.scale": 2.0 for p in projs})
    doubled = _with_scales(base, tmp_path / "doubled.gguf", {}, double=tuple(f"{p}.weight" for p in projs))
    assert [f.code for f in validate_file(scaled)] == []
    ids = [1, 5, 9, 42, 7]
    with Model.load(base, profile) as m0, Model.load(scaled, profile) as m1, Model.load(doubled, profile) as m2:
        a, b, c = m0.logits(ids), m1.logits(ids), m2.logits(ids)
    assert not np.array_equal(a, b)  # the scales are used
    assert b.tobytes() == c.tobytes()


def test_scale_tensors_agree_with_llama_cpp(tmp_path):
    """Mainline reads the same `.scale` tensors (wq_s, ...): the llama-cpp profile still matches it."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (mainline llama.cpp) is not installed")
    from harness.engines.registry import open_engine
    from harness.metrics import compare_logits

    base = synthesize(SynthSpec(preset="tiny", arch="bitnet", format="f32", layers=1), tmp_path)
    scaled = _with_scales(base, tmp_path / "scaled.gguf", {"blk.0.attn_q.scale": 2.0, "blk.0.ffn_up.scale": 0.5})
    with open_engine("bitnet_ref", scaled, "llama-cpp") as sut, open_engine("llama_cpp", scaled) as ref:
        ids = ref.tokenize("The quick brown fox jumps over the lazy dog.")
        got = sut.logits(ids)
        m = compare_logits(got, ref.logits(ids))
    with open_engine("bitnet_ref", base, "llama-cpp") as plain:
        moved = compare_logits(plain.logits(ids), got)["max_abs"]
    assert m["max_abs"] < 1e-4 and moved > 1e-2, (m["max_abs"], moved)
