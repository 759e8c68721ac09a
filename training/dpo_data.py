"""DPO data: preference pairs as one batch, sequence log-probabilities, and the fixed reference.

A pair is one record: image + question, chosen = the gpt turn (the correct answer), rejected = the
record's `rejected` field (the opposite answer). `PairCollator` encodes the B chosen and the B
rejected sequences as one batch of 2B rows (chosen first) with training/collator.py's
`TrainingCollator`, so both answers get exactly the prompt format, masking and safety-token
layout of every other stage, and one forward pass scores both.

The reference log-probabilities are computed once, before training (and before a resumed run loads
its checkpoint), under no_grad, and looked up by `pair_index` during training. The reference is
`REFERENCE_START` by default: the policy DPO starts from (the stage-2 LoRA, safety tokens and
modules), as in the DPO paper and TRL, so every implicit reward margin starts at 0.
`REFERENCE_BASE` is the same model with its LoRA disabled (`model.base.disable_adapter()`), i.e. the
model before stage 2's LoRA + the safety modules. Why once: the LoRA and the LLM-side safety tokens
are what DPO trains, so a reference recomputed at every step would drift with them; computed up
front it is exactly the chosen model for the whole run, with no second copy of the model, and it
costs one forward pass over the data instead of one per step.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.distributed as dist

from runtime.distributed import DistContext, all_reduce, context
from safety_modules.labels import IGNORE_INDEX
from training.collator import TrainingCollator, plain_model_inputs, to_device
from training.logprobs import token_logprobs

NOT_MODEL_INPUTS = ("labels", "pair_index")   # the rest (the family's image inputs included) goes to the model
REFERENCE_START = "start"     # the starting policy: the model as loaded (stage-2 LoRA on)
REFERENCE_BASE = "base"       # the starting model with its LoRA disabled (base + safety modules)
REFERENCES = (REFERENCE_START, REFERENCE_BASE)


class IndexedRows:
    """A map-style dataset adding each row's position as `pair_index` (the reference table's key)."""

    def __init__(self, rows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.rows[int(index)], "pair_index": int(index)}


def check_pairs(rows) -> None:
    """Every record needs a non-empty `rejected` answer different from its chosen one."""
    for row in rows:
        where = row.get("source") or row.get("id")
        if not row["rejected"].strip():
            raise ValueError(f"{where}: field 'rejected' is missing or empty (DPO needs the opposite answer)")
        if row["rejected"].strip() == row["answer"].strip():
            raise ValueError(f"{where}: field 'rejected' equals the chosen answer")


class PairCollator:
    """rows -> one batch of 2B sequences: rows[i] with its answer at i, with `rejected` at B + i.

    The batch holds the TrainingCollator keys (labels mark the response tokens) plus `pair_index`
    (B,) when the rows carry one (see IndexedRows).
    """

    def __init__(self, processor, max_length: int = 0, **kwargs) -> None:
        self.inner = TrainingCollator(processor, max_length=max_length, **kwargs)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        check_pairs(rows)
        batch = self.inner(list(rows) + [{**row, "answer": row["rejected"]} for row in rows])
        if all("pair_index" in row for row in rows):
            batch["pair_index"] = torch.tensor([row["pair_index"] for row in rows], dtype=torch.long)
        return batch


def sequence_logps(forward: Callable, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probabilities: sums over each response's tokens (eos included).

    `forward` is the model or its DeepSpeed engine; the safety head is not run.
    """
    inputs = plain_model_inputs({k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS})
    # the response span without the labels (a prefix-LM family attends within the prompt both ways)
    logits = forward(**inputs, prompt_mask=batch["labels"] == IGNORE_INDEX, run_head=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    logps = (token_logprobs(logits, labels.clamp(min=0)) * mask).sum(dim=1)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


@torch.no_grad()
def reference_logps(model, dataset, collate: PairCollator, batch_size: int, *, forward: Callable | None = None,
                    reference: str = REFERENCE_START, device: torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(len(dataset), 2) float32 table of [chosen, rejected] log-probabilities, on CPU.

    `model` is the attached model, as it is (`reference` "start") or with its LoRA disabled
    ("base"); `forward` the callable to run (its DeepSpeed engine; default the model). Rows are
    sharded over the processes and the table all-reduced, every process running the same number of
    batches (ZeRO-3 gathers in step).
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference: must be one of {list(REFERENCES)}, got {reference!r}")
    forward = forward or model
    shard = (context() if dist.is_initialized() else DistContext()).padded_shard(len(dataset))
    valid = shard.valid                                   # the rest of shard.indices is padding, discarded
    table = torch.zeros(len(dataset), 2, dtype=torch.float32)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    lora_state = model.base.disable_adapter() if reference == REFERENCE_BASE else nullcontext()
    with lora_state:
        for start in range(0, len(shard.indices), batch_size):
            indices = shard.indices[start:start + batch_size]
            batch = to_device(collate([dataset[j] for j in indices]), device, dtype)
            chosen, rejected = sequence_logps(forward, batch)
            for k, j in enumerate(indices):
                if start + k < valid:
                    table[j, 0], table[j, 1] = chosen[k].float().cpu(), rejected[k].float().cpu()
    model.train(was_training)
    return all_reduce(table)                              # each row was filled by exactly one process
