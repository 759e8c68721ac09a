"""`safevlm`: one command line, each subcommand a thin wrapper over an importable function."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules under safevlm.commands, each with register(subparsers).
COMMANDS = ["guard", "run", "study", "world", "eval", "report", "train", "sft", "dpo", "ppo", "classifier"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safevlm", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"safevlm.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        # Bad input (config, data, adapter, image): one clear line, no traceback.
        print(f"safevlm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
