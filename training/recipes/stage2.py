"""Stage 2: the stage-1 adapter loaded; LoRA on the LLM + safety tokens (+ head) trained on
LM loss on responses + loss_weight x (CE(level) + CE(type)).

The LLM learns (through the LoRA) to read the safety tokens in front of the image tokens; the
projector stays as stage 1 left it unless `train_projector`. Exports `<run_dir>/adapter`: the
safety adapter and PEFT's LoRA files beside it. Reports the response LM loss before and after.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from safety_modules import add_lora, has_lora, load_adapter
from training.collator import TrainingCollator
from training.config import Stage2Config, resolve_adapter_path, resolve_base_path
from training.engine import Trainer
from training.recipes import (export_adapter, load_training_records, measured_before, response_lm_metrics,
                              save_run_config, write_json)


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
    adapter = resolve_adapter_path(cfg)
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


def run_stage2(cfg: Stage2Config, resume: bool = False) -> dict[str, Any]:
    """Train LoRA + safety tokens (+ head); export `<run_dir>/adapter`; return a summary."""
    return train_stage2(cfg, build_stage2_model(cfg), resume)


def train_stage2(cfg: Stage2Config, model, resume: bool = False) -> dict[str, Any]:
    """Stage 2 on a model from build_stage2_model."""
    run_dir = Path(cfg.run_dir)
    records = load_training_records(cfg.data, model.safety_config, require_answer=True, require_labels=True)
    collate = TrainingCollator(model.processor, max_length=cfg.data.max_length,
                               max_image_pixels=cfg.data.max_image_pixels)
    trainer = Trainer(model, records, collate, stage2_loss, cfg.train, run_dir, seed=cfg.seed, name="stage2",
                      num_workers=cfg.data.num_workers)
    save_run_config(run_dir, cfg)
    evaluate = lambda: trainer.evaluate(records, collate, response_lm_metrics, limit=cfg.eval_records)  # noqa: E731
    before = measured_before(run_dir, resume, evaluate)
    if resume:
        trainer.resume()
    last = trainer.fit()
    after = evaluate()
    summary = {
        "stage": "stage2", "adapter": str(export_adapter(trainer, model, run_dir / "adapter")),
        "records": len(records), "skipped_records": records.skipped, **last,
        "lm_loss_before": before["lm_loss"], "lm_loss_after": after["lm_loss"], "before": before, "after": after,
        "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad),
    }
    write_json(run_dir / "summary.json", summary)
    return summary
