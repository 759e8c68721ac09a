"""Stage 2: the stage-1 adapter loaded; LoRA on the LLM + safety tokens (+ head) trained on
LM loss on responses + loss_weight x (CE(level) + CE(type)).

The LLM learns (through the LoRA) to read the safety tokens in front of the image tokens; the
projector stays as stage 1 left it unless `train_projector`. Exports `<run_dir>/adapter`: the
safety adapter and PEFT's LoRA files beside it. Reports the response LM loss before and after.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.layout import RunLayout, StageLayout
from safety_modules import add_lora, has_lora, load_adapter
from training.collator import TrainingCollator
from training.config import LoraSpec, MethodSection, RecipeRun, resolve_base_path
from training.engine import Trainer
from training.recipes.common import (export_adapter, fit_measured, load_training_records, response_lm_metrics,
                                     save_run_config, trainable_parameters, write_summary)


@dataclass
class Stage2Section(MethodSection):
    """Stage 2: stage-1 adapter loaded; LoRA + safety tokens (+ head) on LM loss + weighted classification."""

    init_from: str = ""                  # must name the base stage 1 was trained on
    adapter: str = ""                    # stage-1 adapter folder; "": <run_dir>/stage1/adapter
    lora: LoraSpec = field(default_factory=LoraSpec)
    loss_weight: float | None = None     # None: the adapter's SafetyConfig.loss_weight
    train_head: bool = True
    train_projector: bool = False        # the paper trains tokens (+ head) in stage 2, not the projector
    eval_records: int = 256              # LM loss before/after is measured on the first N training records


@dataclass
class Stage2Config(Stage2Section, RecipeRun):
    run_dir: str = "checkpoints/tiny/stage2"

    @property
    def start_adapter(self) -> Path:
        """The adapter it starts from: `adapter`, else stage 1's of the same run."""
        return Path(self.adapter) if self.adapter else RunLayout(Path(self.run_dir).parent).adapter("stage1")

    def pinned_inputs(self) -> dict[str, str]:
        """Its starting model and adapter as absolute settings: a trial trained in another folder
        starts from this run's models (the defaults are relative to `run_dir`)."""
        return {"adapter": str(self.start_adapter), "init_from": resolve_base_path(self)}

def stage2_loss(engine, batch, lm_num_items):
    out = engine(**batch, num_items_in_batch=lm_num_items)
    level_acc = (out.safety_logits.argmax(-1) == batch["safety_labels"]).float().mean()
    metrics = {"lm_loss": out.lm_loss, "level_acc": level_acc}
    if out.safety_loss is not None:
        metrics["safety_loss"] = out.safety_loss
    return out.loss, metrics


def build_stage2_model(cfg: Stage2Config):
    """Base + stage-1 adapter (trainable) + LoRA, with the stage's trainable set."""
    base, processor = cfg.model.load(resolve_base_path(cfg))
    adapter = cfg.start_adapter
    if not adapter.is_dir():
        raise FileNotFoundError(f"adapter: stage-1 adapter folder {adapter} not found (run stage 1 first, or "
                                "set adapter=DIR)")
    model = load_adapter(base, adapter, processor, trainable=True)
    if not has_lora(model):
        torch.manual_seed(cfg.seed)                      # LoRA A init: the same on every rank and run
        add_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout)
    if cfg.loss_weight is not None:
        model.safety_config = dataclasses.replace(model.safety_config, loss_weight=cfg.loss_weight)
    model.safety.projector.requires_grad_(cfg.train_projector)
    model.safety.head.requires_grad_(cfg.train_head)
    return model


def train_stage2(cfg: Stage2Config, model, resume: bool = False) -> dict[str, Any]:
    """Stage 2 on a model from build_stage2_model."""
    run_dir = Path(cfg.run_dir)
    records = load_training_records(cfg.data, model.safety_config, require_answer=True, require_labels=True)
    collate = TrainingCollator(model.processor, max_length=cfg.data.max_length,
                               max_image_pixels=cfg.data.max_image_pixels)
    trainer = Trainer(model, records, collate, stage2_loss, cfg.train, run_dir, seed=cfg.seed, name="stage2",
                      num_workers=cfg.data.num_workers)
    save_run_config(run_dir, cfg)
    measure = lambda: trainer.evaluate(records, collate, response_lm_metrics, limit=cfg.eval_records)  # noqa: E731
    before, last, after = fit_measured(trainer, run_dir, resume, measure)
    return write_summary(run_dir, {
        "stage": "stage2", "adapter": str(export_adapter(trainer, model, StageLayout(run_dir).adapter)),
        "records": len(records), "skipped_records": records.skipped, **last,
        "lm_loss_before": before["lm_loss"], "lm_loss_after": after["lm_loss"], "before": before, "after": after,
        "trainable_parameters": trainable_parameters(model),
    })
