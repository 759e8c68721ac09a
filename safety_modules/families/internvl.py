"""InternVL (`InternVLForConditionalGeneration`): each image cut into tiles plus a thumbnail.

Quirk: the processor does not return how many tiles each image has; the adapter reads it off the
placeholder runs (`<img>` ... `</img>`, `image_seq_length` placeholders per tile). The safety
projector reads each image's last tile: the thumbnail, the whole image at the tower's resolution.
"""

from __future__ import annotations

import torch
from torch import nn

from safety_modules.families.base import FamilyAdapter, VisionFeatures, placeholder_runs, register_family

TILES = "num_patches"


def _square(size) -> int:
    """One side of a square size given as an int or a (height, width) pair."""
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ValueError(f"internvl: non-square vision size {list(size)} is not supported")
        return int(size[0])
    return int(size)


class InternVLAdapter(FamilyAdapter):
    model_types = ("internvl",)
    image_input_names = (TILES,)

    def patch_grid(self, config) -> int:
        vc = config.vision_config
        return _square(vc.image_size) // _square(vc.patch_size)

    def tokens_per_tile(self, config) -> int:
        return round(self.num_patches(config) * config.downsample_ratio ** 2)

    def image_inputs_from_ids(self, config, input_ids: torch.Tensor, num_safety_tokens: int) -> dict:
        """Tiles per image: per image a run of `k` safety slots, then (after `<img>`) its tiles' run."""
        runs = placeholder_runs(input_ids, self.image_token_id(config))
        per_tile = self.tokens_per_tile(config)
        features = runs[1::2] if num_safety_tokens else runs
        if num_safety_tokens and (runs[0::2] != [num_safety_tokens] * len(runs[0::2]) or len(runs) % 2):
            raise ValueError(f"internvl: placeholder runs {runs} are not [{num_safety_tokens} safety slots, tiles] per "
                             "image: build inputs with the processor returned by attach()")
        if any(n % per_tile for n in features):
            raise ValueError(f"internvl: image placeholder runs {features} are not whole tiles of {per_tile}")
        return {TILES: torch.tensor([n // per_tile for n in features], device=input_ids.device)}

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor, image_inputs: dict,
                       feature_layer: int) -> VisionFeatures:
        tiles = image_inputs.get(TILES)
        if tiles is None:
            raise ValueError("internvl needs the tiles per image (`num_patches`), read off `input_ids`")
        out = model.get_image_features(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        counts = [int(n) for n in tiles]
        if sum(counts) != pixel_values.shape[0]:
            raise ValueError(f"internvl: the placeholders show {sum(counts)} tiles, pixel_values has "
                             f"{pixel_values.shape[0]}")
        last_tile = torch.tensor(counts, device=pixel_values.device).cumsum(0) - 1
        hidden = out.hidden_states[feature_layer].index_select(0, last_tile)
        base = [feats.reshape(-1, feats.shape[-1]) for feats in out.pooler_output.split(counts)]
        return VisionFeatures(base=base, patches=self._select_patches(hidden, model.config),
                              extras=[{TILES: n} for n in tiles])


register_family(InternVLAdapter())
