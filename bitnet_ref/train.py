"""Train the project's small BitNet b1.58 model from scratch, and write it in every weight format.

    python -m bitnet_ref.train [--steps N] [--seed S] [-o models/trained]      (or: nox -s train)

What it trains is what the engine computes (bitnet_ref/model.py, the GGUF forward), with the paper's
quantization-aware training (BitNet b1.58, "The Era of 1-bit LLMs"; the 2B-4T report's architecture):
- every projection has no bias; its weights are absmean-quantized to ternary per tensor
  (scale = mean|W|, values = clamp(round(W / scale), -1, 1)) and its input activations are quantized per
  token to 8 bits by absmax (scale 127 / max|x|, clamp to [-128, 127]); both with straight-through
  gradients (the forward sees the quantized values, the backward passes the gradient through unchanged);
- per layer: h = rms(x) * attn_norm; q, k, v; NeoX RoPE (pairs i, i + d/2, angle p * theta^(-2i/d));
  causal grouped-query attention, scale 1/sqrt(head_dim); o = rms(a) * attn_sub_norm; x += Wo o;
  h = rms(x) * ffn_norm; f = relu(Wg h)^2 * (Wu h) (arch bitnet-b1.58); f = rms(f) * ffn_sub_norm; x += Wd f;
- logits = (rms(x) * output_norm) . E^T with E the token embedding (tied, as 2B-4T), seen through float16
  (the files store it as F16) with a straight-through gradient.

Corpus: the installed Python's documentation topics (pydoc_data) and the docstrings of the standard
library's modules, read from their source with `ast` (nothing is imported). One document in 20 (by a hash of
its name) is held out. The corpus is not committed: its sha256 and the Python version go into the model's
metadata. Tokenizer: a byte-level BPE trained with HF `tokenizers` on the training split, with llama.cpp's
`llama-bpe` pre-tokenizer pattern, written into the GGUF like the real models' vocabularies.

Deterministic: the same seed, corpus and JAX version give the same weights (XLA's CPU reductions are
deterministic; the data order comes from numpy's seeded generator). The writer is the project's own
(gguf.write_gguf, the formats' pack); `derive` turns the shipped I2_S file into any other format, byte-identical
to what training would have written in that format.

JAX (CPU) and matplotlib come from the optional extra `[train]`; only training needs them.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .formats import F16, F32, I2S_FLAVOUR_KEY, format_for, get_format
from .formats.base import absmean_quantize
from .gguf import TensorSpec, open_gguf, write_gguf
from .vocab import LLAMA3_SPLIT_PATTERN, TOKEN_CONTROL, TOKEN_NORMAL, VocabSpec, token_bytes_to_str

ARCH = "bitnet-b1.58"
SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
FORMAT_NAMES = ("f32", "f16", "tq1_0", "tq2_0", "i2_s", "tl1", "tl2")
FILE_TYPE = {"f32": 0, "f16": 1, "tq1_0": 36, "tq2_0": 37, "tl1": 38, "tl2": 39, "i2_s": 40}
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
ARCHS = ("bitnet-b1.58", "bitnet")


def shipped_path(arch: str = ARCH) -> Path:
    """The committed trained model of an architecture (I2_S; the other formats are derived from it)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; trained models: {', '.join(ARCHS)}")
    return MODELS_DIR / f"trained-{arch}-i2_s.gguf"


SHIPPED = shipped_path(ARCH)
HELD_OUT_EVERY = 20
# the held-out text the quality checks and the default cases score, and prompts from held-out documents
HELD_OUT_TEXT = Path(__file__).resolve().parent.parent / "cases" / "corpus" / "heldout.txt"
HELD_OUT_PROMPTS = [
    "A dictionary display is a possibly empty series of",
    "Methods are functions that are called using the attribute notation.",
    "Insert item x in list a, and keep it sorted",
    "Generic (shallow and deep) copying operations.",
]
# standard-library folders whose docstrings are left out (tests, demos, vendored code)
SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "site-packages", "lib2to3", "ensurepip", "__pycache__",
             "config-3.11-x86_64-linux-gnu", "pydoc_data"}


