"""What a system under test can do, and which rungs that lets the ladder judge.

Every engine declares its operations (`Engine.info().operations`; a JSON-lines engine in its hello's
"operations"): tokenize, detokenize, logits, generate, perplexity, intermediates. A rung the system
under test cannot perform is recorded as `not_supported` (never a pass, never an error) and the ladder
goes on with what it can judge:

- no tokenize: the reference's token ids are used; the tokens rung is not supported;
- no logits: first_logits is not supported; all_logits judges top-1 only, teacher-forced through
  `generate(ids[:k], 1)` at up to the case's `teacher_forced_cap` positions per prompt, spread evenly (slow:
  one call per position); the greedy rung still runs (free generation, and after each divergence the
  engine continues from the reference's tokens through `generate`, up to `teacher_forced_cap` restarts);
- no generate but logits: the greedy rung takes the argmax of teacher-forced logits;
- no perplexity but logits: perplexity is computed from the logits (llama-perplexity's convention);
- nothing of the above: the record is an error, "nothing to compare".
"""

from __future__ import annotations

OPERATIONS = ("tokenize", "detokenize", "logits", "generate", "perplexity", "intermediates")
ENGINE_RUNGS = ("tokens", "first_logits", "all_logits", "greedy", "perplexity")


def operations(engine) -> frozenset[str]:
    """The operations `engine` declares."""
    return frozenset(engine.info().operations)


def unsupported_reason(rung: str, ops: frozenset[str], name: str) -> str | None:
    """Why the system under test `name` with operations `ops` cannot have `rung` judged (None: it can)."""
    if rung == "tokens" and "tokenize" not in ops:
        return f"{name} declares no tokenize: the reference's token ids are used"
    if rung == "first_logits" and "logits" not in ops:
        return f"{name} declares no logits"
    if rung == "all_logits" and not ops & {"logits", "generate"}:
        return f"{name} declares neither logits nor generate"
    if rung == "greedy" and not ops & {"generate", "logits"}:
        return f"{name} declares neither generate nor logits"
    if rung == "perplexity" and not ops & {"perplexity", "logits"}:
        return f"{name} declares neither perplexity nor logits"
    return None


__all__ = ["ENGINE_RUNGS", "OPERATIONS", "operations", "unsupported_reason"]
