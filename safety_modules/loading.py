"""Load a base VLM and its processor from a local folder, or build the tiny one.

Why local only: nothing in tests or the default run may download from a hub. A model spec is
`tiny` (tiny LLaVA), `tiny-next` (tiny LLaVA-NeXT) or a folder written by `save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_SPECS = {"tiny": "llava", "tiny-next": "llava_next"}


def load_base(spec: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
              seed: int = 0, **tiny_sizes: int):
    """(model, processor) for `spec`; the model is in eval mode."""
    if spec in TINY_SPECS:
        from safety_modules.tiny import build_tiny_llava
        model, processor = build_tiny_llava(seed=seed, family=TINY_SPECS[spec], **tiny_sizes)
    else:
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(f"model {spec!r}: not a local folder and not one of {sorted(TINY_SPECS)} "
                                    "(download checkpoints yourself; nothing is fetched from a hub)")
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or "auto", local_files_only=True)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, processor
