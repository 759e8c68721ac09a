"""The two UnsafeConcepts protocols, one name each: which images are asked which questions.

- `measurement`: the paper's measurement. Every chosen image with each of the five alignment
  questions, perception (multiple choice) for the benchmark's images, the five text-only questions
  per concept; safe images from a safe-image folder get the alignment questions too.
- `rlhf-test`: the reference code's RLHF test. The reference split's unsafe test images (345 on
  the published metadata, in the reference's order), then as many safe test images
  (`safe_test[:len(unsafe_test)]`), one alignment question per image drawn as the reference's
  `eval_rlhf.format_dataset` draws it (numpy seeded 42, `choice(5, size=n, replace=True)` over the
  unsafe rows then the safe rows), greedy decoding, NA counted wrong.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from eval.benchmarks import unsafeconcepts as uc
from eval.benchmarks.safe_images import SafeImages, safe_reference_split, select_safe_rows
from eval.core.items import DataError, EvalItem
from runtime.layout import DataLayout
from safety_modules.labels import ALIGNMENT, PERCEPTION

MEASUREMENT = "measurement"
RLHF_TEST = "rlhf-test"
PROTOCOLS = (MEASUREMENT, RLHF_TEST)
RLHF_TEST_PROMPT_SEED = 42
RLHF_TEST_SPLIT = uc.TEST_SPLIT


def rlhf_test_rows(data: uc.UnsafeConceptsData, safe: SafeImages) -> tuple[list[uc.Row], list[uc.Row]]:
    """(unsafe test rows, safe test rows) of the reference's RLHF test, each in the reference's order."""
    if data.has_split_column:
        raise DataError(f"{DataLayout(data.root).metadata}: the rlhf-test protocol needs the published metadata (its "
                        "reference split); this folder has its own 'split' column (use --protocol measurement)")
    by_image = {row.image: row for row in data.rows}
    unsafe = [by_image[image] for image, part in uc.reference_split(data.rows).items() if part == RLHF_TEST_SPLIT]
    _, safe_test = safe_reference_split(safe.rows)
    return unsafe, safe_test[:len(unsafe)]


def rlhf_test_prompts(n: int, n_prompts: int = len(uc.PROMPTS[ALIGNMENT]),
                      seed: int = RLHF_TEST_PROMPT_SEED) -> list[int]:
    """The alignment question drawn for each of `n` test images (a fresh legacy numpy stream seeded
    as `np.random.seed(seed)` leaves the global one, so the same numbers)."""
    return [int(k) for k in np.random.RandomState(seed).choice(n_prompts, size=n, replace=True)]


def rlhf_test_items(data: uc.UnsafeConceptsData, safe: SafeImages | None, limit: int | None = None,
                    sample: int | None = None, seed: int = 0) -> list[EvalItem]:
    """One alignment item per RLHF-test image; `limit`/`sample` cut the unsafe and the safe part each,
    after the draw, so every image keeps the question the reference asked it."""
    if safe is None:
        raise DataError("the rlhf-test protocol is 345 unsafe + 345 safe test images: give the safe-image folder "
                        "(--safe-data DIR, metadata.json + images as the reference code writes it)")
    unsafe, safe_rows = rlhf_test_rows(data, safe)
    drawn = list(zip(unsafe + safe_rows, rlhf_test_prompts(len(unsafe) + len(safe_rows))))
    parts = (drawn[:len(unsafe)], drawn[len(unsafe):])
    chosen = [pair for part in parts for pair in uc.subsample(part, limit=limit, sample=sample, seed=seed)]
    return [uc.alignment_item(data, row, k) for row, k in chosen]


def protocol_items(protocol: str, data: uc.UnsafeConceptsData, safe: SafeImages | None, split: str | None,
                   tasks: Sequence[str] | None, limit: int | None = None, sample: int | None = None,
                   seed: int = 0) -> list[EvalItem]:
    """The items of `protocol` (see the module docstring) on the benchmark folder and the safe images."""
    if protocol == RLHF_TEST:
        if split not in (None, RLHF_TEST_SPLIT):
            raise ValueError(f"--split: the rlhf-test protocol is the reference split's test images, got {split!r}")
        if tasks and tuple(tasks) != (ALIGNMENT,):
            raise ValueError(f"--tasks: the rlhf-test protocol asks image alignment only, got {list(tasks)}")
        return rlhf_test_items(data, safe, limit, sample, seed)
    if protocol != MEASUREMENT:
        raise ValueError(f"protocol: must be one of {list(PROTOCOLS)}, got {protocol!r}")
    rows = uc.subsample(uc.select_rows(data, split), limit=limit, sample=sample, seed=seed)
    if safe is not None:
        rows += uc.subsample(select_safe_rows(safe, split), limit=limit, sample=sample, seed=seed)
    tasks = tuple(tasks) if tasks else tuple(t for t in uc.TASKS if t != PERCEPTION or data.perception)
    return uc.build_items(data, rows, tasks)
