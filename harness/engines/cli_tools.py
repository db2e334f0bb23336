"""An engine over a llama.cpp-family build's command-line tools (bitnet.cpp's fork, or mainline's).

    engine = CliToolsEngine(model, build=find_build())          # or tools={"llama-cli": path, ...}
    g = engine.generate_text("Once upon a time", 16)             # greedy: --temp 0
    g.text, g.ids                                                # ids: see below
    engine.perplexity("some text" or Path("file.txt"), ctx=128)  # llama-perplexity
    engine.kl_divergence_base(text, "base.kld", ctx=128)         # save the reference log-probs
    other.kl_divergence("base.kld", ctx=128)                     # compare another model with them
    engine.bench(pp=512, tg=128)                                 # llama-bench -o json

What a CLI can and cannot give:
- llama-cli prints text, not token ids. `generate_text` is the primary method. Where the tool still
  has `--logdir` (bitnet.cpp's 2024-10 fork does; mainline dropped it) the YAML log it writes carries
  `output_tokens`, and `Generation.ids` holds them; elsewhere `ids` is None. `generate(ids, ...)`,
  `logits` and `detokenize` raise NotSupported: a CLI takes a prompt text, and a text round trip is
  not a token-level comparison. Token-level comparison needs the FFI adapter (libllama through ctypes).
- `tokenize` runs `llama-tokenize --ids` when that tool sits next to llama-cli (NotSupported otherwise).
- `perplexity` takes text (or a text file), not ids: llama-perplexity tokenizes it itself.
- Mainline builds: text completion moved from llama-cli (now a chat) to llama-completion, which is used
  when the build has it (`completion_tool`); its timing lines are `common_perf_print`. Extra arguments
  are per tool name (`extra_args={"llama-completion": [...]}`). A tool that rejects `--logdir` (mainline
  dropped it) is retried once without it (then `ids` is None).

Every call runs the tool in its own process group (a new session), with a per-call timeout; on timeout,
on KeyboardInterrupt or any other exception, the whole group is SIGKILLed and reaped, so no child
outlives its call. A non-zero exit or a signal, output that does not parse, or a model the tool cannot
load raise EngineError carrying the command line and the tail of the tool's output (the tool's own
error lines first).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bitnet_ref import kernels

from .base import (
    Engine,
    EngineError,
    EngineInfo,
    NotSupported,
    Perplexity,
    Receipt,
    ReferenceUnavailable,
    Sampling,
    file_sha256,
)
from .discovery import NativeBuild

TAIL_CHARS = 3000
DEFAULT_TIMEOUT = 300.0
_NUM = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf|[-+]?nan)"


# ----------------------------------------------------------------------------------------------------
# running a tool


@dataclass
class ToolRun:
    command: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes  # empty when the streams were merged into stdout
    seconds: float

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")

    @property
    def merged(self) -> str:
        return self.out + "\n" + self.err


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


def _error_lines(text: str) -> str:
    """The tool's own error messages, so they lead the exception text."""
    pat = re.compile(r"error|failed|unable|cannot|invalid|not enough|you need|abort|exception|terminate", re.I)
    lines = [ln.strip() for ln in text.splitlines() if pat.search(ln)]
    return "\n".join(lines[-8:])


def _tail(text: str, n: int = TAIL_CHARS) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def _describe(cmd: list[str]) -> str:
    return shlex.join(cmd)


def _line_buffered(cmd: list[str]) -> list[str]:
    """`cmd` under coreutils' stdbuf, line-buffered: mainline's tools log from a thread whose buffered
    output into a file is lost when they exit (an unloadable model then leaves no error text at all)."""
    stdbuf = shutil.which("stdbuf")
    return [stdbuf, "-oL", "-eL", *cmd] if stdbuf else cmd


def run_tool(cmd: list[str], timeout: float, merge: bool = False, cwd: str | None = None,
             env: dict | None = None) -> ToolRun:
    """Run `cmd` in its own process group with stdin closed; kill the group on timeout or interruption.

    Output goes to temporary files (not pipes), so a grandchild that keeps a descriptor open cannot
    block us. Returns the run whatever the exit status; `check_run` turns failures into EngineError."""
    with tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        t = time.perf_counter()
        try:
            proc = subprocess.Popen(_line_buffered(cmd), stdin=subprocess.DEVNULL, stdout=fout,
                                    stderr=subprocess.STDOUT if merge else ferr,
                                    start_new_session=True, cwd=cwd, env=env)
        except OSError as e:
            raise EngineError(f"cannot start {_describe(cmd)}: {e}") from e
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            fout.seek(0)
            ferr.seek(0)
            text = fout.read().decode("utf-8", "replace") + ferr.read().decode("utf-8", "replace")
            raise EngineError(f"timed out after {timeout:g} s (process group {proc.pid} killed): "
                              f"{_describe(cmd)}\n--- output tail ---\n{_tail(text)}") from None
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            # the leader exited: anything it left in its group goes too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        seconds = time.perf_counter() - t
        fout.seek(0)
        ferr.seek(0)
        return ToolRun(cmd, proc.returncode, fout.read(), ferr.read(), seconds)


