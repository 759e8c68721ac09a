"""Stage 1: the base frozen; safety projector, both token sets and head trained on CE(level) + CE(type).

The LLM is not run (`run_llm=False`): the head reads the prompt's embeddings and the safety
features, so the loss does not depend on it. Inputs are the prompt alone -- exactly what the guard
sees at inference. Reports head accuracy before and after training, on the training records and on
each of `eval_files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from safety_modules import attach
from training.collator import TrainingCollator
from training.config import Stage1Config, resolve_base_path
from training.engine import Trainer
from training.recipes import (export_adapter, head_accuracy, load_training_records, measured_before,
                              save_run_config, write_json)


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


def run_stage1(cfg: Stage1Config, resume: bool = False) -> dict[str, Any]:
    """Train the safety modules on a frozen base; export `<run_dir>/adapter`; return a summary."""
    return train_stage1(cfg, build_stage1_model(cfg), resume)


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
    before = measured_before(run_dir, resume, lambda: trainer.evaluate(records, collate, head_metrics))
    if resume:
        trainer.resume()
    last = trainer.fit()
    summary = {
        "stage": "stage1", "adapter": str(export_adapter(trainer, model, run_dir / "adapter")),
        "records": len(records), "skipped_records": records.skipped, **last,
        "train_before": before, "train_after": trainer.evaluate(records, collate, head_metrics),
        "eval": {path: trainer.evaluate(data, collate, head_metrics) for path, data in evals.items()},
        "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in model.safety.parameters()),
    }
    write_json(run_dir / "summary.json", summary)
    return summary
