"""The `slimgpt` command. Subcommands import their heavy modules only when they run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimgpt", description="SlimGPT pruning service")
    sub = parser.add_subparsers(dest="command", required=True)
    from slimgpt_core.cli_args import add_prune_parser

    add_prune_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
