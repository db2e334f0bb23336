"""Generation (greedy, seeded sampling, streaming) and scoring (perplexity in two conventions, bits per
byte) over any model that offers `new_state()` and `forward(ids, state, last_only=False) -> logits
[len(ids), vocab]` ([1, vocab] for the last position with last_only). Generation asks for the prompt's last
logits only, as llama-cli does (for bitnet_ref that is also what llama.cpp computes then: see Model.forward).

Sampling is reproducible: the generator is seeded from the call's seed, else BITNET_SEED, else 0;
BITNET_DETERMINISTIC=1 refuses an unseeded sampling call instead of picking a default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .errors import model_error


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None


def _rng(params: SamplingParams) -> np.random.Generator:
    seed = params.seed
    if seed is None and os.environ.get("BITNET_SEED"):
        seed = int(os.environ["BITNET_SEED"])
    if seed is None:
        if os.environ.get("BITNET_DETERMINISTIC") == "1":
            raise ValueError("BITNET_DETERMINISTIC=1: sampling needs a seed (pass --seed or set BITNET_SEED)")
        seed = 0
    return np.random.default_rng(seed)


def pick(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """The next token from one row of logits. Greedy takes the first maximum (as llama.cpp does)."""
    if params.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    order = np.argsort(-z, kind="stable")
    if params.top_k > 0:
        order = order[: params.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])


def stream(model, ids: list[int], n: int, params: SamplingParams = SamplingParams(),
           stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Yield up to n tokens after `ids`, stopping after an end token (which is yielded)."""
    if not ids:
        raise model_error("empty-prompt", "the prompt has no tokens", "give at least one token (BOS counts)")
    rng = None if params.temperature <= 0 else _rng(params)
    state = model.new_state()
    logits = model.forward(list(ids), state, last_only=True)[-1]
    for i in range(n):
        tok = pick(logits, params, rng)
        yield tok
        if tok in stop_ids or i == n - 1:
            return
        logits = model.forward([tok], state)[-1]


def generate(model, ids: list[int], n: int, params: SamplingParams = SamplingParams(),
             stop_ids: tuple[int, ...] = ()) -> list[int]:
    return list(stream(model, ids, n, params, stop_ids))


def _target_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) per row, computed as llama-perplexity computes it, so that perplexities agree to
    its printed precision: float32 logit - max, expf of that (glibc's expf is matched by float64 exp
    rounded once to float32), summed in double in vocabulary order, log in double."""
    x = np.asarray(logits, dtype=np.float32)
    d = x - x.max(axis=-1, keepdims=True)
    e = np.exp(d.astype(np.float64)).astype(np.float32).astype(np.float64)
    sums = np.cumsum(e, axis=-1)[:, -1]  # sequential, as the tool's loop adds
    return d[np.arange(len(targets)), targets].astype(np.float64) - np.log(sums)


@dataclass
class Score:
    ppl: float
    nll: float  # mean negative log-likelihood, nats per scored token
    n_scored: int
    convention: str
    ctx: int
    per_chunk: list[float] = field(default_factory=list)  # running PPL after each chunk (llama-perplexity)

    def bits_per_byte(self, n_bytes: int) -> float:
        """Total bits over the text's UTF-8 bytes: comparable across tokenizers when every token of the
        text was scored (the sliding convention with stride < ctx)."""
        return self.nll * self.n_scored / math.log(2) / n_bytes


def perplexity_llama(model, ids: list[int], ctx: int, bos_id: int | None) -> Score:
    """llama-perplexity's convention: consecutive chunks of `ctx` tokens; when the model adds BOS, BOS
    replaces each chunk's first token; only the second half of each chunk is scored (each token
    predicted from at least ctx/2 tokens of context). Needs at least 2 * ctx tokens, as the tool does."""
    if ctx < 4:
        raise ValueError(f"ctx must be at least 4, got {ctx}")
    n_chunks = len(ids) // ctx
    if n_chunks < 2:
        raise model_error("corpus-too-short", f"{len(ids)} tokens give {n_chunks} chunks of {ctx}",
                          f"llama-perplexity needs at least {2 * ctx} tokens: use a longer text or a smaller ctx")
    first = ctx // 2
    total, count, running = 0.0, 0, []
    for c in range(n_chunks):
        chunk = list(ids[c * ctx : (c + 1) * ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        logits = model.forward(chunk, model.new_state())
        targets = np.asarray(ids[c * ctx + first + 1 : (c + 1) * ctx])
        for lp in _target_logprobs(logits[first : ctx - 1], targets):  # in order, as the tool sums
            total -= float(lp)
        count += len(targets)
        running.append(math.exp(total / count))
    return Score(ppl=running[-1], nll=total / count, n_scored=count, convention="llama-perplexity", ctx=ctx,
                 per_chunk=running)


def perplexity_sliding(model, ids: list[int], ctx: int, stride: int | None = None) -> Score:
    """Sliding window: windows of up to ctx tokens advancing by `stride` (default ctx // 2); every token
    after the first is scored exactly once, with as much context as the window gives."""
    stride = stride or max(1, ctx // 2)
    if not 0 < stride < ctx:  # a window must overlap the next by a token, or that token goes unscored
        raise ValueError(f"stride must be in 1..ctx-1, got {stride}")
    if len(ids) < 2:
        raise model_error("corpus-too-short", f"{len(ids)} tokens", "give at least two tokens to score")
    total, count, scored_to = 0.0, 0, 0  # tokens up to index scored_to are scored
    start = 0
    while scored_to < len(ids) - 1:
        end = min(start + ctx, len(ids))
        logits = model.forward(list(ids[start:end]), model.new_state())
        positions = np.arange(max(scored_to, start), end - 1)  # predict token p + 1 from position p
        targets = np.asarray(ids)[positions + 1]
        total -= float(_target_logprobs(logits[positions - start], targets).sum())
        count += len(positions)
        scored_to = end - 1
        start += stride
    return Score(ppl=math.exp(total / count), nll=total / count, n_scored=count, convention="sliding", ctx=ctx)
