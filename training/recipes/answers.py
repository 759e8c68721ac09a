"""Greedy answers judged without a learned model: the share the rule-based check finds right.

Why: likelihood metrics alone reward degenerate models -- DPO's held-out loss keeps falling as the
learning rate grows while the answers turn to noise -- so a sweep ranks runs on what they answer.
The judge is `response_classifier.rules`, neither the PPO reward classifier nor the evaluation's
judge.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from response_classifier.rules import rule_based_label
from runtime.distributed import all_reduce
from safety_modules.images import load_image
from safety_modules.labels import ALIGNMENT, NA, OPTIONS, PERCEPTION, VERDICTS
from safety_modules.prompting import build_prompt, encode_batch


def _rule_task(label: str) -> str | None:
    """The rule-based check's task for a record label; None for records it cannot judge."""
    if label in VERDICTS:
        return ALIGNMENT
    if label in OPTIONS:
        return PERCEPTION
    return None


@torch.no_grad()
def answer_accuracy(model, rows, batch_size: int, max_new_tokens: int, *, device: torch.device,
                    dtype: torch.dtype, synced_gpus: bool = False) -> dict[str, float]:
    """Share of labelled records whose greedy answer the rule-based check labels correctly (NA = wrong).

    Rows are sharded over the processes (every process generates the same number of batches;
    `synced_gpus` for ZeRO-3).
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n = len(rows)
    mine = list(range(rank, n, world))
    valid = len(mine)
    per_rank = math.ceil(n / world)
    mine += [0] * (per_rank - valid)
    processor, tokenizer = model.processor, model.processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    totals = torch.zeros(3)                  # correct, NA, judged
    was_training = model.training
    model.eval()
    for start in range(0, per_rank, batch_size):
        batch_rows = [rows[j] for j in mine[start:start + batch_size]]
        enc = encode_batch(processor, [load_image(r["image"]) for r in batch_rows],
                           [build_prompt(processor, r["question"]) for r in batch_rows],
                           return_tensors="pt", padding="longest", padding_side="left")
        inputs = {k: v.to(device, dtype) if k == "pixel_values" else v.to(device) for k, v in enc.items()}
        new = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                             temperature=None, top_p=None, top_k=None, synced_gpus=synced_gpus)
        answers = tokenizer.batch_decode(new, skip_special_tokens=True)
        for k, (row, answer) in enumerate(zip(batch_rows, answers)):
            task = _rule_task(row.get("label") or "")
            if start + k >= valid or task is None:
                continue
            label = rule_based_label(row["question"], answer.strip(), task)
            totals += torch.tensor([float(label == row["label"]), float(label == NA), 1.0])
    model.train(was_training)
    totals = all_reduce(totals)
    if not totals[2]:
        return {}
    return {"answer_accuracy": (totals[0] / totals[2]).item(), "answer_na_rate": (totals[1] / totals[2]).item()}


def scored_answers(cfg, trainer, model, rows) -> dict[str, float]:
    """answer_accuracy with the run's settings ({} when `answer_tokens` is 0)."""
    if not cfg.answer_tokens:
        return {}
    return answer_accuracy(model, rows, cfg.train.micro_batch_size, cfg.answer_tokens, device=trainer.engine.device,
                           dtype=trainer.dtype, synced_gpus=trainer.zero_stage == 3 and trainer.world > 1)
