"""Stage 0 (the tiny default only): full fine-tune of the plain tiny LLaVA on the concept world.

No safety modules: the plain base learns to perceive the world's concepts (captions, multiple
choice) and to answer text-only safety questions, so that later stages start from a model that
sees what it is shown. LM loss on responses; exports `<run_dir>/model` (save_pretrained, safetensors)
with its processor, which stage 1 and 2 load through `init_from: stage0`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from runtime.distributed import is_main
from runtime.layout import StageLayout
from safety_modules.config import SafetyConfig
from training.collator import TrainingCollator, plain_model_inputs
from training.config import MethodSection, RecipeRun, resolve_base_path
from training.engine import Trainer
from training.recipes.common import (fit_measured, load_training_records, response_lm_metrics, save_run_config,
                                     write_summary)


@dataclass
class Stage0Section(MethodSection):
    """Stage 0 (tiny default only): full fine-tune of the plain base on the world's stage-0 records."""

    eval_records: int = 256              # LM loss before/after is measured on the first N training records


@dataclass
class Stage0Config(Stage0Section, RecipeRun):
    run_dir: str = "checkpoints/tiny/stage0"
    safety: SafetyConfig = field(default_factory=SafetyConfig)   # only its label vocabulary, to check records


def _plain(batch):
    return plain_model_inputs(batch)


def stage0_loss(engine, batch, lm_num_items):
    out = engine(**_plain(batch), num_items_in_batch=lm_num_items)
    return out.loss, {"lm_loss": out.loss}


def lm_metrics(engine, batch):
    return response_lm_metrics(engine, _plain(batch))


class PlainBase(NamedTuple):
    """A plain base (no safety modules) and its processor: what stage 0 trains and exports."""

    model: Any
    processor: Any


def build_stage0_model(cfg: Stage0Config) -> PlainBase:
    """The plain base and its processor, every weight trainable."""
    model, processor = cfg.model.load(resolve_base_path(cfg))
    model.requires_grad_(True)
    return PlainBase(model, processor)


def train_stage0(cfg: Stage0Config, base: PlainBase, resume: bool = False) -> dict[str, Any]:
    """Fine-tune every weight of the plain base; export `<run_dir>/model`; return a summary."""
    model, processor = base
    run_dir = Path(cfg.run_dir)
    records = load_training_records(cfg.data, cfg.safety, require_answer=True, require_labels=False)
    collate = TrainingCollator(processor, max_length=cfg.data.max_length, max_image_pixels=cfg.data.max_image_pixels)
    trainer = Trainer(model, records, collate, stage0_loss, cfg.train, run_dir, seed=cfg.seed, name="stage0",
                      num_workers=cfg.data.num_workers)
    save_run_config(run_dir, cfg)
    measure = lambda: trainer.evaluate(records, collate, lm_metrics, limit=cfg.eval_records)  # noqa: E731
    before, last, after = fit_measured(trainer, run_dir, resume, measure)
    out = StageLayout(run_dir).model
    with trainer.gather(list(model.parameters())):
        if is_main():
            model.save_pretrained(out)
            processor.save_pretrained(out)
    trainer.barrier()
    return write_summary(run_dir, {"stage": "stage0", "model": str(out), "records": len(records),
                                   "skipped_records": records.skipped, **last,
                                   "lm_loss_before": before["lm_loss"], "lm_loss_after": after["lm_loss"]})
