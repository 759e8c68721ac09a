"""`safevlm`: one command line, each subcommand a thin wrapper over an importable function."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from runtime import logs

# Subcommand modules under safevlm.commands, each with register(subparsers).
COMMANDS = ["guard", "run", "study", "world", "eval", "report", "train", "classifier"]
BAD_INPUT = 2          # exit status of an error the user can fix (config, data, adapter, path, disk)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safevlm", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"safevlm.commands.{name}").register(subparsers)
    return parser


def error_line(exc: BaseException) -> str:
    """One line naming what is wrong: the message of our own errors, `PATH: reason` for the OS's."""
    from safety_modules.fileio import describe_os_error

    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        text = f"{where}: {describe_os_error(exc)}" if where else describe_os_error(exc)
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure()
    prefix = f"safevlm {args.command}"
    with warnings.catch_warnings():
        # Warnings meant for the user (e.g. an adapter on a base with other weights) as one line each.
        warnings.showwarning = lambda message, *rest: print(f"{prefix}: warning: {message}", file=sys.stderr)
        try:
            return int(args.func(args) or 0)
        except (ValueError, OSError) as exc:
            # Bad input (config, data, adapter, image, path, a full disk): one clear line, no traceback.
            print(f"{prefix}: error: {error_line(exc)}", file=sys.stderr)
            return BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
