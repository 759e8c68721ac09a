"""Safe images beside UnsafeConcepts: the folder, and the reference code's rule that splits it.

Why: false refusal (a safe image called unsafe) is the price of every alignment method, and the
published benchmark holds unsafe images only. The reference code adds an ImageNet subset, one image
per class, and splits it with its own rule (`SafeConcept_train_test_split`); its RLHF test then takes
as many safe test images as unsafe ones.

The folder, as the reference writes it:
    <root>/metadata.json    [{"image_filename": ..., "concept": "goldfish"}, ...]
    <root>/<image files>
A relative `image_filename` is read inside the folder. The reference wrote the path it saved each
image under (absolute, or relative to its own working folder) with every image directly in the
folder, so an absolute path, or a relative one not found inside the folder, is read as its file
name inside the folder.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from concept_world.concepts import SAFE_CATEGORY
from eval.benchmarks.unsafeconcepts import REFERENCE_SEED, REFERENCE_TRAIN_FRACTION, Row
from eval.core.items import DataError

SAFE_METADATA = "metadata.json"
SPLITS = ("all", "train", "test")


@dataclass
class SafeImages:
    root: Path
    rows: list[Row]        # category "Safe", is_safe True, safe_root = root


def _image_name(root: Path, image_filename: str) -> str:
    path = Path(image_filename)
    if path.is_absolute() or (not (root / path).is_file() and (root / path.name).is_file()):
        return path.name
    return image_filename


def load_safe_images(root: str | Path) -> SafeImages:
    """Read `<root>/metadata.json`; a DataError naming the file, the entry and the field otherwise."""
    root = Path(root)
    path = root / SAFE_METADATA
    if not path.is_file():
        raise DataError(f"{root}: not a safe-image folder ({SAFE_METADATA} is missing; expected a JSON list of "
                        '{"image_filename", "concept"} as the reference code writes it)')
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected a non-empty JSON list of {{image_filename, concept}} objects")
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        for field in ("image_filename", "concept"):
            value = entry.get(field)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: field {field!r} must be a non-empty string, got {value!r}")
        image = _image_name(root, entry["image_filename"])
        if image in seen:
            raise DataError(f"{where}: field 'image_filename': image {image!r} is listed twice (also entry {seen[image]})")
        seen[image] = i
        rows.append(Row(image=image, category=SAFE_CATEGORY, concept=entry["concept"], is_safe=True, split=None,
                        source=where, safe_root=root))
    return SafeImages(root, rows)


def safe_reference_split(rows: Sequence[Row], seed: int = REFERENCE_SEED,
                         train_fraction: float = REFERENCE_TRAIN_FRACTION) -> tuple[list[Row], list[Row]]:
    """(train, test) rows, in the reference's order, by `SafeConcept_train_test_split`'s rule: the
    whole list in metadata order shuffled by an RNG seeded with `seed`, the first int(n * 0.8) train."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    n_train = int(len(order) * train_fraction)
    return order[:n_train], order[n_train:]


def select_safe_rows(safe: SafeImages, split: str | None) -> list[Row]:
    """Rows of `split`: None/'all' every row, 'train'/'test' the reference rule's part."""
    if split in (None, "all"):
        return list(safe.rows)
    if split not in SPLITS:
        raise DataError(f"{safe.root / SAFE_METADATA}: a safe-image folder has the splits {list(SPLITS)} (the "
                        f"reference 80/20 rule), got {split!r}")
    train, test = safe_reference_split(safe.rows)
    return train if split == "train" else test