def check_run(run: ToolRun) -> ToolRun:
    if run.returncode == 0:
        return run
    text = run.merged
    if run.returncode < 0:
        try:
            how = f"killed by signal {signal.Signals(-run.returncode).name}"
        except ValueError:
            how = f"killed by signal {-run.returncode}"
    else:
        how = f"exited with status {run.returncode}"
    own = _error_lines(text)
    raise EngineError(f"{Path(run.command[0]).name} {how}: {_describe(run.command)}\n"
                      + (f"--- its error lines ---\n{own}\n" if own else "")
                      + f"--- output tail ---\n{_tail(text)}")


def _unparsed(run: ToolRun, what: str, text: str | None = None) -> EngineError:
    text = run.merged if text is None else text
    own = _error_lines(text)
    return EngineError(f"could not parse {what} from the output of {_describe(run.command)}\n"
                       + (f"--- its error lines ---\n{own}\n" if own else "")
                       + f"--- unparsed output tail ---\n{_tail(text)}")


# ----------------------------------------------------------------------------------------------------
# parsers (pure functions: tested on recorded and fake output)

_PERF = re.compile(
    r"(?:llama_perf_context_print|llama_print_timings|common_perf_print):"
    + r"\s*(load|prompt eval|eval|total) time\s*=\s*" + _NUM
    + r"\s*ms(?:\s*/\s*(\d+)\s*(tokens|runs)(?:\s*\(\s*" + _NUM + r"\s*ms per token,\s*" + _NUM
    + r"\s*tokens per second\))?)?")
_SAMPLER = re.compile(r"(?:llama_perf_sampler_print|common_perf_print):\s*sampling time\s*=\s*" + _NUM
                      + r"\s*ms(?:\s*/\s*(\d+)\s*runs)?")


def parse_timings(stderr: str) -> dict[str, float]:
    """The tool's own llama_perf_context_print lines as numbers, keyed e.g. load_ms, prompt_eval_ms,
    prompt_eval_tokens, prompt_eval_ms_per_token, prompt_eval_tokens_per_second, eval_ms, eval_runs,
    eval_ms_per_token, eval_tokens_per_second, total_ms, total_tokens (and sampling_ms, sampling_runs).
    The last occurrence of a line wins. Empty dict when none is present."""
    out: dict[str, float] = {}
    for m in _PERF.finditer(stderr):
        key = m.group(1).replace(" ", "_")
        out[f"{key}_ms"] = float(m.group(2))
        if m.group(3) is not None:
            out[f"{key}_{m.group(4)}"] = float(m.group(3))
        if m.group(5) is not None:
            out[f"{key}_ms_per_token"] = float(m.group(5))
            out[f"{key}_tokens_per_second"] = float(m.group(6))
    for m in _SAMPLER.finditer(stderr):
        out["sampling_ms"] = float(m.group(1))
        if m.group(2) is not None:
            out["sampling_runs"] = float(m.group(2))
    return out


_CHUNK = re.compile(r"\[(\d+)\]" + _NUM + ",")
_FINAL = re.compile(r"Final estimate: PPL = " + _NUM + r" \+/- " + _NUM)
_NCHUNK = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")


@dataclass
class CliPerplexity(Perplexity):
    uncertainty: float = math.nan  # the tool's "+/-"
    n_chunks: int = 0


