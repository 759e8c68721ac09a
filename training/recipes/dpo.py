"""DPO baseline: the stage-2 model trained to prefer the correct answer over the opposite one.

Pairs from the concept world's `records/dpo.jsonl` (the same images, prompts and labels as PPO):
chosen = the gpt turn, rejected = the record's `rejected` (the same answer with the opposite
verdict). Policy = base + stage-2 safety modules + LoRA (LoRA and LLM-side safety tokens trained).
Reference (`reference:`): `start` (default), the starting policy itself -- the stage-2 LoRA, safety
tokens and modules -- as in the DPO paper and TRL, so the implicit reward margins start at 0 and
measure only what DPO changed; `base`, the same model with the LoRA disabled (base + safety
modules), whose margins before training already show how far stage 2 moved the model. Either way
its log-probabilities are computed once before training (training/dpo_data.py says why), with no
second copy of the model, and written to `<run_dir>/reference_logps.safetensors`; the summary
records which was used. Sequence log-prob = sum over the response tokens. Loss:
`training.logprobs.dpo_loss` (Rafailov et al. 2023) with `beta`.

Summary metrics (before/after, on the training records and the held-out slice): reward accuracy
(share of pairs with beta x margin > 0), mean margin, DPO loss, policy accuracy (the policy's own
log-prob of the correct answer above the opposite one's, reference-free), and on the held-out slice
the share of greedy answers the rule-based check finds right (answer_accuracy, comparable with SFT
and PPO). Why our engine and not TRL's DPOTrainer: see training/recipes/sft.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from runtime.distributed import is_main
from runtime.layout import StageLayout
from safety_modules.configio import ConfigError
from training.dpo_data import (REFERENCE_START, REFERENCES, IndexedRows, PairCollator, check_pairs, reference_logps,
                               sequence_logps)
from training.engine import Trainer
from training.logprobs import dpo_loss
from training.recipes.answers import scored_answers
from training.recipes.baseline import BaselineSection, baseline_summary, heldout_splits
from training.recipes.common import export_adapter, fit_measured, load_training_records, save_run_config, write_summary
from training.recipes.start import OnTopRun


@dataclass
class DPOSection(BaselineSection):
    """The `dpo:` block of a run YAML: the baselines' keys, `beta` (the DPO paper's default) and
    `reference`: `start` (the starting policy, default) or `base` (its LoRA disabled); see above."""

    beta: float = 0.1
    reference: str = REFERENCE_START

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if self.reference not in REFERENCES:
            raise ConfigError(f"reference: must be one of {list(REFERENCES)}, got {self.reference!r}")


@dataclass
class DPOConfig(DPOSection, OnTopRun):
    run_dir: str = "checkpoints/tiny/dpo"


def _margins(engine, batch, reference: torch.Tensor, beta: float):
    chosen, rejected = sequence_logps(engine, batch)
    ref = reference.to(chosen.device)[batch["pair_index"]]
    loss, margins = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta)
    return loss, margins, chosen, rejected


def make_dpo_loss(reference: torch.Tensor, beta: float):
    """The engine's loss_fn for pairs whose reference log-probs are rows of `reference`."""

    def loss_fn(engine, batch, lm_num_items):
        loss, margins, chosen, rejected = _margins(engine, batch, reference, beta)
        return loss, {"reward_accuracy": (margins > 0).float().mean(), "margin": margins.mean(),
                      "chosen_logp": chosen.mean(), "rejected_logp": rejected.mean()}

    return loss_fn


def make_dpo_metrics(reference: torch.Tensor, beta: float):
    """Per-pair metrics for Trainer.evaluate (each pair weighs 1)."""

    def metric_fn(engine, batch):
        _, margins, chosen, rejected = _margins(engine, batch, reference, beta)
        ones = torch.ones_like(margins)
        return {"reward_accuracy": ((margins > 0).float(), ones), "margin": (margins, ones),
                "dpo_loss": (-F.logsigmoid(margins), ones), "policy_accuracy": ((chosen > rejected).float(), ones),
                "chosen_logp": (chosen, ones), "rejected_logp": (rejected, ones)}

    return metric_fn


def train_dpo(cfg: DPOConfig, model, resume: bool = False) -> dict[str, Any]:
    """DPO on a model from training.recipes.start.build_baseline_model."""
    run_dir = Path(cfg.run_dir)
    records = load_training_records(cfg.data, model.safety_config, require_answer=True, require_labels=False)
    check_pairs(records.dataset)                          # a pair without `rejected` stops before training
    splits = heldout_splits(records, cfg, IndexedRows)
    train_pairs = IndexedRows(splits.train_rows)
    collate = PairCollator(model.processor, max_length=cfg.data.max_length, max_image_pixels=cfg.data.max_image_pixels)
    # The engine is built before the reference pass so that ZeRO-3 has partitioned the model; the
    # loss reads the reference table, which is filled in place below.
    reference = torch.zeros(len(train_pairs), 2)
    trainer = Trainer(model, train_pairs, collate, make_dpo_loss(reference, cfg.beta), cfg.train, run_dir,
                      seed=cfg.seed, name="dpo", num_workers=cfg.data.num_workers)
    save_run_config(run_dir, cfg)

    def table(rows) -> torch.Tensor:
        return reference_logps(model, rows, collate, cfg.train.micro_batch_size, forward=trainer.engine,
                               reference=cfg.reference, device=trainer.engine.device,
                               dtype=trainer.dtype)

    reference.copy_(table(train_pairs))
    eval_refs = {name: reference[:len(rows)] if name == "train" else table(rows)
                 for name, rows in splits.measured.items()}
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        tables = {"train": reference, **{name: ref for name, ref in eval_refs.items() if name != "train"}}
        save_file({name: ref.contiguous() for name, ref in tables.items()}, str(StageLayout(run_dir).reference_logps),
                  metadata={"reference": cfg.reference, "columns": "chosen,rejected"})

    def measure() -> dict[str, dict[str, float]]:
        out = {name: trainer.evaluate(rows, collate, make_dpo_metrics(eval_refs[name], cfg.beta))
               for name, rows in splits.measured.items()}
        out[splits.report].update(scored_answers(cfg, trainer, model, splits.measured[splits.report]))
        return out

    before, last, after = fit_measured(trainer, run_dir, resume, measure)
    adapter = export_adapter(trainer, model, StageLayout(run_dir).adapter)
    report = splits.report
    return write_summary(run_dir, baseline_summary(
        "dpo", records, splits, model, adapter, last, before, after, beta=cfg.beta, reference=cfg.reference,
        reward_accuracy_before=before[report]["reward_accuracy"], reward_accuracy_after=after[report]["reward_accuracy"],
        margin_before=before[report]["margin"], margin_after=after[report]["margin"]))
