"""`safevlm ppo --config FILE [key=value ...] [--resume]`: PPO with the response-classifier reward.

Starts from the stage-2 model (`adapter=DIR`, default `<run_dir>/stage2/adapter` of a run YAML) and
rewards answers to `data.train=WORLD/records/ppo.jsonl` with the reward classifier (`classifier=DIR`,
default `<run_dir>/classifiers/reward`). Several processes: `torchrun --nproc-per-node N -m
safevlm.cli ppo --config ...` (or the `deepspeed` launcher); `train.deepspeed=configs/deepspeed/zero3.json`
for ZeRO-3. Recipe and settings: training/recipes/ppo.py.
"""

from __future__ import annotations

import argparse
import logging

from safevlm.commands import run_training


def register(subparsers) -> None:
    p = subparsers.add_parser("ppo", help="PPO on the stage-2 model with the response-classifier reward")
    p.add_argument("--config", required=True, help="run YAML with a `ppo:` section (e.g. configs/tiny.yaml), "
                                                   "or a flat PPO YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. data.train=WORLD/records/ppo.jsonl algo.kl_coef=0.1 rollout.batch_size=8")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    # The `deepspeed` launcher passes --local_rank to every process; the rank is read from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from training.recipes.ppo import load_ppo_config, run_ppo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_ppo_config(args.config, args.overrides)
    return run_training("ppo", lambda: run_ppo(cfg, resume=args.resume), run_dir=cfg.run_dir)
