"""A fake llama.cpp tool that prints well-formed output in the formats of bitnet.cpp's fork (printf
formats copied from the tools' documented output), so the parsers run in every CI run.

Dispatch on the arguments: --version, -o json (llama-bench), --kl-divergence, --kl-divergence-base,
-f (llama-perplexity), --ids (llama-tokenize), else llama-cli."""

import os
import sys

args = sys.argv[1:]
err = sys.stderr


def arg(name, default=None):
    return args[args.index(name) + 1] if name in args else default


def perf(prompt_tokens, runs):
    err.write("llama_perf_sampler_print:    sampling time =       0.15 ms /    10 runs   "
              "(    0.01 ms per token, 68027.21 tokens per second)\n")
    err.write("llama_perf_context_print:        load time = %10.2f ms\n" % 123.45)
    err.write("llama_perf_context_print: prompt eval time = %10.2f ms / %5d tokens (%8.2f ms per token, %8.2f tokens "
              "per second)\n" % (151.79, prompt_tokens, 75.90, 13.18))
    err.write("llama_perf_context_print:        eval time = %10.2f ms / %5d runs   (%8.2f ms per token, %8.2f tokens "
              "per second)\n" % (633.89, runs, 90.56, 11.04))
    err.write("llama_perf_context_print:       total time = %10.2f ms / %5d tokens\n" % (797.80, prompt_tokens + runs))


if "--version" in args:
    err.write("version: 42 (fakecommit)\nbuilt with fake cc\n")
elif "-o" in args and arg("-o") == "json":
    p, n = int(arg("-p", 512)), int(arg("-n", 128))
    rows = []
    for n_prompt, n_gen, ts in ((p, 0, 53.12), (0, n, 12.5)):
        rows.append('  {\n    "build_commit": "fake",\n    "model_type": "bitnet 1B I2_S - 2 bpw ternary",\n'
                    f'    "n_threads": {arg("-t", 2)},\n    "n_prompt": {n_prompt},\n    "n_gen": {n_gen},\n'
                    f'    "avg_ns": 1000,\n    "stddev_ns": 0,\n    "avg_ts": {ts:.6f},\n'
                    '    "stddev_ts": 0.670000,\n    "samples_ts": [ 1 ]\n  }')
    sys.stdout.write("[\n" + ",\n".join(rows) + "\n]\n")
elif "--kl-divergence" in args:
    out = sys.stdout
    out.write("\nchunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS"
              "            Same top p\n")
    for i in range(2):
        out.write("%4d" % (i + 1) + "    %9.4f ± %9.4f" % (12.5 + i, 0.25) + "    %10.5f ± %10.5f" % (0.001, 0.0002)
                  + "    %10.5f ± %10.5f" % (0.0123, 0.001) + "    %6.3f ± %6.3f %%" % (1.5, 0.1)
                  + "    %6.3f ± %6.3f %%" % (97.5, 0.5) + "\n")
    out.write("\n====== Perplexity statistics ======\n")
    out.write("Mean PPL(Q)                   : %10.6f ± %10.6f\n" % (13.5, 0.3))
    out.write("Mean PPL(base)                : %10.6f ± %10.6f\n" % (13.4, 0.3))
    out.write("\n====== KL divergence statistics ======\n")
    out.write("Mean    KLD: %10.6f ± %10.6f\n" % (0.0123, 0.001))
    for label, v in (("Maximum", 0.5), ("99.9%", 0.4), ("99.0%", 0.3), ("99.0%", 0.3), ("Median ", 0.01),
                     ("10.0%", 0.001), (" 5.0%", 0.0005), (" 1.0%", 0.0001), ("Minimum", -0.00002)):
        out.write("%s%s KLD: %10.6f\n" % (label, " " * (7 - len(label)), v))
    out.write("\n====== Token probability statistics ======\n")
    out.write("Mean    Δp: %6.3f ± %5.3f %%\n" % (-0.05, 0.01))
    for label, v in (("Maximum", 5.0), ("99.9%", 4.0), ("99.0%", 3.0), ("95.0%", 2.0), ("90.0%", 1.0),
                     ("75.0%", 0.5), ("Median ", 0.0), ("25.0%", -0.5), ("10.0%", -1.0), (" 5.0%", -2.0),
                     (" 1.0%", -3.0), (" 0.1%", -4.0), ("Minimum", -6.0)):
        out.write("%s%s Δp: %6.3f%%\n" % (label, " " * (7 - len(label)), v))
    out.write("RMS Δp    : %6.3f ± %5.3f %%\n" % (1.234, 0.05))
    out.write("Same top p: %6.3f ± %5.3f %%\n" % (97.5, 0.4))
    perf(256, 1)
elif "-f" in args:
    if "--kl-divergence-base" in args:
        with open(arg("--kl-divergence-base"), "wb") as f:
            f.write(b"_logits_fake")
    ctx = int(arg("-c", 128))
    err.write("perplexity: calculating perplexity over 3 chunks, n_ctx=%d, batch_size=%d, n_seq=1\n" % (ctx, ctx))
    err.write("perplexity: 5.36 seconds per pass - ETA ")
    err.flush()
    sys.stdout.write("0.35 minutes\n[1]%.4f,[2]%.4f,[3]%.4f,\n" % (10.5, 11.25, 12.0))
    sys.stdout.flush()
    err.write("Final estimate: PPL = %.4f +/- %.5f\n" % (12.0, 0.34567))
    perf(3 * ctx, 1)
elif "--ids" in args:
    sys.stdout.write("[1, 15043, 3186]\n")
else:  # llama-cli
    n = int(arg("-n", 8))
    logdir = arg("--logdir")
    if logdir:
        os.makedirs(logdir, exist_ok=True)
        with open(os.path.join(logdir, "2026-01-01T000000.yml"), "w") as f:
            f.write("binary: main\nprompt_tokens:\noutput: |-\n  fake\noutput_tokens: [%s]\n"
                    % ", ".join(str(100 + i) for i in range(n)))
    sys.stdout.write(" fake generated text" + "\n\n")
    perf(4, n - 1)
