"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one fixed-size crop per image.

Its processor counts `num_additional_image_tokens` into every image's placeholder run, so the safety
slots are reserved there: the first `k` positions of each run.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from safety_modules.families.base import FamilyAdapter, VisionFeatures, register_family


class LlavaAdapter(FamilyAdapter):
    model_types = ("llava",)

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor, image_inputs: dict,
                       feature_layer: int) -> VisionFeatures:
        out = model.get_image_features(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        patches = self._select_patches(out.hidden_states[feature_layer], model.config)
        return VisionFeatures(base=list(out.pooler_output), patches=patches, extras=[{} for _ in out.pooler_output])

    def reserve(self, processor, num_safety_tokens: int):
        """Both LLaVA processors count `num_additional_image_tokens` into every image's run."""
        if not hasattr(processor, "num_additional_image_tokens"):
            raise TypeError(f"{type(processor).__name__} has no num_additional_image_tokens: cannot reserve "
                            "safety-token positions (is this a LLaVA-family processor?)")
        reserved = copy.copy(processor)
        reserved.num_additional_image_tokens = processor.num_additional_image_tokens + num_safety_tokens
        return reserved


register_family(LlavaAdapter())
