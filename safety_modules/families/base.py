"""Per-family adapters: the little a family must say so the framework can attach to it.

Why a registry instead of forked modeling code: transformers 5 gives every VLM the same public
surface (`get_image_features`, `get_input_embeddings`, `inputs_embeds`), so a family differs only
in where the patch features for the safety projector come from and how its image placeholders are
counted. Adding a family (gemma3, qwen2_5_vl, ...) means adding one small class here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VisionFeatures:
    """The vision tower's output for a batch of images, computed once and reused.

    base: per image, the model's own projected features (what its placeholders receive).
    patches: (num_images, P, vision_width) patch features (CLS dropped) for the safety projector.
    """

    base: list[torch.Tensor]
    patches: torch.Tensor


class FamilyAdapter:
    """How one model family exposes vision features and placeholder layout."""

    model_types: tuple[str, ...] = ()

    def vision_width(self, config) -> int:
        return config.vision_config.hidden_size

    def text_width(self, config) -> int:
        return config.text_config.hidden_size

    def text_heads(self, config) -> int:
        return config.text_config.num_attention_heads

    def num_patches(self, config) -> int:
        """Patch features per image fed to the safety projector (CLS excluded)."""
        vc = config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor,
                       image_sizes: torch.Tensor | None, feature_layer: int) -> VisionFeatures:
        raise NotImplementedError

    def _select_patches(self, hidden: torch.Tensor, config) -> torch.Tensor:
        """Drop the leading non-patch tokens (CLIP's CLS) by shape, whatever the tower."""
        extra = hidden.shape[1] - self.num_patches(config)
        if extra < 0:
            raise ValueError(f"vision tower gave {hidden.shape[1]} tokens per image, expected at least "
                             f"{self.num_patches(config)} patches")
        return hidden[:, extra:]


_REGISTRY: dict[str, FamilyAdapter] = {}


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def family_for(config) -> FamilyAdapter:
    """The adapter for a model config's `model_type`, or an error listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(f"no safety-module family adapter for model_type {model_type!r}; "
                         f"supported: {sorted(_REGISTRY)}")
    return _REGISTRY[model_type]
