"""Idefics3 and SmolVLM (v1) checkpoints (`Idefics3ForConditionalGeneration`, model_type idefics3).

Quirks: each image is split into tiles plus a global view, every one a run of placeholders broken by
row/column markers, and `pooler_output` is per sample, not per image (the framework gives each
sample one image, so the two agree). The slots sit in front of the image's first marker; the
safety projector reads the global view, the last sub-image of each sample.
"""

from __future__ import annotations

import torch
from torch import nn

from safety_modules.families.base import FamilyAdapter, VisionFeatures, register_family

PIXEL_MASK = "pixel_attention_mask"


class Idefics3Adapter(FamilyAdapter):
    model_types = ("idefics3",)
    image_input_names = (PIXEL_MASK,)
    llm_module_name = "text_model"

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor, image_inputs: dict,
                       feature_layer: int) -> VisionFeatures:
        out = model.get_image_features(pixel_values=pixel_values, pixel_attention_mask=image_inputs.get(PIXEL_MASK),
                                       output_hidden_states=True, return_dict=True)
        # the model keeps the real sub-images only (padding ones are all zero): the last is the global view
        real = (pixel_values.flatten(2) != 0).any(-1)
        if bool((real.sum(1) == 0).any()):
            raise ValueError(f"{model.config.model_type}: a sample without an image; the framework gives each "
                             "sample one image")
        last_real = real.sum(1).cumsum(0) - 1
        hidden = out.hidden_states[feature_layer].index_select(0, last_real)
        base = list(out.pooler_output)
        return VisionFeatures(base=base, patches=self._select_patches(hidden, model.config),
                              extras=[{} for _ in base])


register_family(Idefics3Adapter())
