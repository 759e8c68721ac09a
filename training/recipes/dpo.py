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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from safety_modules.configio import ConfigError
from training.config import ModelSpec, TrainConfig
from training.dpo_data import (REFERENCE_START, REFERENCES, IndexedRows, PairCollator, check_pairs, reference_logps,
                               sequence_logps)
from runtime.distributed import is_main
from training.engine import Trainer
from training.logprobs import dpo_loss
from training.recipes import export_adapter, load_training_records, measured_before, save_run_config, write_json
from training.recipes.baselines import (BaselineSection, baseline_train_defaults, build_baseline_model, limited,
                                        scored_answers, split_heldout, trainable_parameters)

# How a sweep ranks runs on the held-out slice: answers judged right first, then the DPO loss. The DPO
# loss alone keeps falling as the rate grows while both answers' likelihoods collapse (on the concept
# world lr 3e-4 / 1e-3 reached held-out DPO loss 0.11 / 0.005 with 96% / 74% of answers right).
SWEEP_METRICS = [("answer_accuracy", "max"), ("dpo_loss", "min")]


@dataclass
class DPOSection(BaselineSection):
    """The `dpo:` block of a run YAML.

    beta 0.1: the DPO paper's default. lr 1e-4: the best of `--sweep train.lr=2e-6,3e-5,1e-4,3e-4,1e-3`
    on the concept world after stage 2, measured with `reference: base` and the earlier rejected
    answers (held-out answers right 100/100/100/96/74%; held-out DPO loss 0.568 before, 0.563 at the
    reference code's 2e-6 -- it barely moved the model -- 0.331 at 1e-4).
    `reference`: `start` (the starting policy, default) or `base` (its LoRA disabled); see above.
    """

    beta: float = 0.1
    reference: str = REFERENCE_START
    train: TrainConfig = field(default_factory=baseline_train_defaults(1e-4))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if self.reference not in REFERENCES:
            raise ConfigError(f"reference: must be one of {list(REFERENCES)}, got {self.reference!r}")


@dataclass
class DPOConfig(DPOSection):
    run_dir: str = "checkpoints/tiny/dpo"
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)


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


def build_dpo_model(cfg: DPOConfig):
    """The stage-2 model with the baselines' trainable set (training/recipes/baselines.py)."""
    return build_baseline_model(cfg)


def run_dpo(cfg: DPOConfig, resume: bool = False) -> dict[str, Any]:
    """Train LoRA (+ safety tokens) on the preference pairs; export `<run_dir>/adapter`; return a summary."""
    return train_dpo(cfg, build_dpo_model(cfg), resume)


def train_dpo(cfg: DPOConfig, model, resume: bool = False) -> dict[str, Any]:
    """DPO on a model from build_dpo_model."""
    run_dir = Path(cfg.run_dir)
    records = load_training_records(cfg.data, model.safety_config, require_answer=True, require_labels=False)
    check_pairs(records.dataset)                          # a pair without `rejected` stops before training
    train_rows, heldout_rows = split_heldout(records, cfg.heldout_fraction, cfg.seed)
    splits = {"train": IndexedRows(limited(train_rows, cfg.eval_records))}
    if heldout_rows is not None:
        splits["heldout"] = IndexedRows(limited(heldout_rows, cfg.eval_records))
    train_pairs = IndexedRows(train_rows)
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
    eval_refs = {name: reference[:len(rows)] if name == "train" else table(rows) for name, rows in splits.items()}
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        tables = {"train": reference, **{name: ref for name, ref in eval_refs.items() if name != "train"}}
        save_file({name: ref.contiguous() for name, ref in tables.items()},
                  str(run_dir / "reference_logps.safetensors"), metadata={"reference": cfg.reference, "columns": "chosen,rejected"})

    report = "heldout" if "heldout" in splits else "train"

    def measure() -> dict[str, dict[str, float]]:
        out = {name: trainer.evaluate(rows, collate, make_dpo_metrics(eval_refs[name], cfg.beta))
               for name, rows in splits.items()}
        out[report].update(scored_answers(cfg, trainer, model, splits[report]))
        return out

    before = measured_before(run_dir, resume, measure)
    if resume:
        trainer.resume()
    last = trainer.fit()
    after = measure()
    summary = {
        "stage": "dpo", "adapter": str(export_adapter(trainer, model, run_dir / "adapter")),
        "records": len(train_rows), "heldout_records": 0 if heldout_rows is None else len(heldout_rows),
        "skipped_records": records.skipped, "beta": cfg.beta, "reference": cfg.reference, **last,
        "reward_accuracy_before": before[report]["reward_accuracy"],
        "reward_accuracy_after": after[report]["reward_accuracy"],
        "margin_before": before[report]["margin"], "margin_after": after[report]["margin"], "measured_on": report,
        **{f"{name}_before": before[name] for name in before}, **{f"{name}_after": after[name] for name in after},
        "trainable_parameters": trainable_parameters(model),
    }
    write_json(run_dir / "summary.json", summary)
    return summary