def parse_perplexity(text: str, ctx: int) -> CliPerplexity | None:
    """llama-perplexity's merged output -> per-chunk running PPL and the final estimate (None if absent).

    The tool scores tokens first..n_ctx-2 of each chunk (first = n_ctx/2): n_ctx - 1 - n_ctx/2 per chunk."""
    final = _FINAL.search(text)
    if final is None:
        return None
    chunks: dict[int, float] = {}
    for m in _CHUNK.finditer(text):
        chunks[int(m.group(1))] = float(m.group(2))
    per_chunk = [chunks[i] for i in sorted(chunks)]
    n = _NCHUNK.search(text)
    n_chunks = int(n.group(1)) if n else len(per_chunk)
    if n:
        ctx = int(n.group(2)) if int(n.group(2)) else ctx
    ppl = float(final.group(1))
    per = ctx - 1 - ctx // 2
    return CliPerplexity(ppl=ppl, nll=math.log(ppl) if ppl > 0 else math.nan, n_scored=n_chunks * per,
                         convention="llama-perplexity", ctx=ctx, per_chunk=per_chunk,
                         uncertainty=float(final.group(2)), n_chunks=n_chunks)


@dataclass
class KLDivergence:
    """llama-perplexity --kl-divergence statistics. KLD in nats; every Δp and "same top p" value in
    percent, as the tool prints them. kld/dp: the percentile lines keyed "max", "99.9", "99.0", "95.0",
    ..., "median", ..., "min"."""

    mean_kld: float
    mean_kld_unc: float
    kld: dict[str, float]
    mean_dp: float
    mean_dp_unc: float
    dp: dict[str, float]
    rms_dp: float
    rms_dp_unc: float
    same_top_p: float
    same_top_p_unc: float
    ppl_q: float | None = None
    ppl_base: float | None = None
    chunks: list[dict[str, float]] = field(default_factory=list)


_PM = r"\s*(?:±|\+/-)\s*"
_KLD_MEAN = re.compile(r"Mean\s+KLD:\s*" + _NUM + _PM + _NUM)
_KLD_PCT = re.compile(r"^\s*(Maximum|Minimum|Median|\d+(?:\.\d+)?%)\s+KLD:\s*" + _NUM, re.M)
_DP_MEAN = re.compile(r"Mean\s+Δp:\s*" + _NUM + _PM + _NUM + r"\s*%")
_DP_PCT = re.compile(r"^\s*(Maximum|Minimum|Median|\d+(?:\.\d+)?%)\s+Δp:\s*" + _NUM + r"%", re.M)
_RMS = re.compile(r"RMS Δp\s*:\s*" + _NUM + _PM + _NUM + r"\s*%")
_SAME = re.compile(r"Same top p:\s*" + _NUM + _PM + _NUM + r"\s*%")
_PPLQ = re.compile(r"Mean PPL\(Q\)\s*:\s*" + _NUM)
_PPLB = re.compile(r"Mean PPL\(base\)\s*:\s*" + _NUM)
_KCHUNK = re.compile(r"^\s*(\d+)" + (r"\s+" + _NUM + _PM + _NUM) * 3 + (r"\s+" + _NUM + _PM + _NUM + r"\s*%") * 2
                     + r"\s*$", re.M)


def _pct_key(label: str) -> str:
    return {"Maximum": "max", "Minimum": "min", "Median": "median"}.get(label, label.rstrip("%"))


def parse_kl_divergence(text: str) -> KLDivergence | None:
    mean, rms, same, dpm = _KLD_MEAN.search(text), _RMS.search(text), _SAME.search(text), _DP_MEAN.search(text)
    if not (mean and rms and same and dpm):
        return None
    kld = {_pct_key(m.group(1)): float(m.group(2)) for m in _KLD_PCT.finditer(text)}
    dp = {_pct_key(m.group(1)): float(m.group(2)) for m in _DP_PCT.finditer(text)}
    chunks = [dict(chunk=int(m.group(1)), ppl=float(m.group(2)), ln_ppl_ratio=float(m.group(4)),
                   kld=float(m.group(6)), rms_dp=float(m.group(8)), same_top_p=float(m.group(10)))
              for m in _KCHUNK.finditer(text)]
    q, b = _PPLQ.search(text), _PPLB.search(text)
    return KLDivergence(mean_kld=float(mean.group(1)), mean_kld_unc=float(mean.group(2)), kld=kld,
                        mean_dp=float(dpm.group(1)), mean_dp_unc=float(dpm.group(2)), dp=dp,
                        rms_dp=float(rms.group(1)), rms_dp_unc=float(rms.group(2)),
                        same_top_p=float(same.group(1)), same_top_p_unc=float(same.group(2)),
                        ppl_q=float(q.group(1)) if q else None, ppl_base=float(b.group(1)) if b else None,
                        chunks=chunks)


