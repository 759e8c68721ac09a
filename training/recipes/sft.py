"""SFT baseline: the stage-2 model fine-tuned on templated correct answers (the records' gpt turn).

Same prompts and labels as PPO (the concept world's `records/sft.jsonl`); the loss is the LM loss on
the response tokens only (prompt and image masked, see training/collator.py). LoRA + LLM-side safety
tokens are trained (see training/recipes/start.py). Exports `<run_dir>/adapter`; summary.json
holds the response LM loss before and after training on the training records and on the held-out
slice of them, and the share of greedy answers on that slice the rule-based check finds right.
`safevlm sft --config FILE [key=value ...] [--sweep train.lr=1e-4,3e-4,1e-3]`.

Why our DeepSpeed engine and not TRL's SFTTrainer (the same holds for DPO, training/recipes/dpo.py):
TRL's trainers tokenise the records themselves and call `model(input_ids, attention_mask,
pixel_values)` on a `transformers.PreTrainedModel` inside `transformers.Trainer`/Accelerate. Our
model is a `SafetyVLM` wrapper that builds its own `inputs_embeds` (safety tokens scattered in
front of the image features) and needs inputs built by the processor that reserves the
safety-token positions; the LoRA sits inside it (`model.base` is the PEFT model), so TRL's
"PEFT model => reference = adapter disabled" path does not recognise it and DPOTrainer would load a
second full copy as the reference. TRL also drives DeepSpeed through Accelerate's config
(`TrainingArguments.deepspeed`), with its own checkpoint format and resume, not our ZeRO-2/3 JSONs
with trainer-filled "auto" values, safetensors-only trainable-tensor checkpoints and exact resume.
Making TRL fit would mean overriding its collators, `concatenated_forward` and reference handling
-- i.e. rewriting what training/dpo_data.py does -- and adding a dependency (TRL is not installed).
So the baselines run on the same engine as stage 1/2 and PPO: one launcher, one checkpoint format,
one set of DeepSpeed configs, and the three methods differ only in their loss. (TRL stays useful for plain models without our
modules: the PPO reward function plugs into its GRPO/RLOO trainers.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.layout import StageLayout
from training.collator import TrainingCollator
from training.engine import Trainer
from training.recipes.answers import scored_answers
from training.recipes.baseline import BaselineSection, baseline_summary, heldout_splits
from training.recipes.common import (export_adapter, fit_measured, load_training_records, response_lm_metrics,
                                     save_run_config, write_summary)
from training.recipes.start import OnTopRun


@dataclass
class SFTSection(BaselineSection):
    """The `sft:` block of a run YAML (the keys every baseline has)."""


@dataclass
class SFTConfig(SFTSection, OnTopRun):
    run_dir: str = "checkpoints/tiny/sft"


def sft_loss(engine, batch, lm_num_items):
    """Response LM loss; the head is not run (it is frozen and this loss never reaches it)."""
    out = engine(**batch, run_head=False, num_items_in_batch=lm_num_items)
    return out.lm_loss, {"lm_loss": out.lm_loss}


def lm_metrics(engine, batch):
    return response_lm_metrics(engine, batch, run_head=False)


def train_sft(cfg: SFTConfig, model, resume: bool = False) -> dict[str, Any]:
    """SFT on a model from training.recipes.start.build_baseline_model."""
    run_dir = Path(cfg.run_dir)
    records = load_training_records(cfg.data, model.safety_config, require_answer=True, require_labels=False)
    splits = heldout_splits(records, cfg)
    collate = TrainingCollator(model.processor, max_length=cfg.data.max_length,
                               max_image_pixels=cfg.data.max_image_pixels)
    trainer = Trainer(model, splits.train_rows, collate, sft_loss, cfg.train, run_dir, seed=cfg.seed, name="sft",
                      num_workers=cfg.data.num_workers)
    save_run_config(run_dir, cfg)

    def measure() -> dict[str, dict[str, float]]:
        out = {name: trainer.evaluate(rows, collate, lm_metrics) for name, rows in splits.measured.items()}
        out[splits.report].update(scored_answers(cfg, trainer, model, splits.measured[splits.report]))
        return out

    before, last, after = fit_measured(trainer, run_dir, resume, measure)
    adapter = export_adapter(trainer, model, StageLayout(run_dir).adapter)
    return write_summary(run_dir, baseline_summary(
        "sft", records, splits, model, adapter, last, before, after,
        lm_loss_before=before[splits.report]["lm_loss"], lm_loss_after=after[splits.report]["lm_loss"]))
