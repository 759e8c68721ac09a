"""Processors of families whose video processor needs torchvision, built and reloaded without it.

Why: transformers' video processors (Qwen-VL, LLaVA-OneVision, InternVL) import torchvision, which
a CPU-only install may lack, and a processor cannot even be constructed, saved or loaded without its
video processor there. Images never need it, so `image_only(cls)` is the family's own processor
class minus the video part: same name (what `save_pretrained` records), same image and text path.
Pixtral's processor module imports its torchvision image processor for one helper; see
`pixtral_processor_class`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import transformers

VIDEO = "video"
_IMAGE_ONLY: dict[type, type] = {}


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def image_only(processor_cls: type) -> type:
    """`processor_cls` without its video processor (the class is made once and reused)."""
    if processor_cls not in _IMAGE_ONLY:
        class ImageOnly(processor_cls):
            @classmethod
            def get_attributes(cls) -> list[str]:
                return [name for name in super().get_attributes() if VIDEO not in name]

            def check_argument_for_proper_class(self, argument_name, argument):
                if argument is None and VIDEO in argument_name:
                    return None
                return super().check_argument_for_proper_class(argument_name, argument)

        ImageOnly.__name__ = processor_cls.__name__
        ImageOnly.__qualname__ = processor_cls.__qualname__
        _IMAGE_ONLY[processor_cls] = ImageOnly
    return _IMAGE_ONLY[processor_cls]


def without_video(processor_cls: type, **kwargs):
    """`processor_cls(**kwargs)` with no video processor."""
    return image_only(processor_cls)(**{k: v for k, v in kwargs.items() if VIDEO not in k})


def pixtral_processor_class() -> type:
    """`PixtralProcessor`, importable without torchvision.

    Why: transformers' pixtral processing module imports its torchvision image processor for one
    helper (`get_resize_output_image_size`, used only to count tokens ahead of time); the PIL
    backend defines the same helper. Without torchvision that module is registered in its place.
    """
    name = "transformers.models.pixtral.image_processing_pixtral"
    if not torchvision_available() and name not in sys.modules:
        from transformers.models.pixtral import image_processing_pil_pixtral  # only without torchvision

        shim = types.ModuleType(name)
        shim.get_resize_output_image_size = image_processing_pil_pixtral.get_resize_output_image_size
        sys.modules[name] = shim
    # imported after the shim is registered: the module imports the one it stands in for
    from transformers.models.pixtral.processing_pixtral import PixtralProcessor

    return PixtralProcessor


def processor_class(name: str) -> type:
    """The transformers processor class called `name`."""
    if name == "PixtralProcessor":
        return pixtral_processor_class()
    processor_cls = getattr(transformers, name or "", None)
    if processor_cls is None:
        raise ValueError(f"unknown processor_class {name!r}")
    return processor_cls


def load_processor(path: str | Path):
    """The processor saved in `path`; without torchvision, the image-only one of its class."""
    try:
        return transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    except (ImportError, OSError, ValueError, AttributeError):
        config = Path(path) / "processor_config.json"
        if torchvision_available() or not config.is_file():
            raise
    try:
        processor_cls = processor_class(json.loads(config.read_text()).get("processor_class"))
    except ValueError as exc:
        raise ValueError(f"{config}: {exc}") from None
    return image_only(processor_cls).from_pretrained(path, local_files_only=True)
