"""A JSON-lines engine that answers the handshake properly and every later request with the bytes of the
file named by its first argument, read afresh for each request, with b"{ID}" replaced by the request's id.
The fuzz property (tests/test_fuzz_inputs.py) writes that file before each call."""

import json
import sys

reply_path = sys.argv[1]
for line in sys.stdin.buffer:
    req = json.loads(line)
    if req.get("op") == "hello":
        out = json.dumps({"id": req["id"], "ok": True, "protocol": 1, "name": "scripted", "version": "0",
                          "operations": ["tokenize", "detokenize", "logits", "generate", "perplexity"]})
        sys.stdout.write(out + "\n")
        sys.stdout.flush()
        continue
    if req.get("op") == "shutdown":
        break
    with open(reply_path, "rb") as f:
        reply = f.read().replace(b"{ID}", str(req["id"]).encode())
    sys.stdout.buffer.write(reply)
    sys.stdout.buffer.flush()