@dataclass(frozen=True)
class TrainConfig:
    arch: str = ARCH  # "bitnet-b1.58" (ReLU^2-gated) or "bitnet" (SiLU-gated, mainline llama.cpp's)
    hidden: int = 256
    ffn: int = 768
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 2048  # including the 3 special tokens
    context: int = 512  # written into the file
    seq: int = 288  # training window (BOS + 287 tokens): a prompt plus 256 greedy tokens fit
    batch: int = 8
    steps: int = 500
    lr: float = 2e-3
    min_lr_frac: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.05
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 50
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0

    def model_config(self) -> ModelConfig:
        return ModelConfig(arch=self.arch, hidden=self.hidden, ffn=self.ffn, layers=self.layers, heads=self.heads,
                           kv_heads=self.kv_heads, vocab=self.vocab, context=self.context, rms_eps=self.rms_eps,
                           rope_theta=self.rope_theta)


# -- corpus ----------------------------------------------------------------------------------------
def _docstring_documents() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = Path(dirpath) / fn
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            parts = []
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 40:
                        parts.append(doc.strip())
            if parts:
                docs.append((f"stdlib:{path.relative_to(root).as_posix()}", "\n\n".join(parts)))
    return docs


def corpus_documents() -> list[tuple[str, str]]:
    """(name, text) of every document, in a fixed order: pydoc topics, then stdlib docstrings by path."""
    from pydoc_data.topics import topics

    docs = [(f"pydoc:{k}", topics[k].strip()) for k in sorted(topics)]
    return docs + _docstring_documents()


def is_held_out(name: str) -> bool:
    return zlib.crc32(name.encode()) % HELD_OUT_EVERY == 0


@dataclass(frozen=True)
class Corpus:
    train: str
    held_out: str
    sha256: str
    documents: int
    python: str


def load_corpus() -> Corpus:
    docs = corpus_documents()
    train = "\n\n".join(t for n, t in docs if not is_held_out(n))
    held = "\n\n".join(t for n, t in docs if is_held_out(n))
    h = hashlib.sha256()
    for name, text in docs:
        h.update(json.dumps([name, text]).encode() + b"\n")
    return Corpus(train, held, h.hexdigest(), len(docs), sys.version.split()[0])


# -- tokenizer -------------------------------------------------------------------------------------
def train_tokenizer(text: str, size: int) -> VocabSpec:
    """A byte-level BPE of exactly `size` tokens learned with HF tokenizers: ids 0..255 the bytes, then the
    merges' tokens in the order learned, then the specials (bos, eos, eot) as control tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    n_learned = size - 256 - len(SPECIALS)
    trainer = trainers.BpeTrainer(vocab_size=256 + n_learned, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=2)
    tok.train_from_iterator([text], trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in merges]
    byte_strs = [token_bytes_to_str(bytes([b])) for b in range(256)]
    tokens, seen, kept = list(byte_strs), set(byte_strs), []
    for a, b in merges:
        if len(tokens) - 256 >= n_learned:
            break
        kept.append(f"{a} {b}")
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    if len(tokens) - 256 < n_learned:
        raise ValueError(f"the corpus yields only {len(tokens) - 256} merges; vocabulary {size} too large")
    base = len(tokens)
    return VocabSpec(model="gpt2", pre="llama-bpe", tokens=tokens + list(SPECIALS),
                     token_type=[TOKEN_NORMAL] * base + [TOKEN_CONTROL] * len(SPECIALS), scores=None,
                     merges=kept, bos_id=base, eos_id=base + 1, eot_id=base + 2, add_bos=True)


def encode(vocab: VocabSpec, text: str) -> np.ndarray:
    """Token ids of `text` (no BOS) with the project's own tokenizer (what the engines use)."""
    from .tokenizer import Tokenizer

    tok = Tokenizer.from_metadata(vocab.metadata_dict())
    return np.asarray(tok.encode(text, add_bos=False), dtype=np.int32)


