"""`safevlm report --runs DIR... --out DIR`: several evaluation runs side by side, one table and one figure."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="put several eval runs side by side (table + figure)")
    p.add_argument("--runs", nargs="+", required=True, metavar="DIR",
                   help="run folders, each with results.json or one subfolder per benchmark holding one")
    p.add_argument("--names", nargs="+", metavar="NAME", help="column names (default: the folder names)")
    p.add_argument("--out", required=True, help="where summary.md/.csv/.json/.png go")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eval.report import compare_runs

    paths = compare_runs(args.runs, args.out, names=args.names)
    print(f"report: {len(args.runs)} runs -> {paths['markdown']}, {paths['figure']}")
    return 0
