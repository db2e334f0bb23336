"""Worker for tests/test_fuzz_engine.py: one long-lived process that loads and runs many model files.

Reads JSON lines {"path": str, "profile": str} on stdin; for each, loads the model, computes teacher-forced
logits for a few tokens and generates a few greedy tokens, and answers one JSON line:
  {"ok": true, "tokens": [...]}                 it ran
  {"ok": false, "code": str, "error": str}      the project's own error (ModelError, FormatError)
  {"crash": "<traceback>"}                      any other exception: the property fails on it
A signal or a hang shows as a dead or silent process on the test's side. The first line written is
{"ready": true, "kernels": bool}: whether the native kernels are in use (BITNET_KERNELS=0 turns them off).
"""

import json
import sys
import traceback
import warnings


def main() -> None:
    from bitnet_ref import kernels
    from bitnet_ref.errors import FormatError, ModelError
    from bitnet_ref.generate import generate
    from bitnet_ref.model import Model

    warnings.simplefilter("ignore")  # overflow in mutated weights is not a crash
    print(json.dumps({"ready": True, "kernels": kernels.available()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            model = Model.load(req["path"], req["profile"])
            ids = [1, 5, 9]
            logits = model.logits(ids)
            assert logits.shape == (len(ids), model.cfg.vocab), logits.shape
            tokens = generate(model, ids, 3)
            out = {"ok": True, "tokens": [int(t) for t in tokens]}
        except (ModelError, FormatError) as e:
            out = {"ok": False, "code": getattr(e, "code", "format-error"), "error": str(e)[:500]}
        except Exception:  # noqa: BLE001 - reported to the property, which fails on it
            out = {"crash": traceback.format_exc()}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
