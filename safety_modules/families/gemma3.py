"""Gemma 3 (`Gemma3ForConditionalGeneration`): SigLIP features pooled to a fixed count per image.

Quirks: `token_type_ids` mark image positions, whose attention is bidirectional within an image;
called with `inputs_embeds` alone the mask is plain causal, so the adapter passes them, the safety
slots typed as text. `processor.image_token` is the start-of-image marker, not the soft placeholder
the features fill, so the slots are the tokenizer's `image_token`. And Gemma 3's
`prepare_inputs_for_generation` does not name `inputs_embeds`, which `generate` requires.
"""

from __future__ import annotations

import torch
from torch import nn

from safety_modules.families.base import PooledFeaturesAdapter, VisionFeatures, register_family

IMAGE_TYPE = 1  # `token_type_ids` value of an image position (0 = text)


class AcceptsInputsEmbeds:
    """A model's own `prepare_inputs_for_generation` with `inputs_embeds` in its signature.

    `generate` reads the signature to decide whether a model can start from embeddings; the
    model's method already passes them on through `**kwargs`. A callable object (not a closure) so
    that a deep copy of the model calls its own copy.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, input_ids, inputs_embeds=None, **kwargs):
        return type(self.model).prepare_inputs_for_generation(self.model, input_ids, inputs_embeds=inputs_embeds,
                                                              **kwargs)


class Gemma3Adapter(PooledFeaturesAdapter):
    model_types = ("gemma3",)

    def image_token_id(self, config) -> int:
        return config.image_token_id

    def processor_image_token_id(self, processor) -> int:
        return processor.tokenizer.image_token_id

    def llm_inputs(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   image_positions: torch.Tensor, vision: VisionFeatures | None,
                   prompt_mask: torch.Tensor | None = None) -> dict:
        """`token_type_ids`: the image positions (bidirectional within an image); slots are text."""
        return {"token_type_ids": image_positions.long() * IMAGE_TYPE}

    def prepare_generation(self, model: nn.Module) -> None:
        if not isinstance(model.__dict__.get("prepare_inputs_for_generation"), AcceptsInputsEmbeds):
            model.prepare_inputs_for_generation = AcceptsInputsEmbeds(model)


register_family(Gemma3Adapter())
