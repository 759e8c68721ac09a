"""PaliGemma (`PaliGemmaForConditionalGeneration`): SigLIP patches, a linear projector, a Gemma prefix LM.

Quirks, one a line:
- `token_type_ids` mark prompt (prefix 0, bidirectional) vs response (1, causal), not images: slots are prefix.
- The response span comes from the caller as `prompt_mask` (read off the labels); `generate` types new tokens 1.
- The processor appends any text to the prefix: a response must be its `suffix` (`encode_batch(responses=)`).
- Each image expands to the tower's whole patch grid (no CLS, no pooling); positions are 1-indexed by the model.
- `prepare_inputs_for_generation` does not name `inputs_embeds`, which `generate` requires (as Gemma 3).
"""

from __future__ import annotations

import torch
from torch import nn

from safety_modules.families.base import PooledFeaturesAdapter, VisionFeatures, register_family
from safety_modules.families.gemma3 import AcceptsInputsEmbeds

PREFIX_TYPE = 0    # `token_type_ids` of the prompt (bidirectional prefix)
RESPONSE_TYPE = 1  # `token_type_ids` of the response (causal suffix)


class PaliGemmaAdapter(PooledFeaturesAdapter):
    model_types = ("paligemma",)

    def llm_inputs(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   image_positions: torch.Tensor, vision: VisionFeatures | None,
                   prompt_mask: torch.Tensor | None = None) -> dict:
        """`token_type_ids`: the prompt (safety slots included) as prefix, the rest as response."""
        if prompt_mask is None:
            return {"token_type_ids": torch.full_like(input_ids, PREFIX_TYPE)}
        if prompt_mask.shape != input_ids.shape:
            raise ValueError(f"paligemma: prompt_mask {tuple(prompt_mask.shape)} does not match input_ids "
                             f"{tuple(input_ids.shape)}")
        prompt = prompt_mask.to(input_ids.device).bool()
        return {"token_type_ids": torch.where(prompt, PREFIX_TYPE, RESPONSE_TYPE).to(input_ids.dtype)}

    def prepare_generation(self, model: nn.Module) -> None:
        if not isinstance(model.__dict__.get("prepare_inputs_for_generation"), AcceptsInputsEmbeds):
            model.prepare_inputs_for_generation = AcceptsInputsEmbeds(model)


register_family(PaliGemmaAdapter())
