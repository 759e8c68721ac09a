"""Mistral 3 (`Mistral3ForConditionalGeneration`): a Pixtral tower at each image's own resolution.

Quirk: every image is a different patch grid, all images packed in one sequence; the safety
projector needs a fixed grid, so each image's patches are resampled to `DYNAMIC_PATCH_GRID`. Its
image runs are broken by row markers (`[IMG_BREAK]`), which the slots in front of the image leave alone.
"""

from __future__ import annotations

import torch
from torch import nn

from safety_modules.families.base import DynamicResolutionAdapter, VisionFeatures, register_family


class Mistral3Adapter(DynamicResolutionAdapter):
    model_types = ("mistral3",)
    image_input_names = ("image_sizes",)

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor, image_inputs: dict,
                       feature_layer: int) -> VisionFeatures:
        image_sizes, out = self._encode(model, pixel_values, image_inputs, "cut its patch grids")
        patch = model.config.vision_config.patch_size
        grids = [(int(h) // patch, int(w) // patch) for h, w in image_sizes.tolist()]
        hidden = out.hidden_states[feature_layer].squeeze(0)  # every image's patches, one sequence
        patches = [self._to_grid(x.reshape(h, w, -1), model.config)
                   for x, (h, w) in zip(hidden.split([h * w for h, w in grids]), grids)]
        return VisionFeatures(base=list(out.pooler_output), patches=torch.stack(patches),
                              extras=[{"image_sizes": size} for size in image_sizes])


register_family(Mistral3Adapter())
