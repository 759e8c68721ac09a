"""`safevlm run CONFIG [key=value ...]`: the end-to-end pipeline."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run the end-to-end pipeline of a config")
    p.add_argument("config", help="pipeline YAML, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--force", action="store_true", help="rerun stages that already finished")
    p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from safevlm.pipeline import load_pipeline_config, run_pipeline

    cfg = load_pipeline_config(args.config, args.overrides)
    run_pipeline(cfg, force=args.force, only=args.only)
    print(f"run folder: {cfg.run_dir}")
    return 0
