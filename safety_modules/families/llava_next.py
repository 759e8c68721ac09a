"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): any-resolution crops per image.

The base path packs every crop of an image into a variable number of placeholders; the safety
projector reads the first crop, the whole image resized to the tower's resolution, so its output
size is fixed whatever the image's aspect ratio.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from safety_modules.families.base import VisionFeatures, register_family
from safety_modules.families.llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    model_types = ("llava_next",)
    image_input_names = ("image_sizes",)

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor, image_inputs: dict,
                       feature_layer: int) -> VisionFeatures:
        image_sizes = self._required_input(model, image_inputs, "image_sizes", "lay out its crops")
        out = model.get_image_features(pixel_values=pixel_values, output_hidden_states=True, return_dict=True,
                                       **image_inputs)
        config = model.config
        crops = [
            image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                      patch_size=config.vision_config.image_size)
            for size in image_sizes
        ]
        first_crop = torch.tensor([0] + crops[:-1]).cumsum(0).to(pixel_values.device)
        hidden = out.hidden_states[feature_layer].index_select(0, first_crop)
        return VisionFeatures(base=list(out.pooler_output), patches=self._select_patches(hidden, config),
                              extras=[{"image_sizes": size} for size in image_sizes])


register_family(LlavaNextAdapter())
