"""`bitnet-xval download-model`: fetch a model from the Hugging Face Hub, verified against models.lock."""

from __future__ import annotations

import argparse
import sys

HELP = "download a model from the Hugging Face Hub, verified against a lock file"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "download-model",
        help=HELP,
        description=(
            "Download one file of a Hugging Face Hub repo with huggingface_hub and verify it: against its "
            "entry in the lock file when there is one (size, sha256, and the locked commit is what gets "
            "downloaded), else against the hub's checksum, after which an entry is recorded. Honours "
            "HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_CACHE / HF_HOME and BITNET_MODELS_DIR. Prints the path "
            "(e.g. for BITNET_GGUF) and the lock entry. Exit status: 0 ok, 1 verification or validation "
            "failed, 2 any other error."
        ),
    )
    p.add_argument("--id", required=True, dest="repo_id", metavar="REPO", help="the repo, e.g. org/name")
    p.add_argument(
        "--revision", metavar="R", help="branch, tag or commit (default: the locked one, else main)"
    )
    p.add_argument("--file", metavar="F", help="the file in the repo (default: the repo's only .gguf file)")
    p.add_argument("--validate", action="store_true", help="also validate the GGUF file")
    p.add_argument("--lock", default="models.lock", metavar="PATH", help="lock file (default: %(default)s)")
    p.add_argument(
        "--models-dir",
        metavar="DIR",
        help="where models are kept, hub cache layout (default: BITNET_MODELS_DIR, else the hub cache)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from bitnet_ref.errors import ModelError
    from bitnet_ref.hub import VERIFICATION_CODES, download

    try:
        result = download(
            args.repo_id,
            filename=args.file,
            revision=args.revision,
            models_dir=args.models_dir,
            lock_path=args.lock,
            validate=args.validate,
        )
    except ModelError as e:
        print(f"bitnet-xval download-model: {e}", file=sys.stderr)
        return 1 if e.code in VERIFICATION_CODES else 2
    except Exception as e:  # noqa: BLE001 - anything unforeseen: one line, no traceback
        print(f"bitnet-xval download-model: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(result.path)
    print(result.entry.to_toml(), end="")
    state = "recorded in" if result.recorded else ("verified against" if result.lock_path else "not locked:")
    print(f"# {state} {result.lock_path or '--lock not used'}")
    for finding in result.findings:
        print(f"# {finding}")
    return 0
