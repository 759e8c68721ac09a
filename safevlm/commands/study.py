"""`safevlm study CONFIG --seeds N [key=value ...]`: the whole job per seed, one report with intervals."""

from __future__ import annotations

import argparse
from pathlib import Path

from runtime.layout import RunLayout


def register(subparsers) -> None:
    p = subparsers.add_parser("study", help="repeat the whole pipeline over seeds; one report with 95%% intervals")
    p.add_argument("config", help="pipeline YAML, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds, 0..N-1 (default 5)")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    p.add_argument("--out", default=None, help="study folder (default: <run_dir>/study)")
    p.add_argument("--select-each", action="store_true",
                   help="choose hyperparameters on every seed's validation split (default: on the first seed's, "
                        "reused by the others)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from finished seeds")
    p.add_argument("--force", action="store_true", help="rerun stages that already finished")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from safevlm.pipeline import load_pipeline_config
    from safevlm.study import run_study, write_study_report

    if args.seeds < 1:
        raise ValueError(f"--seeds: must be >= 1, got {args.seeds}")
    cfg = load_pipeline_config(args.config, args.overrides)
    out = Path(args.out) if args.out else RunLayout(cfg.run_dir).study
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    if args.report_only:
        report = write_study_report(out, seeds, cfg.eval.splits)
    else:
        report = run_study(cfg, seeds, out, select_each=args.select_each, force=args.force)
    print(f"study report: {report['report']}")
    return 0
