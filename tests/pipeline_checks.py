"""Checks shared by the pipeline tests (tiny default and real-checkpoint plans)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from training.recipes.registry import exporting_adapters

ADAPTER_STAGES = exporting_adapters()


def assert_adapters_reproduce_outputs(run_dir: Path, base: str | Path, image: Path) -> None:
    """Each stage's adapter and its exported copy, loaded onto a fresh `base`, give identical
    LM and safety logits on `image`."""
    from safety_modules import load_adapter
    from base_models.loading import load_base
    from safety_modules.prompting import build_prompt

    picture = Image.open(image).convert("RGB")
    for stage in ADAPTER_STAGES:
        outputs = []
        for adapter in (run_dir / stage / "adapter", run_dir / "adapters" / stage):
            plain, processor = load_base(str(base))
            model = load_adapter(plain, adapter, processor).eval()
            batch = model.processor(images=[picture], text=[build_prompt(model.processor, "Is this image safe?")],
                                    return_tensors="pt")
            with torch.no_grad():
                out = model(**batch)
            outputs.append((out.logits, out.safety_logits))
        assert torch.equal(outputs[0][0], outputs[1][0]), stage
        assert torch.equal(outputs[0][1], outputs[1][1]), stage
