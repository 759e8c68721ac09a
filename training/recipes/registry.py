"""The recipe registry: one record per training method, read by the CLI, the pipeline, the report,
the hyperparameter selection and the tests.

Adding a method is one module `training/recipes/<name>.py` (its run-YAML section, its config,
`build_<name>_model(config)` and `train_<name>(config, model, resume=False) -> summary`) plus one
`Recipe` below: `safevlm <name>` (or `safevlm train <name>`), the pipeline stage, its evaluation,
its row in the report, its place in the selection and in the exported adapters all follow from it.

The record names its classes and functions as attributes of its module, imported on first use, so
that `safevlm --help` and the registry itself import no torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from runtime.layout import ADAPTER_DIR, MODEL_DIR

# How a `--sweep` ranks its runs on the held-out slice: (metric, "max" | "min"), compared in order.
SweepMetrics = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Recipe:
    """One training method."""

    name: str                    # its CLI command, its `name:` block of a run YAML, its `<run_dir>/<name>` folder
    help: str                    # one line: the CLI's help and the pipeline's progress line
    module: str                  # the module defining `section`, `config`, `build` and `train`
    section: str                 # the class of its run-YAML block (the keys that are its own)
    config: str                  # its section plus the run-wide keys (run_dir, seed, model[, safety])
    build: str                   # the function config -> the model it trains ("module:name" when shared)
    train: str                   # the function (config, model, resume=False) -> summary dict
    exports: str = ADAPTER_DIR   # what it writes into its folder: an adapter, or a whole model
    subcommand: bool = False     # `safevlm <name>` of its own; else `safevlm train <name>`
    pretrains_base: bool = False     # trains the run's base itself (the tiny models only; before eval_base)
    on_top: bool = False         # starts from stage 2's adapter; the methods compared, with equal budgets
    selectable: bool = False     # its hyperparameter may be chosen on the validation split
    report_name: str = ""        # its row in the comparison report ("": not evaluated on its own)
    sweep_metrics: SweepMetrics = ()     # `--sweep` on the held-out slice of its records (): no sweep

    def _attribute(self, name: str) -> Any:
        """An attribute of `module`, or of another module when written "module:attribute"."""
        module, _, attribute = name.rpartition(":")
        return getattr(importlib.import_module(module or self.module), attribute)

    @property
    def section_class(self) -> type:
        return self._attribute(self.section)

    @property
    def config_class(self) -> type:
        return self._attribute(self.config)

    @property
    def run_function(self) -> Callable[..., dict[str, Any]]:
        """(config, resume=False) -> summary: build the model, then train it."""
        build, train = self._attribute(self.build), self._attribute(self.train)

        def run(config, resume: bool = False) -> dict[str, Any]:
            return train(config, build(config), resume)

        return run

    # training.config imports torch: it is imported when a config is made, not with the registry.
    def load_config(self, path: str | Path, overrides: list[str] | tuple[str, ...] = ()):
        """Its config from a run YAML (its `name:` block) or a flat YAML, plus `key=value` overrides."""
        from training.config import load_recipe_config
        return load_recipe_config(self.name, self.config_class, path, overrides)

    def config_for_run(self, section: Any, *, run_root: str | Path, seed: int, model: Any, safety: Any = None):
        """Its config from a run's parsed section and shared settings, writing into `<run_root>/<name>`."""
        from training.config import recipe_config
        return recipe_config(self.config_class, self.name, section, run_root=run_root, seed=seed, model=model,
                             safety=safety)


ON_TOP_MODEL = "training.recipes.start:build_baseline_model"     # the stage-2 model, trainable as SFT/DPO train it

_REGISTERED = (
    Recipe("stage0", "full fine-tune of the plain tiny base on the concept world (perception, text-only safety)",
           "training.recipes.stage0", "Stage0Section", "Stage0Config", "build_stage0_model", "train_stage0",
           exports=MODEL_DIR, pretrains_base=True),
    Recipe("stage1", "safety modules on the frozen base, classification loss",
           "training.recipes.stage1", "Stage1Section", "Stage1Config", "build_stage1_model", "train_stage1"),
    Recipe("stage2", "LoRA + safety tokens (+ head) on LM loss + weighted classification loss",
           "training.recipes.stage2", "Stage2Section", "Stage2Config", "build_stage2_model", "train_stage2",
           selectable=True, report_name="stage 2"),
    Recipe("ppo", "PPO on the stage-2 model with the response-classifier reward",
           "training.recipes.ppo", "PPOSection", "PPOConfig", "build_ppo_model", "train_ppo",
           subcommand=True, on_top=True, selectable=True, report_name="PPO"),
    Recipe("sft", "SFT baseline: the stage-2 model fine-tuned on templated correct answers",
           "training.recipes.sft", "SFTSection", "SFTConfig", ON_TOP_MODEL, "train_sft",
           subcommand=True, on_top=True, selectable=True, report_name="SFT",
           sweep_metrics=(("answer_accuracy", "max"), ("lm_loss", "min"))),
    Recipe("dpo", "DPO baseline: the stage-2 model, chosen = correct answer, rejected = the opposite",
           "training.recipes.dpo", "DPOSection", "DPOConfig", ON_TOP_MODEL, "train_dpo",
           subcommand=True, on_top=True, selectable=True, report_name="DPO",
           sweep_metrics=(("answer_accuracy", "max"), ("dpo_loss", "min"))),
)
RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in _REGISTERED}


def recipe(name: str) -> Recipe:
    """The record of `name`; a ValueError naming the known ones otherwise."""
    if name not in RECIPES:
        raise ValueError(f"recipe: unknown method {name!r}; known: {list(RECIPES)}")
    return RECIPES[name]


def names(**where: bool) -> tuple[str, ...]:
    """The names of the recipes whose flags match, in registry order: names(on_top=True) -> ppo, sft, dpo."""
    return tuple(r.name for r in _REGISTERED if all(getattr(r, key) == value for key, value in where.items()))


def exporting_adapters() -> tuple[str, ...]:
    """The recipes that write an adapter (every one but the base's pretraining)."""
    return tuple(r.name for r in _REGISTERED if r.exports == ADAPTER_DIR)


def evaluated() -> tuple[Recipe, ...]:
    """The recipes with a row of their own in the comparison report, in registry order."""
    return tuple(r for r in _REGISTERED if r.report_name)