# -- the model in JAX ------------------------------------------------------------------------------
def init_params(cfg: TrainConfig, seed: int) -> dict:
    rng = np.random.default_rng([seed, 1])
    hd = cfg.hidden // cfg.heads
    kv = cfg.kv_heads * hd

    def mat(rows, k):
        return (rng.standard_normal((rows, k)) / math.sqrt(k)).astype(np.float32)

    p = {"token_embd": (rng.standard_normal((cfg.vocab, cfg.hidden)) * 0.02).astype(np.float32),
         "output_norm": np.ones(cfg.hidden, np.float32), "layers": []}
    for _ in range(cfg.layers):
        p["layers"].append({
            "attn_norm": np.ones(cfg.hidden, np.float32), "attn_sub_norm": np.ones(cfg.hidden, np.float32),
            "ffn_norm": np.ones(cfg.hidden, np.float32), "ffn_sub_norm": np.ones(cfg.ffn, np.float32),
            "attn_q": mat(cfg.hidden, cfg.hidden), "attn_k": mat(kv, cfg.hidden), "attn_v": mat(kv, cfg.hidden),
            "attn_output": mat(cfg.hidden, cfg.hidden), "ffn_gate": mat(cfg.ffn, cfg.hidden),
            "ffn_up": mat(cfg.ffn, cfg.hidden), "ffn_down": mat(cfg.hidden, cfg.ffn),
        })
    return p


