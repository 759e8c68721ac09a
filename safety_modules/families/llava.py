"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one fixed-size crop per image."""

from __future__ import annotations

import torch
from torch import nn

from safety_modules.families.base import FamilyAdapter, VisionFeatures, register_family


class LlavaAdapter(FamilyAdapter):
    model_types = ("llava",)

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor,
                       image_sizes: torch.Tensor | None, feature_layer: int) -> VisionFeatures:
        out = model.get_image_features(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        patches = self._select_patches(out.hidden_states[feature_layer], model.config)
        return VisionFeatures(base=list(out.pooler_output), patches=patches)


register_family(LlavaAdapter())
