"""`bitnet-xval synth`: write a synthetic BitNet b1.58 model (same arguments, byte-identical file)."""

from __future__ import annotations

import sys

from bitnet_ref.errors import FormatError


def add_parser(sub) -> None:
    from bitnet_ref.synth import ARCHS, FORMAT_NAMES, PRESETS, TOKENIZERS

    p = sub.add_parser("synth", help="write a synthetic model", description=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--arch", choices=ARCHS, default="bitnet")
    p.add_argument("--format", choices=FORMAT_NAMES, default="tq2_0")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default=None,
                   help="default: llama3 for 2b-4t, tiny otherwise")
    p.add_argument("--layers", type=int, default=None, help="default: the preset's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", default=".", help="a directory (file named from the spec) or a .gguf path")
    p.set_defaults(func=run)


def run(args) -> int:
    from bitnet_ref.synth import SynthSpec, synthesize

    spec = SynthSpec(preset=args.preset, arch=args.arch, format=args.format, tokenizer=args.tokenizer,
                     layers=args.layers, seed=args.seed)
    try:
        path = synthesize(spec, args.out)
    except (FormatError, ValueError) as e:
        print(f"synth: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
