"""`safevlm train stage0|stage1|stage2 --config FILE [key=value ...] [--resume]`.

One process: `safevlm train stage1 --config configs/tiny.yaml`. Several: `torchrun
--nproc-per-node N -m safevlm.cli train stage1 --config ...` or `deepspeed --num_gpus N --module
safevlm.cli train stage1 --config ...` (multi-node: add `--hostfile hostfile`).
"""

from __future__ import annotations

import argparse
import importlib
import logging

from safevlm.commands import run_training

STAGES = ("stage0", "stage1", "stage2")


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a stage (DeepSpeed; one process or a launcher's many)")
    stages = p.add_subparsers(dest="stage", required=True, metavar="{stage0,stage1,stage2}")
    helps = {"stage0": "full fine-tune of the plain tiny base on the concept world (tiny default only)",
             "stage1": "safety modules on a frozen base, classification loss",
             "stage2": "LoRA + safety tokens (+ head) on LM loss + weighted classification loss"}
    for stage in STAGES:
        s = stages.add_parser(stage, help=helps[stage])
        s.add_argument("--config", required=True, help="run YAML with a `stageN:` section, e.g. configs/tiny.yaml")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.lr=1e-3 data.train=FILE")
        s.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
        # The `deepspeed` launcher passes --local_rank to every process; the rank is read from the environment.
        s.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from training.config import load_stage_config
    from training.recipes import RECIPES

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_stage_config(args.stage, args.config, args.overrides)
    module, func = RECIPES[args.stage].split(":")
    return run_training("train", lambda: getattr(importlib.import_module(module), func)(cfg, resume=args.resume),
                        run_dir=cfg.run_dir)
