"""Mistral 3 (`Mistral3ForConditionalGeneration`): a Pixtral tower at each image's own resolution.

Quirk: every image is a different patch grid, all images packed in one sequence; the safety
projector needs a fixed grid, so each image's patches are resampled to `DYNAMIC_PATCH_GRID`. Its
image runs are broken by row markers (`[IMG_BREAK]`), which the slots in front of the image leave alone.
"""

from __future__ import annotations

import torch
from torch import nn

from safety_modules.families.base import DYNAMIC_PATCH_GRID, FamilyAdapter, VisionFeatures, register_family


class Mistral3Adapter(FamilyAdapter):
    model_types = ("mistral3",)
    image_input_names = ("image_sizes",)

    def patch_grid(self, config) -> int:
        return DYNAMIC_PATCH_GRID

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor, image_inputs: dict,
                       feature_layer: int) -> VisionFeatures:
        image_sizes = self._required_input(model, image_inputs, "image_sizes", "cut its patch grids")
        out = model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes,
                                       output_hidden_states=True, return_dict=True)
        patch = model.config.vision_config.patch_size
        grids = [(int(h) // patch, int(w) // patch) for h, w in image_sizes.tolist()]
        hidden = out.hidden_states[feature_layer].squeeze(0)  # every image's patches, one sequence
        patches = [self._to_grid(x.reshape(h, w, -1), model.config)
                   for x, (h, w) in zip(hidden.split([h * w for h, w in grids]), grids)]
        return VisionFeatures(base=list(out.pooler_output), patches=torch.stack(patches),
                              extras=[{"image_sizes": size} for size in image_sizes])


register_family(Mistral3Adapter())
