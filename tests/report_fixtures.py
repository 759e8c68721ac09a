"""A small UnsafeConcepts folder written by hand, shared by the report and judge-check tests (imported by
test modules; not a test file)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def write_uc_folder(root: Path, rows: list[dict], names: list[str]) -> Path:
    """`root` in the published layout: one 8x8 image per row (`images/<i>.png`, a colour of its own),
    metadata.jsonl with the rows, and perception_metadata.jsonl whose option A is the row's concept and
    B-D the first other `names`."""
    (root / "images").mkdir(parents=True)
    meta, perception = [], []
    for i, fields in enumerate(rows):
        row = {"image_filename": f"images/{i}.png", **fields}
        Image.new("RGB", (8, 8), (20 * i, 40, 90)).save(root / row["image_filename"])
        concept = row["unsafe_concept"]
        options = [concept] + [n for n in names if n != concept][:3]
        meta.append(row)
        perception.append({**row, "option_str": " \n".join(f"{l}: {o}" for l, o in zip("ABCD", options)),
                           "correct_option": "A"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in meta))
    (root / "perception_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in perception))
    return root