@dataclass
class BenchResult:
    test: str  # "pp512", "tg128" (or "pp512+tg128" where both are non-zero)
    n_prompt: int
    n_gen: int
    avg_ts: float
    stddev_ts: float
    avg_ns: float | None
    threads: int | None
    model_type: str | None
    raw: dict = field(repr=False, default_factory=dict)


def parse_bench_json(text: str) -> list[BenchResult]:
    """llama-bench -o json: a JSON list of test objects. Raises ValueError when it is not that."""
    start = text.find("[")
    if start < 0:
        raise ValueError("no JSON list in the output")
    data, _ = json.JSONDecoder().raw_decode(text[start:])
    if not isinstance(data, list) or not data:
        raise ValueError("the JSON is not a non-empty list")
    out = []
    for d in data:
        n_prompt, n_gen = int(d["n_prompt"]), int(d["n_gen"])
        test = "+".join(s for s in ((f"pp{n_prompt}" if n_prompt else ""), (f"tg{n_gen}" if n_gen else "")) if s)
        out.append(BenchResult(test=test, n_prompt=n_prompt, n_gen=n_gen, avg_ts=float(d["avg_ts"]),
                               stddev_ts=float(d["stddev_ts"]), avg_ns=float(d["avg_ns"]) if "avg_ns" in d else None,
                               threads=d.get("n_threads"), model_type=d.get("model_type"), raw=d))
    return out


_YAML_TOKENS = re.compile(r"^output_tokens:\s*\[([^\]]*)\]", re.M)
_VERSION = re.compile(r"^(?:version|build):\s*(.+?)\s*$", re.M)


def parse_logdir_tokens(text: str) -> list[int] | None:
    m = _YAML_TOKENS.search(text)
    if m is None:
        return [] if re.search(r"^output_tokens:\s*$", text, re.M) else None
    return [int(x) for x in m.group(1).split(",") if x.strip()]


def clean_cli_stdout(out: str, prompt: str | None = None) -> tuple[str, bool]:
    """Generated text from llama-cli's stdout (run with --no-display-prompt): drop the trailing blank
    lines it prints at exit and its " [end of text]" marker. Returns (text, ended_by_eog)."""
    if out.endswith("\n\n"):
        out = out[:-2]
    eog = out.endswith(" [end of text]\n")
    if eog:
        out = out[: -len(" [end of text]\n")]
    if prompt is not None and out.startswith(prompt):  # a tool that echoed anyway
        out = out[len(prompt):]
    return out, eog


# ----------------------------------------------------------------------------------------------------
# the engine


@dataclass
class Generation:
    text: str
    ids: list[int] | None  # from llama-cli's --logdir YAML where the tool has it; else None
    ended: bool  # an end-of-generation token stopped it before n
    timings: dict[str, float]  # the tool's own (parse_timings)
    command: list[str]


GREEDY = Sampling()
BITNET_ARCHS = ("bitnet", "bitnet-b1.58", "bitnet-25", "llama")
BITNET_FORMATS = ("f32", "f16", "q8_0", "tq1_0", "tq2_0", "i2_s", "tl1", "tl2")


