"""`safevlm report`: several evaluation runs side by side, or a sample of answers for a person to audit.

    safevlm report --runs DIR... --out DIR                 one table and one figure over the runs
    safevlm report audit RUN_DIR --per-method 50 --out audit.csv [--seed 0]
"""

from __future__ import annotations

import argparse

from runtime.layout import COMPARISON_CSV_FILE, COMPARISON_FIGURE_FILE, COMPARISON_JSON_FILE, COMPARISON_MARKDOWN_FILE


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="put several eval runs side by side (table + figure), or export "
                                             "answers to audit (report audit)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", metavar="DIR",
                   help="run folders, each with results.json or one subfolder per benchmark holding one")
    p.add_argument("--names", nargs="+", metavar="NAME", help="column names (default: the folder names)")
    p.add_argument("--out", help=f"where {COMPARISON_MARKDOWN_FILE}, {COMPARISON_CSV_FILE}, {COMPARISON_JSON_FILE} and "
                                 f"{COMPARISON_FIGURE_FILE} go")
    p.set_defaults(func=run)
    actions = p.add_subparsers(dest="report_action")
    audit = actions.add_parser("audit", help="a seeded random sample of labelled answers per method, as CSV with "
                                             "each labeller's label and an empty human_label column")
    audit.add_argument("run_dir", metavar="RUN_DIR", help="a pipeline run folder, or any folder of evaluations")
    audit.add_argument("--per-method", type=int, default=50, help="answers per method (default 50)")
    audit.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    audit.add_argument("--out", required=True, help="the CSV file to write")
    audit.set_defaults(func=run_audit)


def run(args: argparse.Namespace) -> int:
    # eval loads torch and transformers (through safety_modules): imported when the command runs, so
    # that `safevlm --help` does not wait for them.
    from eval.report import compare_runs

    if not args.runs or not args.out:
        raise ValueError("report: --runs DIR... and --out DIR are required (or: safevlm report audit RUN_DIR ...)")
    paths = compare_runs(args.runs, args.out, names=args.names)
    print(f"report: {len(args.runs)} runs -> {paths['markdown']}, {paths['figure']}")
    return 0


def run_audit(args: argparse.Namespace) -> int:
    from eval.audit import write_audit          # heavy: see run

    written = write_audit(args.run_dir, args.out, per_method=args.per_method, seed=args.seed)
    counts = ", ".join(f"{method} {n}" for method, n in written["per_method"].items())
    print(f"report audit: {sum(written['per_method'].values())} answers ({counts}) -> {written['path']}")
    return 0
