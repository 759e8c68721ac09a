"""Small data and adapters shared by the training tests (imported by test modules; not a test file).

The red/blue world: 32x32 images, even indices red (safe), odd indices blue (unsafe), each with
seeded noise, so a tiny model can learn the split in a few steps. Each test module gives the
record fields it needs (answers, labels, rejected answers) through `record`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from safety_modules import SafetyConfig, add_lora, attach, save_adapter
from base_models.loading import load_base


def write_red_blue_world(root: Path, record: Callable[[int, bool], dict[str, Any]], *, n: int = 16, seed: int = 0,
                         file_name: str = "train.jsonl", extra_lines: tuple[str, ...] = ()) -> Path:
    """Write `n` images under root/images and one record per image (`record(i, unsafe)` plus its
    image path) to root/records/file_name, followed by `extra_lines` verbatim; returns the file."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "records").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        unsafe = i % 2 == 1
        colour = np.array([0, 0, 220] if unsafe else [220, 0, 0])
        pixels = np.clip(colour + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", **record(i, unsafe)}))
    path = root / "records" / file_name
    path.write_text("\n".join(lines + list(extra_lines)) + "\n")
    return path


def save_stage2_adapter(path: Path, safety: SafetyConfig) -> Path:
    """A stage-2 adapter for the tiny model: safety modules + a LoRA whose B matrices are non-zero,
    so that "LoRA disabled" (the baselines' and PPO's reference) is a different model."""
    base, processor = load_base("tiny")
    torch.manual_seed(0)
    model = add_lora(attach(base, safety, processor), r=4, alpha=8)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    save_adapter(model, path)
    return path
