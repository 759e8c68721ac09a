"""Load a base VLM and its processor from a local folder, or build one from a config.

Why local only: nothing in tests or the default run may download from a hub. A model spec is
`tiny` (tiny LLaVA), `tiny-next` (tiny LLaVA-NeXT), `tiny-<model_type>` (a tiny random model of
any family in base_models/tiny_families.py, e.g. `tiny-qwen2_vl`), `shape:NAME` (random weights of a real model's
shape, e.g. `shape:llava-1.5-7b`, see base_models/shapes.py) or a folder written by
`save_pretrained`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from base_models.shapes import random_llava
from base_models.tiny import build_tiny_llava
from base_models.tiny_families import build_tiny_family, tiny_families
from safety_modules.input_format import PROCESSOR_PREPROCESS, configure_input
from safety_modules.processors import load_processor

TINY_PREFIX = "tiny-"
TINY_LLAVA_SPECS = {"tiny": "llava", "tiny-next": "llava_next", "tiny-llava": "llava", "tiny-llava_next": "llava_next"}
TINY_SPECS = {**{TINY_PREFIX + family: family for family in tiny_families()}, **TINY_LLAVA_SPECS}
SHAPE_PREFIX = "shape:"


def _shape_device() -> str:
    """Random 7B weights are drawn on this process's GPU (no full CPU copy per rank), else on CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return "cpu"


def load_base(spec: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
              seed: int = 0, image_preprocess: str = PROCESSOR_PREPROCESS, conversation: str = "",
              **tiny_sizes: int):
    """(model, processor) for `spec`; the model is in eval mode. `image_preprocess` and
    `conversation` format its inputs (see `safety_modules.input_format`), for training and
    evaluation alike."""
    if spec in TINY_LLAVA_SPECS:
        model, processor = build_tiny_llava(seed=seed, family=TINY_SPECS[spec], **tiny_sizes)
    elif spec in TINY_SPECS:
        if tiny_sizes:
            raise ValueError(f"model {spec!r}: tiny sizes {sorted(tiny_sizes)} apply to the tiny LLaVA models only")
        model, processor = build_tiny_family(TINY_SPECS[spec], seed=seed)
    elif spec.startswith(SHAPE_PREFIX):
        build_device = device or _shape_device()
        build_dtype = dtype or (torch.bfloat16 if str(build_device).startswith("cuda") else torch.float32)
        model, processor = random_llava(spec[len(SHAPE_PREFIX):], build_device, build_dtype, seed=seed)
    else:
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(f"model {spec!r}: not a local folder, not one of {sorted(TINY_SPECS)} and not "
                                    f"{SHAPE_PREFIX}NAME "
                                    "(download checkpoints yourself; nothing is fetched from a hub)")
        if not any(path.glob("*.safetensors")):
            pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
            raise ValueError(f"model {spec!r}: no .safetensors weights in the folder"
                             + (f" (only pickled {', '.join(pickled[:3])}, which are never unpickled)" if pickled else "")
                             + "; weights are read with use_safetensors=True: convert them with "
                               "save_pretrained(..., safe_serialization=True)")
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or "auto", local_files_only=True,
                                                            use_safetensors=True)
        processor = load_processor(path)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, configure_input(processor, image_preprocess, conversation)