def make_forward(cfg: TrainConfig, quantize: bool = True):
    """(forward, loss_fn) in JAX. quantize=False leaves weights and activations as given (to check the
    forward against bitnet_ref's exact profile on already-ternary weights)."""
    import jax
    import jax.numpy as jnp

    hd = cfg.hidden // cfg.heads
    g = cfg.heads // cfg.kv_heads
    half = hd // 2
    inv = cfg.rope_theta ** (-2.0 * np.arange(half) / hd)
    theta = np.arange(cfg.seq)[:, None] * inv[None, :]
    cos, sin = jnp.asarray(np.cos(theta), jnp.float32), jnp.asarray(np.sin(theta), jnp.float32)
    causal = jnp.asarray(np.tril(np.ones((cfg.seq, cfg.seq), bool)))
    sg = jax.lax.stop_gradient

    def wquant(w):
        s = jnp.maximum(jnp.mean(jnp.abs(w)), 1e-5)
        return w + sg(jnp.clip(jnp.round(w / s), -1, 1) * s - w)

    def aquant(x):
        s = 127.0 / jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-5)
        return x + sg(jnp.clip(jnp.round(x * s), -128, 127) / s - x)

    def lin(x, w):
        return aquant(x) @ wquant(w).T if quantize else x @ w.T

    def rms(x, gain):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.rms_eps) * gain

    def rope(x):  # (B, T, H, d), NeoX pairs (i, i + d/2)
        x0, x1 = x[..., :half], x[..., half:]
        t = x.shape[1]
        c, s = cos[None, :t, None, :], sin[None, :t, None, :]
        return jnp.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)

    def forward(params, ids):  # ids (B, T) -> logits (B, T, V)
        b, t = ids.shape
        emb = params["token_embd"]
        emb = emb + sg(emb.astype(jnp.float16).astype(jnp.float32) - emb)
        x = emb[ids]
        for lp in params["layers"]:
            h = rms(x, lp["attn_norm"])
            q = rope(lin(h, lp["attn_q"]).reshape(b, t, cfg.kv_heads, g, hd).reshape(b, t, cfg.heads, hd))
            k = rope(lin(h, lp["attn_k"]).reshape(b, t, cfg.kv_heads, hd))
            v = lin(h, lp["attn_v"]).reshape(b, t, cfg.kv_heads, hd)
            qg = q.reshape(b, t, cfg.kv_heads, g, hd)
            sc = jnp.einsum("btkgd,bskd->bkgts", qg, k) / math.sqrt(hd)
            sc = jnp.where(causal[None, None, None, :t, :t], sc, -1e30)
            w = jax.nn.softmax(sc, axis=-1)
            a = jnp.einsum("bkgts,bskd->btkgd", w, v).reshape(b, t, cfg.hidden)
            x = x + lin(rms(a, lp["attn_sub_norm"]), lp["attn_output"])
            h2 = rms(x, lp["ffn_norm"])
            gate = lin(h2, lp["ffn_gate"])
            act = jax.nn.silu(gate) if cfg.arch == "bitnet" else jnp.square(jax.nn.relu(gate))
            f = act * lin(h2, lp["ffn_up"])
            x = x + lin(rms(f, lp["ffn_sub_norm"]), lp["ffn_down"])
        return rms(x, params["output_norm"]) @ emb.T

    def loss_fn(params, ids):
        logits = forward(params, ids[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.mean(nll)

    return forward, loss_fn


def make_step(cfg: TrainConfig, loss_fn):
    import jax
    import jax.numpy as jnp

    def lr_at(step):
        warm = cfg.lr * (step + 1) / cfg.warmup
        prog = jnp.clip((step - cfg.warmup) / max(1, cfg.steps - cfg.warmup), 0.0, 1.0)
        cosine = cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + jnp.cos(jnp.pi * prog)))
        return jnp.where(step < cfg.warmup, warm, cosine)

    def decays(path_leaf):  # matrices decay, norm gains do not
        return path_leaf.ndim == 2

    @jax.jit
    def step(params, m, v, t, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids)
        gnorm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(grads)))
        scale = jnp.minimum(1.0, cfg.clip / (gnorm + 1e-6))
        lr = lr_at(t)
        b1, b2, eps = 0.9, 0.95, 1e-8

        def upd(p, gr, mm, vv):
            gr = gr * scale
            mm = b1 * mm + (1 - b1) * gr
            vv = b2 * vv + (1 - b2) * gr * gr
            mh = mm / (1 - b1 ** (t + 1))
            vh = vv / (1 - b2 ** (t + 1))
            wd = cfg.weight_decay if decays(p) else 0.0
            return p - lr * (mh / (jnp.sqrt(vh) + eps) + wd * p), mm, vv

        out = jax.tree_util.tree_map(upd, params, grads, m, v)
        treedef = jax.tree_util.tree_structure(params)
        leaves = treedef.flatten_up_to(out)
        new_p = treedef.unflatten([x[0] for x in leaves])
        new_m = treedef.unflatten([x[1] for x in leaves])
        new_v = treedef.unflatten([x[2] for x in leaves])
        return new_p, new_m, new_v, loss, gnorm

    return step


def held_out_windows(ids: np.ndarray, seq: int, bos: int, limit: int | None = None) -> np.ndarray:
    """Non-overlapping windows of seq tokens: BOS, then seq - 1 tokens of the text."""
    n = (len(ids)) // (seq - 1)
    if limit is not None:
        n = min(n, limit)
    w = ids[: n * (seq - 1)].reshape(n, seq - 1)
    return np.concatenate([np.full((n, 1), bos, np.int32), w], axis=1)


