"""What the SFT and DPO baselines share: their section's keys, the held-out slice of their
training records and the summary of a run.

Why a held-out slice: each baseline must be tunable fairly without reading an evaluation split.
`heldout_fraction` of the training records (seeded) is kept out of training; before/after metrics
are reported on it and `safevlm sft/dpo --sweep` (training/recipes/sweep.py) picks the setting that
does best there. (A run with a validation split chooses in the pipeline instead, on that split,
with the same criterion and budget for every method: `safevlm/selection.py`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from safety_modules.configio import ConfigError
from training.config import MethodSection
from training.records import RecordSet
from training.recipes.common import trainable_parameters


@dataclass
class BaselineSection(MethodSection):
    """Keys both baselines share (a `sft:` / `dpo:` block of a run YAML)."""

    init_from: str = ""          # base of the stage-2 adapter; "": the base recorded beside it, else `model`
    adapter: str = ""            # stage-2 adapter (safety modules + LoRA); "": <run_dir>/../stage2/adapter
    train_tokens: bool = True    # train the LLM-side safety tokens with the LoRA (head, projector: frozen)
    heldout_fraction: float = 0.1    # seeded share of the training records kept out of training
    eval_records: int = 256      # before/after metrics on at most this many records per split (0: all)
    answer_tokens: int = 32      # greedy answers of this many new tokens scored by the rule-based check (0: off)

    def __post_init__(self) -> None:
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError(f"heldout_fraction: must be in [0, 1), got {self.heldout_fraction}")
        for key in ("eval_records", "answer_tokens"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")


def split_heldout(records: RecordSet, fraction: float, seed: int):
    """(training rows, held-out rows or None): a seeded `fraction` of the records held out."""
    n = len(records)
    if not fraction:
        return records.dataset, None
    k = max(1, round(n * fraction))
    if k >= n:
        raise ValueError(f"heldout_fraction={fraction} leaves no training record of {n} in {records.path}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return records.dataset.select(sorted(order[k:])), records.dataset.select(sorted(order[:k]))


def limited(dataset, limit: int):
    """The first `limit` rows (all with 0): the slice before/after metrics are measured on."""
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


@dataclass
class HeldoutSplits:
    """The training rows, the held-out rows (None without a slice) and the measured slices of each."""

    train_rows: Any
    heldout_rows: Any
    measured: dict[str, Any]          # "train" (and "heldout"): at most `eval_records` rows each

    @property
    def report(self) -> str:
        """The slice the headline before/after numbers come from: the held-out one when there is one."""
        return "heldout" if "heldout" in self.measured else "train"


def heldout_splits(records: RecordSet, cfg, wrap: Callable[[Any], Any] = lambda rows: rows) -> HeldoutSplits:
    """The records split into training rows and the held-out slice (see split_heldout); `wrap` turns
    a measured slice into what the recipe evaluates (DPO: indexed pairs)."""
    train_rows, heldout_rows = split_heldout(records, cfg.heldout_fraction, cfg.seed)
    measured = {"train": wrap(limited(train_rows, cfg.eval_records))}
    if heldout_rows is not None:
        measured["heldout"] = wrap(limited(heldout_rows, cfg.eval_records))
    return HeldoutSplits(train_rows, heldout_rows, measured)


def baseline_summary(stage: str, records: RecordSet, splits: HeldoutSplits, model, adapter, last: dict,
                     before: dict, after: dict, **headline: Any) -> dict[str, Any]:
    """A baseline run's summary: its records, the last step's metrics, `headline` values and every
    slice's metrics before and after training."""
    return {
        "stage": stage, "adapter": str(adapter),
        "records": len(splits.train_rows),
        "heldout_records": 0 if splits.heldout_rows is None else len(splits.heldout_rows),
        "skipped_records": records.skipped, **last, **headline, "measured_on": splits.report,
        **{f"{name}_before": before[name] for name in before}, **{f"{name}_after": after[name] for name in after},
        "trainable_parameters": trainable_parameters(model),
    }
