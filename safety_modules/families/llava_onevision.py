"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): any-resolution crops, SigLIP, no CLS.

Quirk: its processor has no `num_additional_image_tokens`, so the safety slots are reserved through
its own image-token expansion; `batch_num_images` (per sample) travels with `image_sizes`. The
safety projector reads the first crop, as for LLaVA-NeXT.
"""

from __future__ import annotations

from safety_modules.families.base import FamilyAdapter, register_family
from safety_modules.families.llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_types = ("llava_onevision",)
    image_input_names = ("image_sizes", "batch_num_images")
    reserve = FamilyAdapter.reserve


register_family(LlavaOnevisionAdapter())
