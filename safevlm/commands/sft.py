"""`safevlm sft --config FILE [key=value ...] [--resume] [--sweep key=v1,v2,...]`: the SFT baseline.

Starts from the stage-2 model (adapter: `<run_dir>/stage2/adapter` of a run YAML, or `adapter=DIR`)
and trains on templated correct answers (`data.train=WORLD/records/sft.jsonl`). `--sweep
train.lr=1e-4,3e-4,1e-3` trains one run per value on the same training records and keeps the one
whose greedy answers on their held-out slice (`heldout_fraction`) are most often right (rule-based
check), ties broken by the correct answers' LM loss. Several processes:
`torchrun --nproc-per-node N -m safevlm.cli sft --config ...`. `safevlm dpo` works the same way.
"""

from __future__ import annotations

import argparse
import importlib
import logging

from safevlm.commands import run_training

# baseline -> (recipe module, config class, run function, help)
BASELINES = {
    "sft": ("training.recipes.sft", "SFTConfig", "run_sft",
            "SFT baseline: the stage-2 model fine-tuned on templated correct answers"),
    "dpo": ("training.recipes.dpo", "DPOConfig", "run_dpo",
            "DPO baseline: the stage-2 model, chosen = correct answer, rejected = the opposite"),
}


def register_baseline(subparsers, name: str) -> None:
    """The `safevlm sft` / `safevlm dpo` parser (they take the same arguments)."""
    p = subparsers.add_parser(name, help=BASELINES[name][3])
    p.add_argument("--config", required=True, help=f"run YAML with a `{name}:` section (e.g. configs/tiny.yaml), "
                                                   "or a flat recipe YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"e.g. data.train=WORLD/records/{name}.jsonl train.lr=1e-3 adapter=DIR")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint "
                                                         "(with --sweep: finished runs are kept)")
    p.add_argument("--sweep", action="append", default=[], metavar="key=v1,v2,...",
                   help="train one run per value (repeat for a grid) and keep the best on the held-out slice "
                        "of the training records, e.g. --sweep train.lr=1e-4,3e-4,1e-3")
    # The `deepspeed` launcher passes --local_rank to every process; the rank is read from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run_baseline, baseline=name)


def register(subparsers) -> None:
    register_baseline(subparsers, "sft")


def run_baseline(args: argparse.Namespace) -> int:
    from training.recipes.baselines import load_baseline_config, parse_sweep, sweep

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    module_name, cls_name, func_name, _ = BASELINES[args.baseline]
    module = importlib.import_module(module_name)
    cfg = load_baseline_config(args.baseline, getattr(module, cls_name), args.config, args.overrides)
    run = getattr(module, func_name)
    if args.sweep:
        grid = parse_sweep(args.sweep)
        return run_training(args.baseline, lambda: sweep(run, cfg, grid, module.SWEEP_METRICS, resume=args.resume),
                            run_dir=cfg.run_dir)
    return run_training(args.baseline, lambda: run(cfg, resume=args.resume), run_dir=cfg.run_dir)