class Progress:
    """A one-line progress bar on stderr: step, loss, tokens/s, elapsed and remaining time."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream, self.start = total, stream, time.monotonic()
        self.tty = stream.isatty()

    def update(self, step: int, loss: float, tokens: int, extra: str = "") -> None:
        el = time.monotonic() - self.start
        rate = tokens / el if el > 0 else 0.0
        eta = el / step * (self.total - step) if step else 0.0
        filled = int(30 * step / self.total)
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] {step}/{self.total} loss {loss:.3f} "
                f"{rate:,.0f} tok/s {el / 60:.1f} min, {eta / 60:.1f} min left{extra}")
        if self.tty:
            self.stream.write("\r" + line)
        elif step % 50 == 0 or step == self.total or extra:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")


def write_loss_curve(path: Path, steps, losses, evals) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    w = 20
    smooth = np.convolve(losses, np.ones(w) / w, mode="valid") if len(losses) > w else np.asarray(losses)
    ax.plot(steps[len(steps) - len(smooth):], smooth, label="train (20-step mean)")
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("bitnet-b1.58 trained model: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def train(cfg: TrainConfig, out_dir: Path, command: str, log=print) -> Path:
    import jax
    import jax.numpy as jnp

    t0 = time.monotonic()
    corpus = load_corpus()
    log(f"corpus: {corpus.documents} documents, {len(corpus.train):,} training and {len(corpus.held_out):,} "
        f"held-out characters; sha256 {corpus.sha256[:16]}..., Python {corpus.python}")
    vocab = train_tokenizer(corpus.train, cfg.vocab)
    train_ids = encode(vocab, corpus.train)
    held_ids = encode(vocab, corpus.held_out)
    log(f"tokenizer: {vocab.vocab_size} tokens; {len(train_ids):,} training and {len(held_ids):,} held-out tokens "
        f"({time.monotonic() - t0:.0f} s)")
    forward, loss_fn = make_forward(cfg)
    step_fn = make_step(cfg, loss_fn)
    eval_fn = jax.jit(loss_fn)
    params = jax.tree_util.tree_map(jnp.asarray, init_params(cfg, cfg.seed))
    m = jax.tree_util.tree_map(jnp.zeros_like, params)
    v = jax.tree_util.tree_map(jnp.zeros_like, params)
    rng = np.random.default_rng([cfg.seed, 2])
    held = held_out_windows(held_ids, cfg.seq, vocab.bos_id, limit=cfg.batch * 2)

    def evaluate(p):
        return float(np.mean([float(eval_fn(p, jnp.asarray(held[i:i + cfg.batch])))
                              for i in range(0, len(held), cfg.batch)]))

    bar = Progress(cfg.steps)
    steps, losses, evals = [], [], []
    for s in range(cfg.steps):
        starts = rng.integers(0, len(train_ids) - cfg.seq, cfg.batch)
        batch = np.stack([np.concatenate([[vocab.bos_id], train_ids[i:i + cfg.seq - 1]]) for i in starts])
        params, m, v, loss, _ = step_fn(params, m, v, jnp.asarray(s, jnp.float32), jnp.asarray(batch, jnp.int32))
        loss = float(loss)
        steps.append(s + 1)
        losses.append(loss)
        extra = ""
        if (s + 1) % cfg.eval_every == 0 or s + 1 == cfg.steps:
            evals.append((s + 1, evaluate(params)))
            extra = f", held-out {evals[-1][1]:.3f}"
        bar.update(s + 1, float(np.mean(losses[-20:])), (s + 1) * cfg.batch * (cfg.seq - 1), extra)
    bar.done()
    minutes = (time.monotonic() - t0) / 60
    out_dir.mkdir(parents=True, exist_ok=True)
    write_loss_curve(out_dir / f"trained-{cfg.arch}-loss.png", steps, losses, evals)
    # the wall-clock time goes only into the log: in the file it would make every run's bytes differ
    weights = jax.tree_util.tree_map(np.asarray, params)
    info = {"command": command, "steps": cfg.steps, "seed": cfg.seed, "corpus_sha256": corpus.sha256,
            "python": corpus.python, "jax": jax.__version__, "held_out_loss": evals[-1][1],
            "train_loss": float(np.mean(losses[-50:])), "config": json.dumps(asdict(cfg), sort_keys=True)}
    path = write_model(out_dir / f"trained-{cfg.arch}-i2_s.gguf", "i2_s", cfg.model_config(), vocab,
                       model_tensors(weights), info)
    (out_dir / f"trained-{cfg.arch}-log.json").write_text(json.dumps(
        {**info, "minutes": round(minutes, 1), "loss": [round(x, 4) for x in losses], "held_out": evals},
        indent=1) + "\n")
    log(f"wrote {path} (held-out loss {evals[-1][1]:.3f}, {minutes:.1f} min)")
    return path


# -- quality -------------------------------------------------------------------------------------
WORD_RE = r"[A-Za-z]{2,}"


def unigram_perplexity(train_ids, ids, ctx: int, vocab_size: int) -> float:
    """Perplexity of a unigram model (token frequencies of the training text, add-one smoothed) on the tokens
    llama-perplexity's convention scores in `ids` (the second half of each ctx chunk): the baseline the
    trained model's held-out perplexity is measured against."""
    counts = np.bincount(np.asarray(train_ids), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    first = ctx // 2
    targets = np.concatenate([np.asarray(ids[c * ctx + first + 1:(c + 1) * ctx]) for c in range(len(ids) // ctx)])
    return float(np.exp(-logp[targets].mean()))


def known_word_fraction(text: str, known: set[str]) -> tuple[float, int]:
    """(fraction of the words of `text` (letters only, 2+ long, case-folded) found in `known`, word count)."""
    import regex

    words = [w.lower() for w in regex.findall(WORD_RE, text)]
    if not words:
        return 0.0, 0
    return sum(w in known for w in words) / len(words), len(words)


def training_words(train_text: str) -> set[str]:
    import regex

    return {w.lower() for w in regex.findall(WORD_RE, train_text)}


def longest_run(ids) -> int:
    """The longest run of one token repeated back to back."""
    best = run = 0
    prev = None
    for t in ids:
        run = run + 1 if t == prev else 1
        prev = t
        best = max(best, run)
    return best


# -- writing ---------------------------------------------------------------------------------------
@dataclass
class Tensors:
    """A model as the files store it: embedding (float16), norm gains (float32), ternary projections
    (int8 values and a float16-exact per-tensor scale)."""

    embedding: np.ndarray
    norms: dict[str, np.ndarray]
    ternary: dict[str, tuple[np.ndarray, float]]


def model_tensors(weights: dict) -> Tensors:
    """Trained float32 parameters -> what the files store: the latent weights absmean-quantized (the scale
    rounded to a value float16 holds, so every format stores the same model)."""
    norms = {"output_norm.weight": weights["output_norm"]}
    ternary = {}
    for i, lp in enumerate(weights["layers"]):
        for name, w in lp.items():
            key = f"blk.{i}.{name}.weight"
            if w.ndim == 1:
                norms[key] = np.asarray(w, np.float32)
            else:
                values, scale = absmean_quantize(w)
                ternary[key] = (values, float(np.float16(scale)))
    return Tensors(np.asarray(weights["token_embd"]).astype(np.float16), norms, ternary)


def write_model(path: Path, fmt_name: str, cfg: ModelConfig, vocab: VocabSpec, t: Tensors, info: dict) -> Path:
    """Write the model in format `fmt_name` with the project's writer (the synth models' path)."""
    fmt = get_format(fmt_name)
    specs = []
    for name, shape in cfg.tensor_shapes().items():
        if name == "token_embd.weight":
            emb_fmt = F32 if fmt_name == "f32" else F16
            specs.append(TensorSpec(name, shape, emb_fmt.type_id, emb_fmt.encode(t.embedding.astype(np.float32))))
        elif len(shape) == 1:
            specs.append(TensorSpec(name, shape, F32.type_id, np.asarray(t.norms[name], np.float32)))
        else:
            values, scale = t.ternary[name]
            specs.append(TensorSpec(name, shape, fmt.type_id, fmt.pack(values, scale)))
    metadata = [(k, v, None) for k, v in cfg.metadata().items()]
    metadata += [
        ("general.name", f"bitnet-crossval trained {cfg.arch} {fmt_name}", None),
        ("general.file_type", FILE_TYPE[fmt_name], None),
        ("general.quantization_version", 2, None),
    ]
    metadata += [(f"bitnet_crossval.train.{k}", v, None) for k, v in info.items()]
    if fmt_name == "i2_s":
        metadata.append((I2S_FLAVOUR_KEY, fmt.block, None))
    metadata += vocab.gguf_metadata()
    return write_gguf(path, metadata, specs)


TRAIN_KEYS = ("command", "steps", "seed", "corpus_sha256", "python", "jax", "held_out_loss", "train_loss",
              "minutes", "config")


def read_model(path: str | os.PathLike) -> tuple[ModelConfig, VocabSpec, Tensors, dict]:
    """A trained model file (any format) back into what write_model takes."""
    with open_gguf(path) as gf:
        meta = {k: mv.value for k, mv in gf.metadata.items()}
        cfg = ModelConfig.from_metadata(meta, str(path))
        emb_t = gf.tensor("token_embd.weight")
        emb = format_for(gf, emb_t).decode(gf.tensor_bytes(emb_t), emb_t.shape).astype(np.float16)
        norms, ternary = {}, {}
        for name, shape in cfg.tensor_shapes().items():
            if name == "token_embd.weight":
                continue
            ti = gf.tensor(name)
            fmt = format_for(gf, ti)
            if len(shape) == 1:
                norms[name] = fmt.decode(gf.tensor_bytes(ti), ti.shape).astype(np.float32)
            else:
                if fmt.ternary:
                    tern = fmt.unpack(gf.tensor_bytes(ti), ti.shape)
                    ternary[name] = (tern.values.astype(np.int8), float(np.asarray(tern.scale).reshape(-1)[0]))
                else:  # F32/F16 of a ternary model: every weight is 0 or +-scale
                    w = fmt.decode(gf.tensor_bytes(ti), ti.shape)
                    scale = float(np.abs(w).max())
                    ternary[name] = (np.rint(w / scale if scale else w).astype(np.int8), scale)
        info = {k: meta[f"bitnet_crossval.train.{k}"] for k in TRAIN_KEYS if f"bitnet_crossval.train.{k}" in meta}

        def ids(key):
            v = meta.get(key)
            return None if v is None else int(v)

        vocab = VocabSpec(model=meta["tokenizer.ggml.model"], pre=meta.get("tokenizer.ggml.pre"),
                          tokens=list(meta["tokenizer.ggml.tokens"]),
                          token_type=[int(x) for x in meta["tokenizer.ggml.token_type"]], scores=None,
                          merges=list(meta["tokenizer.ggml.merges"]), bos_id=ids("tokenizer.ggml.bos_token_id"),
                          eos_id=ids("tokenizer.ggml.eos_token_id"), eot_id=ids("tokenizer.ggml.eot_token_id"),
                          add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)))
    return cfg, vocab, Tensors(emb, norms, ternary), info


def derive(fmt_name: str, out: str | os.PathLike, source: str | os.PathLike = SHIPPED) -> Path:
    """The shipped model in format `fmt_name`, written to `out` (a directory or a .gguf path): the same
    ternary values, scales, norms and embedding, so the same bytes training would have written."""
    if fmt_name not in FORMAT_NAMES:
        raise ValueError(f"unknown format {fmt_name!r}; the trained model is written as: {', '.join(FORMAT_NAMES)}")
    out = Path(out)
    cfg, vocab, t, info = read_model(source)
    path = out / f"trained-{cfg.arch}-{fmt_name}.gguf" if out.suffix != ".gguf" else out
    if Path(source).resolve() == path.resolve():
        return path
    return write_model(path, fmt_name, cfg, vocab, t, info)


def derived_path(fmt_name: str, models_dir: str | os.PathLike, source: str | os.PathLike = SHIPPED) -> Path:
    """The shipped model in `fmt_name`, derived once into models_dir (the file name carries the source's
    sha256 prefix, so a new shipped model never reuses a stale derivation)."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: the trained model is missing (it ships in the repository's models/; "
                                f"`nox -s train` writes it again)")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    path = Path(models_dir) / f"{source.stem.removesuffix('-i2_s')}-{fmt_name}-{digest}.gguf"
    return path if path.exists() else derive(fmt_name, path, source)


def training_command(cfg: TrainConfig) -> str:
    """The command that trains `cfg`, recorded in the file: the options that change the model, in a fixed order,
    where they differ from the defaults (not the output directory, so a run elsewhere writes the same bytes)."""
    d = TrainConfig()
    opts = [f"--{k} {getattr(cfg, k)}" for k in ("arch", "steps", "seed", "batch", "layers")
            if getattr(cfg, k) != getattr(d, k)]
    return " ".join(["python -m bitnet_ref.train", *opts])


def model_differences(a: str | os.PathLike, b: str | os.PathLike) -> list[str]:
    """What differs between two GGUF files: metadata keys (with both values) and tensors (name, and whether the
    type, shape or bytes differ); [] when their bytes are the same."""
    if Path(a).read_bytes() == Path(b).read_bytes():
        return []
    out = []
    with open_gguf(a) as ga, open_gguf(b) as gb:
        ma = {k: mv.value for k, mv in ga.metadata.items()}
        mb = {k: mv.value for k, mv in gb.metadata.items()}
        for k in sorted(set(ma) | set(mb)):
            va, vb = ma.get(k, "(absent)"), mb.get(k, "(absent)")
            if repr(va) != repr(vb):  # values may be numpy arrays; their repr shows every element here
                out.append(f"metadata {k}: {_short(va)} vs {_short(vb)}")
        ta, tb = {t.name: t for t in ga.tensors}, {t.name: t for t in gb.tensors}
        for name in sorted(set(ta) | set(tb)):
            if name not in ta or name not in tb:
                out.append(f"tensor {name}: only in {a if name in ta else b}")
            elif (ta[name].type_id, ta[name].shape) != (tb[name].type_id, tb[name].shape):
                out.append(f"tensor {name}: type/shape {ta[name].type_id}/{ta[name].shape} vs "
                           f"{tb[name].type_id}/{tb[name].shape}")
            elif bytes(ga.tensor_bytes(ta[name])) != bytes(gb.tensor_bytes(tb[name])):
                out.append(f"tensor {name}: different bytes")
    return out or ["the same metadata and tensors, laid out differently (padding or order)"]


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bitnet_ref.train", description=__doc__.split("\n\n")[0])
    d = TrainConfig()
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--layers", type=int, default=d.layers)
    ap.add_argument("--arch", default=d.arch, choices=ARCHS, help="bitnet-b1.58 (ReLU^2, default) or bitnet (SiLU)")
    ap.add_argument("-o", "--out", default=str(MODELS_DIR))
    ap.add_argument("--formats", default="", help="also write these formats (comma-separated) beside the I2_S file")
    ap.add_argument("--check", metavar="FILE", help="after training, compare the new file with FILE (e.g. the "
                    "shipped model): exit 0 when the bytes are the same, else list what differs and exit 1")
    a = ap.parse_args(argv)
    cfg = TrainConfig(arch=a.arch, steps=a.steps, seed=a.seed, batch=a.batch, layers=a.layers)
    path = train(cfg, Path(a.out), training_command(cfg))
    for f in filter(None, a.formats.split(",")):
        print(derive(f, Path(a.out), path))
    if a.check:
        diffs = model_differences(path, a.check)
        print(f"{path} and {a.check}: " + ("the same bytes" if not diffs else "differ:\n  " + "\n  ".join(diffs)))
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
