"""Qwen2-VL and Qwen2.5-VL: dynamic resolution, patches merged 2 x 2, 3-D M-RoPE positions.

Quirk: the model's M-RoPE positions come from `input_ids`, the token types and `image_grid_thw`
(`get_rope_index`); called with `inputs_embeds` alone it silently falls back to 1-D positions, so the
adapter computes them, with the safety slots typed as text. Qwen2.5-VL's tower also permutes its
patches into attention windows, which the safety projector's grid undoes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.vision_utils import get_vision_window_index

from safety_modules.families.base import DynamicResolutionAdapter, VisionFeatures, register_family

IMAGE_TYPE = 1  # `mm_token_type_ids` value of an image position (0 = text)
DEEPSTACK = "deepstack_features"


class Qwen2VLAdapter(DynamicResolutionAdapter):
    model_types = ("qwen2_vl",)
    image_input_names = ("image_grid_thw",)

    def vision_width(self, config) -> int:
        return config.vision_config.embed_dim

    def _unwindow(self, hidden: torch.Tensor, grid_thw: torch.Tensor, vision_config) -> torch.Tensor:
        """Patches in the processor's order (windows undone); Qwen2-VL has no windows."""
        return hidden

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor, image_inputs: dict,
                       feature_layer: int) -> VisionFeatures:
        grid_thw, out = self._encode(model, pixel_values, image_inputs, "lay out its patches")
        vc = model.config.vision_config
        hidden = self._unwindow(out.hidden_states[feature_layer], grid_thw, vc)
        merge = vc.spatial_merge_size
        patches = []
        for image_hidden, (t, h, w) in zip(hidden.split(grid_thw.prod(-1).tolist()), grid_thw.tolist()):
            # the processor orders patches (t, h/m, w/m, m, m): merge windows first
            grid = image_hidden.reshape(t, h // merge, w // merge, merge, merge, -1)
            grid = grid.permute(0, 1, 3, 2, 4, 5).reshape(t, h, w, -1).mean(0)
            patches.append(self._to_grid(grid, model.config))
        extras = [{"image_grid_thw": row, **self._image_extras(out, i)} for i, row in enumerate(grid_thw)]
        return VisionFeatures(base=list(out.pooler_output), patches=torch.stack(patches), extras=extras)

    def _image_extras(self, encoder_output, index: int) -> dict:
        """What else of the encoder's output image `index` needs later (nothing, for Qwen2-VL)."""
        return {}

    def llm_inputs(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   image_positions: torch.Tensor, vision: VisionFeatures | None,
                   prompt_mask: torch.Tensor | None = None) -> dict:
        """3-D M-RoPE `position_ids` from the sequence, the safety slots counted as text."""
        token_types = image_positions.long() * IMAGE_TYPE
        grid_thw = torch.stack([e["image_grid_thw"] for e in vision.extras]) if vision is not None else None
        position_ids, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=token_types, image_grid_thw=grid_thw,
                                               attention_mask=attention_mask)
        return {"position_ids": position_ids}


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    model_types = ("qwen2_5_vl",)

    def vision_width(self, config) -> int:
        return config.vision_config.hidden_size

    def _unwindow(self, hidden: torch.Tensor, grid_thw: torch.Tensor, vision_config) -> torch.Tensor:
        window_index, _ = get_vision_window_index(grid_thw, vision_config.spatial_merge_size,
                                                  vision_config.window_size, vision_config.patch_size)
        unit = vision_config.spatial_merge_size ** 2
        blocks = hidden.reshape(-1, unit, hidden.shape[-1])
        return blocks[torch.argsort(window_index.to(hidden.device))].reshape(hidden.shape)


register_family(Qwen2VLAdapter())
register_family(Qwen2_5_VLAdapter())


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: Qwen2-VL's layout and M-RoPE, plus DeepStack.

    Quirk: DeepStack adds the tower's intermediate features to the LLM's first layers at the image
    positions, which cannot be passed as embeddings: the model receives its own encoder outputs
    (`mm_encoder_outputs`) and finds the image positions by the image token's embedding, which the
    feature positions keep; only the safety slots carry other vectors.
    """

    model_types = ("qwen3_vl",)
    features_in_embeds = False

    def vision_width(self, config) -> int:
        return config.vision_config.hidden_size

    def _image_extras(self, encoder_output, index: int) -> dict:
        return {DEEPSTACK: [layer[index] for layer in encoder_output.deepstack_features]}

    def llm_inputs(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   image_positions: torch.Tensor, vision: VisionFeatures | None,
                   prompt_mask: torch.Tensor | None = None) -> dict:
        inputs = super().llm_inputs(model, input_ids, attention_mask, image_positions, vision, prompt_mask)
        if vision is not None:
            # Qwen3-VL's modeling module, heavy, is imported only when a Qwen3-VL model runs
            from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

            layers = len(vision.extras[0][DEEPSTACK])
            inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithDeepstackFeatures(
                pooler_output=tuple(vision.base),
                deepstack_features=[tuple(e[DEEPSTACK][layer] for e in vision.extras) for layer in range(layers)],
            )}
        return inputs


register_family(Qwen3VLAdapter())
