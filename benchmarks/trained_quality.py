"""The trained model's quality and what each format and profile costs (measured, never asserted).

    python -m benchmarks.trained_quality [--arch bitnet-b1.58] [--ctx 256] [--tokens 64]

Prints: held-out perplexity (bitnet_ref, exact profile, llama-perplexity's convention over
cases/corpus/heldout.txt) against a unigram model's on the same tokens; greedy continuations of held-out
prompts; then, for each weight format x numerics profile, the perplexity and the mean / max KL divergence
of its next-token distributions from the exact profile's on the same positions.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np

from bitnet_ref import train as T
from bitnet_ref.generate import generate
from bitnet_ref.model import Model
from bitnet_ref.tokenizer import Tokenizer

HELD_OUT, PROMPTS = T.HELD_OUT_TEXT, T.HELD_OUT_PROMPTS
PAIRS = [("f32", "exact"), ("i2_s", "bitnet-cpp"), ("tl2", "bitnet-cpp"), ("f32", "bitnet-cpp"),
         ("tq2_0", "llama-cpp"), ("tq1_0", "llama-cpp"), ("f16", "llama-cpp"), ("f32", "llama-cpp")]


def chunk_logprobs(model, ids, ctx, bos):
    """Per chunk (llama-perplexity's): log-softmax rows of the scored positions, and the targets."""
    first = ctx // 2
    rows, targets = [], []
    for c in range(len(ids) // ctx):
        chunk = list(ids[c * ctx:(c + 1) * ctx])
        chunk[0] = bos
        logits = model.forward(chunk, model.new_state())[first:ctx - 1].astype(np.float64)
        rows.append(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))
        targets.append(np.asarray(ids[c * ctx + first + 1:(c + 1) * ctx]))
        del logits
    return np.concatenate(rows), np.concatenate(targets)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default=T.ARCH, choices=T.ARCHS)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    shipped = T.shipped_path(a.arch)
    _, vocab, _, info = T.read_model(shipped)
    tok = Tokenizer.from_metadata(vocab.metadata_dict())
    ids = tok.encode(HELD_OUT.read_text(encoding="utf-8"), add_bos=False)
    corpus = T.load_corpus()
    uni = T.unigram_perplexity(tok.encode(corpus.train, add_bos=False), ids, a.ctx, vocab.vocab_size)
    print(f"model {shipped.name}: {info.get('steps')} steps, held-out loss at the end of training "
          f"{info.get('held_out_loss'):.3f}, corpus sha256 {info.get('corpus_sha256', '')[:16]}..., "
          f"Python {info.get('python')}")
    print(f"held-out text: {len(ids)} tokens, {len(ids) // a.ctx} chunks of {a.ctx}")
    known = T.training_words(corpus.train)
    with Model.load(shipped, "exact") as m:
        base, targets = chunk_logprobs(m, ids, a.ctx, vocab.bos_id)
        ppl = math.exp(-base[np.arange(len(targets)), targets].mean())
        print(f"perplexity (exact profile): {ppl:.2f}; unigram model: {uni:.1f} (ratio {uni / ppl:.1f})")
        for p in PROMPTS:
            out = generate(m, tok.encode(p), a.tokens)
            frac, n = T.known_word_fraction(tok.decode(out), known)
            print(f"\n> {p}\n{tok.decode(out)!r}\n  ({frac:.0%} of {n} words in the training text, "
                  f"longest one-token run {T.longest_run(out)})")
    print("\nformat  profile      perplexity  KL mean     KL max    (vs exact profile)")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, prof in PAIRS:
            t0 = time.monotonic()
            with Model.load(T.derive(fmt, tmp, shipped), prof) as m:
                lp, _ = chunk_logprobs(m, ids, a.ctx, vocab.bos_id)
            p = math.exp(-lp[np.arange(len(targets)), targets].mean())
            kl = (np.exp(base) * (base - lp)).sum(axis=-1)
            print(f"{fmt:7} {prof:12} {p:10.3f}  {kl.mean():.3e}  {kl.max():.3e}  ({time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
