"""The training commands, one per method of the recipe registry (training/recipes/registry.py):
`safevlm train stage0|stage1|stage2 --config FILE [key=value ...] [--resume]` and
`safevlm ppo|sft|dpo --config FILE [key=value ...] [--resume]` (sft and dpo also take
`--sweep train.lr=1e-4,3e-4,1e-3`: one run per value, the best on the held-out slice of the
training records kept; training/recipes/sweep.py).

One process: `safevlm train stage1 --config configs/tiny.yaml`. Several: `torchrun
--nproc-per-node N -m safevlm.cli train stage1 --config ...` or `deepspeed --num_gpus N --module
safevlm.cli sft --config ...` (multi-node: add `--hostfile hostfile`).
"""

from __future__ import annotations

import argparse

from safevlm.commands import run_training
from training.recipes.registry import RECIPES, Recipe, recipe


def _arguments(p: argparse.ArgumentParser, method: Recipe) -> None:
    p.add_argument("--config", required=True, help=f"run YAML with a `{method.name}:` section (e.g. "
                                                   "configs/tiny.yaml), or a flat YAML of its config")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"e.g. train.lr=1e-3 data.train=WORLD/records/{method.name}.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint"
                   + (" (with --sweep: finished runs are kept)" if method.sweep_metrics else ""))
    if method.sweep_metrics:
        p.add_argument("--sweep", action="append", default=[], metavar="key=v1,v2,...",
                       help="train one run per value (repeat for a grid) and keep the best on the held-out slice "
                            "of the training records, e.g. --sweep train.lr=1e-4,3e-4,1e-3")
    # The `deepspeed` launcher passes --local_rank to every process; the rank is read from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run, method=method.name)


def register(subparsers) -> None:
    staged = [m for m in RECIPES.values() if not m.subcommand]
    p = subparsers.add_parser("train", help="train a stage (DeepSpeed; one process or a launcher's many)")
    stages = p.add_subparsers(dest="stage", required=True, metavar="{" + ",".join(m.name for m in staged) + "}")
    for method in staged:
        _arguments(stages.add_parser(method.name, help=method.help), method)
    for method in RECIPES.values():
        if method.subcommand:
            _arguments(subparsers.add_parser(method.name, help=method.help), method)


def run(args: argparse.Namespace) -> int:
    method = recipe(args.method)
    cfg = method.load_config(args.config, args.overrides)
    if getattr(args, "sweep", None):
        from training.recipes.sweep import parse_sweep, sweep     # only a sweep needs it
        grid = parse_sweep(args.sweep)
        train = lambda: sweep(method.run_function, cfg, grid, method.sweep_metrics, resume=args.resume)  # noqa: E731
    else:
        train = lambda: method.run_function(cfg, resume=args.resume)  # noqa: E731
    return run_training(args.command, train, run_dir=cfg.run_dir)
