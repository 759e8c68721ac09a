"""Stage 1: the base frozen; safety projector, both token sets and head trained on CE(level) + CE(type).

The LLM is not run (`run_llm=False`): the head reads the prompt's embeddings and the safety
features, so the loss does not depend on it. Inputs are the prompt alone -- exactly what the guard
sees at inference. Reports head accuracy before and after training, on the training records and on
each of `eval_files`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.layout import StageLayout
from safety_modules import attach
from safety_modules.config import SafetyConfig
from training.collator import TrainingCollator
from training.config import MethodSection, RecipeRun, resolve_base_path
from training.engine import Trainer
from training.recipes.common import (export_adapter, fit_measured, head_accuracy, load_training_records,
                                     save_run_config, write_summary)


@dataclass
class Stage1Section(MethodSection):
    """Stage 1: base frozen; safety projector, tokens and head trained on the classification loss."""

    init_from: str = ""                  # "": the `model` section; "stage0": <run_dir>/stage0/model; or a folder
    eval_files: list[str] = field(default_factory=list)   # extra records files: head accuracy reported per file


@dataclass
class Stage1Config(Stage1Section, RecipeRun):
    run_dir: str = "checkpoints/tiny/stage1"
    safety: SafetyConfig = field(default_factory=SafetyConfig)

    def pinned_inputs(self) -> dict[str, str]:
        """Its starting model as a setting that holds in another folder (see RecipeRun)."""
        return {"init_from": resolve_base_path(self)}

def stage1_loss(engine, batch, lm_num_items):
    out = engine(**batch, run_llm=False)
    level_acc = (out.safety_logits.argmax(-1) == batch["safety_labels"]).float().mean()
    return out.loss, {"safety_loss": out.safety_loss, "level_acc": level_acc}


def head_metrics(engine, batch):
    return head_accuracy(engine(**batch, run_llm=False), batch)


def build_stage1_model(cfg: Stage1Config):
    """The base with fresh safety modules attached (base frozen, modules trainable)."""
    base, processor = cfg.model.load(resolve_base_path(cfg))
    torch.manual_seed(cfg.seed)
    return attach(base, cfg.safety, processor)


def train_stage1(cfg: Stage1Config, model, resume: bool = False) -> dict[str, Any]:
    """Stage 1 on an attached model (see build_stage1_model)."""
    run_dir = Path(cfg.run_dir)
    records = load_training_records(cfg.data, cfg.safety, require_answer=False, require_labels=True)
    evals = {path: load_training_records(cfg.data, cfg.safety, require_answer=False, require_labels=True,
                                         path=path) for path in cfg.eval_files}
    collate = TrainingCollator(model.processor, with_response=False, max_length=cfg.data.max_length,
                               max_image_pixels=cfg.data.max_image_pixels)
    trainer = Trainer(model, records, collate, stage1_loss, cfg.train, run_dir, seed=cfg.seed,
                      name="stage1", num_workers=cfg.data.num_workers)
    save_run_config(run_dir, cfg)
    before, last, after = fit_measured(trainer, run_dir, resume,
                                       lambda: trainer.evaluate(records, collate, head_metrics))
    return write_summary(run_dir, {
        "stage": "stage1", "adapter": str(export_adapter(trainer, model, StageLayout(run_dir).adapter)),
        "records": len(records), "skipped_records": records.skipped, **last,
        "train_before": before, "train_after": after,
        "eval": {path: trainer.evaluate(data, collate, head_metrics) for path, data in evals.items()},
        "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in model.safety.parameters()),
    })
