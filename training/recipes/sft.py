"""SFT baseline: the stage-2 model fine-tuned on templated correct answers (the records' gpt turn).

Same prompts and labels as PPO (the concept world's `records/sft.jsonl`); the loss is the LM loss on
the response tokens only (prompt and image masked, see training/collator.py). LoRA + LLM-side safety
tokens are trained (see training/recipes/baselines.py). Exports `<run_dir>/adapter`; summary.json
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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.collator import TrainingCollator
from training.config import ModelSpec, TrainConfig
from training.engine import Trainer
from training.recipes import (export_adapter, load_training_records, measured_before, response_lm_metrics,
                              save_run_config, write_json)
from training.recipes.baselines import (BaselineSection, baseline_train_defaults, build_baseline_model, limited,
                                        scored_answers, split_heldout, trainable_parameters)

# How a sweep ranks runs on the held-out slice: answers judged right, then the correct answers' LM loss.
SWEEP_METRICS = [("answer_accuracy", "max"), ("lm_loss", "min")]


@dataclass
class SFTSection(BaselineSection):
    """The `sft:` block of a run YAML.

    lr 5e-3: the best of `--sweep train.lr=1e-4,5e-4,2e-3,5e-3,1e-2` on the concept world after stage 2
    (held-out answers all right at every rate; held-out response LM loss 0.155 before, then
    0.151 / 0.142 / 0.133 / 0.130 / 0.136).
    """

    train: TrainConfig = field(default_factory=baseline_train_defaults(5e-3))


@dataclass
class SFTConfig(SFTSection):
    run_dir: str = "checkpoints/tiny/sft"
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)


def sft_loss(engine, batch, lm_num_items):
    """Response LM loss; the head is not run (it is frozen and this loss never reaches it)."""
    out = engine(**batch, run_head=False, num_items_in_batch=lm_num_items)
    return out.lm_loss, {"lm_loss": out.lm_loss}


def lm_metrics(engine, batch):
    return response_lm_metrics(engine, batch, run_head=False)


def build_sft_model(cfg: SFTConfig):
    """The stage-2 model with the baselines' trainable set (training/recipes/baselines.py)."""
    return build_baseline_model(cfg)


def run_sft(cfg: SFTConfig, resume: bool = False) -> dict[str, Any]:
    """Train LoRA (+ safety tokens) on the correct answers; export `<run_dir>/adapter`; return a summary."""
    return train_sft(cfg, build_sft_model(cfg), resume)


def train_sft(cfg: SFTConfig, model, resume: bool = False) -> dict[str, Any]:
    """SFT on a model from build_sft_model."""
    run_dir = Path(cfg.run_dir)
    records = load_training_records(cfg.data, model.safety_config, require_answer=True, require_labels=False)
    train_rows, heldout_rows = split_heldout(records, cfg.heldout_fraction, cfg.seed)
    collate = TrainingCollator(model.processor, max_length=cfg.data.max_length,
                               max_image_pixels=cfg.data.max_image_pixels)
    trainer = Trainer(model, train_rows, collate, sft_loss, cfg.train, run_dir, seed=cfg.seed, name="sft",
                      num_workers=cfg.data.num_workers)
    save_run_config(run_dir, cfg)
    splits = {"train": limited(train_rows, cfg.eval_records)}
    if heldout_rows is not None:
        splits["heldout"] = limited(heldout_rows, cfg.eval_records)

    report = "heldout" if "heldout" in splits else "train"

    def measure() -> dict[str, dict[str, float]]:
        out = {name: trainer.evaluate(rows, collate, lm_metrics) for name, rows in splits.items()}
        out[report].update(scored_answers(cfg, trainer, model, splits[report]))
        return out

    before = measured_before(run_dir, resume, measure)
    if resume:
        trainer.resume()
    last = trainer.fit()
    after = measure()
    summary = {
        "stage": "sft", "adapter": str(export_adapter(trainer, model, run_dir / "adapter")),
        "records": len(train_rows), "heldout_records": 0 if heldout_rows is None else len(heldout_rows),
        "skipped_records": records.skipped, **last,
        "lm_loss_before": before[report]["lm_loss"], "lm_loss_after": after[report]["lm_loss"],
        "measured_on": report,
        **{f"{name}_before": before[name] for name in before}, **{f"{name}_after": after[name] for name in after},
        "trainable_parameters": trainable_parameters(model),
    }
    write_json(run_dir / "summary.json", summary)
    return summary