class CliToolsEngine(Engine):
    def __init__(self, model: str | os.PathLike, build: NativeBuild | None = None, *,
                 tools: dict[str, str | os.PathLike] | None = None, threads: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT, name: str = "bitnet.cpp",
                 extra_args: dict[str, list[str]] | None = None,
                 archs: tuple[str, ...] = BITNET_ARCHS, formats: tuple[str, ...] = BITNET_FORMATS):
        if build is None and not tools:
            raise EngineError("CliToolsEngine needs a NativeBuild or explicit tool paths")
        self.model = Path(model)
        if not self.model.is_file():
            raise EngineError(f"model file {self.model} does not exist")
        self.build = build
        self._tools = {k: Path(v) for k, v in (tools or {}).items()}
        self.threads = threads or kernels.threads()
        self.timeout = timeout
        self.name = name
        self.extra_args = {k: list(v) for k, v in (extra_args or {}).items()}  # per tool name
        self._archs, self._formats = archs, formats
        self._logdir_ok = True
        self.completion_tool = "llama-completion" if self.has_tool("llama-completion") else "llama-cli"
        self.last_run: ToolRun | None = None
        self.last_timings: dict[str, float] = {}
        self.receipt = Receipt(engine=name, version="unknown", model=str(self.model.resolve()),
                               model_sha256=file_sha256(self.model), threads=self.threads, device="cpu")
        self.receipt.version = self._probe_version()

    # -- tools ---------------------------------------------------------------------------------------
    def tool(self, name: str) -> Path:
        if name in self._tools:
            return self._tools[name]
        if self.build is not None:
            if name in self.build.tools:
                return self.build.tools[name]
            p = self.build.root / "bin" / name  # tools discovery does not list (llama-tokenize)
            if p.is_file() and os.access(p, os.X_OK):
                return p
            try:
                return self.build.tool(name)
            except ReferenceUnavailable as e:
                raise NotSupported(str(e)) from None
        raise NotSupported(f"{self.name}: no {name} was given (tools={sorted(self._tools)})")

    def has_tool(self, name: str) -> bool:
        try:
            self.tool(name)
            return True
        except NotSupported:
            return False

    def _probe_version(self) -> str:
        for t in (self.completion_tool, "llama-perplexity", "llama-bench"):
            if self.has_tool(t):
                run = check_run(run_tool([str(self.tool(t)), "--version"], timeout=min(self.timeout, 60.0), merge=True))
                m = _VERSION.search(run.out)
                return m.group(1) if m else "unknown"
        return "unknown"

    def _run(self, operation: str, tool: str, args: list[str], merge: bool = False,
             timeout: float | None = None) -> ToolRun:
        path = self.tool(tool)
        cmd = [str(path), *args, *self.extra_args.get(tool, [])]
        self.receipt.command = cmd
        self.receipt.artifact = str(path.resolve())
        self.receipt.artifact_sha256 = file_sha256(path)
        with self.timed(operation):
            run = run_tool(cmd, timeout=self.timeout if timeout is None else timeout, merge=merge)
        self.last_run = run
        check_run(run)
        self.last_timings = parse_timings(run.merged)
        for k in ("load_ms", "prompt_eval_ms", "eval_ms", "total_ms"):
            if k in self.last_timings and math.isfinite(self.last_timings[k]):
                key = f"{operation}.tool_{k[:-3]}"
                self.receipt.timings[key] = self.receipt.timings.get(key, 0.0) + self.last_timings[k] / 1000.0
        return run

    # -- Engine --------------------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        ops = ["generate_text", "perplexity", "kl_divergence", "bench"]
        if self.has_tool("llama-tokenize"):
            ops.insert(0, "tokenize")
        return EngineInfo(name=self.name, version=self.receipt.version, archs=self._archs, formats=self._formats,
                          operations=tuple(ops))

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        args = ["-m", str(self.model), "-p", text, "--ids", "--log-disable"] + ([] if add_bos else ["--no-bos"])
        run = self._run("tokenize", "llama-tokenize", args)
        m = re.search(r"\[([\d,\s]*)\]\s*$", run.out)
        if m is None:
            raise _unparsed(run, "token ids")
        return [int(x) for x in m.group(1).split(",") if x.strip()]

    def detokenize(self, ids: list[int]) -> str:
        raise NotSupported(f"{self.name} CLI tools cannot detokenize ids: use the FFI adapter")

    def logits(self, ids: list[int]):
        raise NotSupported(f"{self.name} CLI tools do not print logits: use the FFI adapter")

    def generate(self, ids: list[int], n: int, sampling: Sampling = GREEDY) -> list[int]:
        raise NotSupported("llama-cli takes a prompt text, not token ids: use generate_text(prompt, n), or the FFI "
                           "adapter for token-level comparison")

    def generate_text(self, prompt: str, n: int, sampling: Sampling = GREEDY, ctx: int | None = None,
                      timeout: float | None = None) -> Generation:
        """llama-cli on `prompt` (BOS added by the tool), n new tokens; greedy unless sampling says otherwise."""
        if sampling.temperature > 0:
            samp = ["--temp", repr(sampling.temperature), "--top-k", str(sampling.top_k),
                    "--top-p", repr(sampling.top_p)]
        else:
            samp = ["--temp", "0"]
        args = ["-m", str(self.model), "-p", prompt, "-n", str(n), "-t", str(self.threads), *samp,
                "--seed", str(0 if sampling.seed is None else sampling.seed), "--no-display-prompt"]
        if ctx:
            args += ["-c", str(ctx)]
        with tempfile.TemporaryDirectory(prefix="cli-tools-") as d:
            use_logdir = self._logdir_ok
            try:
                run = self._run("generate", self.completion_tool,
                                args + (["--logdir", d + "/"] if use_logdir else []), timeout=timeout)
            except EngineError as e:
                if not (use_logdir and "--logdir" in str(e) and "invalid argument" in str(e)):
                    raise
                self._logdir_ok = False  # a mainline build without --logdir
                run = self._run("generate", self.completion_tool, args, timeout=timeout)
            ids = None
            if use_logdir and self._logdir_ok:
                logs = sorted(Path(d).glob("*.yml"))
                if logs:
                    ids = parse_logdir_tokens(logs[-1].read_text(errors="replace"))
        text, ended = clean_cli_stdout(run.out)
        if not any(k in run.err for k in ("llama_perf_context_print", "llama_print_timings", "common_perf_print")):
            raise _unparsed(run, f"{self.completion_tool}'s timing lines (did it generate?)", run.err)
        return Generation(text=text, ids=ids, ended=ended, timings=dict(self.last_timings), command=run.command)

    def _text_file(self, source: str | os.PathLike, d: str) -> Path:
        if isinstance(source, Path):
            return source
        p = Path(d) / "input.txt"
        p.write_text(str(source), encoding="utf-8")
        return p

    def perplexity(self, source, ctx: int, convention: str = "llama-perplexity", batch: int | None = None,
                   timeout: float | None = None) -> CliPerplexity:
        """llama-perplexity on a text (str) or a text file (Path). Ids are not accepted (NotSupported)."""
        if isinstance(source, (list, tuple)):
            raise NotSupported("llama-perplexity tokenizes text itself: pass the text, not ids")
        if convention != "llama-perplexity":
            raise NotSupported(f"llama-perplexity computes only the llama-perplexity convention, not {convention}")
        with tempfile.TemporaryDirectory(prefix="cli-tools-") as d:
            args = ["-m", str(self.model), "-f", str(self._text_file(source, d)), "-c", str(ctx),
                    "-t", str(self.threads)] + (["-b", str(batch)] if batch else [])
            return self._ppl_run("perplexity", args, ctx, timeout)

    def _ppl_run(self, operation: str, args: list[str], ctx: int, timeout) -> CliPerplexity:
        run = self._run(operation, "llama-perplexity", args, merge=True, timeout=timeout)
        result = parse_perplexity(run.out, ctx)
        if result is None:
            raise _unparsed(run, "'Final estimate: PPL = x +/- y'")
        return result

    def kl_divergence_base(self, source, path: str | os.PathLike, ctx: int, timeout: float | None = None
                           ) -> CliPerplexity:
        """Save this model's log-probs of `source` (text or Path) to `path` (--kl-divergence-base), for a
        later kl_divergence by another model. Returns this run's perplexity."""
        with tempfile.TemporaryDirectory(prefix="cli-tools-") as d:
            args = ["-m", str(self.model), "-f", str(self._text_file(source, d)), "-c", str(ctx),
                    "-t", str(self.threads), "--kl-divergence-base", str(path)]
            result = self._ppl_run("kl_divergence_base", args, ctx, timeout)
        if not Path(path).is_file():
            raise EngineError(f"llama-perplexity did not write {path}: {_describe(self.last_run.command)}")
        return result

    def kl_divergence(self, base_path: str | os.PathLike, ctx: int, text=None, timeout: float | None = None
                      ) -> KLDivergence:
        """This model against the log-probs saved in `base_path` (the tokens come from that file; `text`
        is accepted for symmetry and ignored). The tool prints the statistics only from 100 scored
        tokens on: with ctx c, each chunk scores c - 1 - c/2 tokens."""
        args = ["-m", str(self.model), "-c", str(ctx), "-t", str(self.threads),
                "--kl-divergence-base", str(base_path), "--kl-divergence"]
        run = self._run("kl_divergence", "llama-perplexity", args, merge=True, timeout=timeout)
        result = parse_kl_divergence(run.out)
        if result is None:
            raise _unparsed(run, "KL-divergence statistics (Mean KLD, Δp, RMS Δp, Same top p; printed only from "
                            "100 scored tokens on)")
        return result

    def bench(self, pp: int = 512, tg: int = 128, repetitions: int | None = None,
              timeout: float | None = None) -> list[BenchResult]:
        args = ["-m", str(self.model), "-p", str(pp), "-n", str(tg), "-t", str(self.threads), "-o", "json"]
        if repetitions:
            args += ["-r", str(repetitions)]
        run = self._run("bench", "llama-bench", args, timeout=timeout)
        try:
            return parse_bench_json(run.out)
        except (ValueError, KeyError, TypeError) as e:
            raise _unparsed(run, f"llama-bench JSON ({e})") from None
