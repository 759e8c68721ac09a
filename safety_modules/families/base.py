"""Per-family adapters: the little a family must say so the framework can attach to it.

Why a registry instead of forked modeling code: transformers 5 gives every VLM the same public
surface (`get_image_features`, `get_input_embeddings`, `inputs_embeds`), so a family differs only
in a few hooks, and this adapter is the only place that knows a family:
- `image_input_names`: the processor outputs besides `pixel_values` that describe the images
  (`image_grid_thw`, `image_sizes`, ...); collator, guard, rollouts and evaluation carry them by name.
  `image_inputs_from_ids` adds what a processor does not return but the sequence shows.
- `image_features`: the model's own features per image, and patch features on a fixed grid for
  the safety projector (dynamic-resolution towers are resampled to `patch_grid`).
- `llm_inputs`: the extra model inputs computed from the sequence (M-RoPE position ids, token
  types, the model's own encoder outputs), with the safety slots typed as text; it is also where
  the prompt/response span reaches the model (`prompt_mask`), for a prefix-LM family.
- `prepare_generation`: what `generate(inputs_embeds=...)` needs that the model lacks.
- `reserve`: how the processor lays out the safety slots: `k` placeholders in front of each image.

Layout contract: for every family, the image-token placeholders of a batch, read in sequence order,
are per image `k` safety slots followed by exactly that image's feature positions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# Processor outputs that type tokens by modality: the adapter recomputes them with the safety slots
# typed as text, so the processor's own (which counts the slots as image) are never passed on.
TOKEN_TYPE_NAMES = ("mm_token_type_ids", "token_type_ids")

# Side of the fixed patch grid the safety projector reads for towers of dynamic resolution: 24 x 24,
# the grid of LLaVA-1.5's CLIP ViT-L/14 at 336 px, so one safety config serves every family.
DYNAMIC_PATCH_GRID = 24


@dataclass
class VisionFeatures:
    """The vision tower's output for a batch of images, computed once and reused.

    base: per image, the model's own projected features (what its placeholders receive).
    patches: (num_images, P, vision_width) patch features (CLS dropped) for the safety projector.
    extras: per image, what the family needs again after encoding (its `image_input_names` rows,
        its own encoder outputs), so that a subset of images can be reused on its own.
    """

    base: list[torch.Tensor]
    patches: torch.Tensor
    extras: list[dict] = field(default_factory=list)

    def select(self, index: list[int]) -> "VisionFeatures":
        """The features of the images at `index`, in that order."""
        return VisionFeatures(base=[self.base[i] for i in index], patches=self.patches[index],
                              extras=[self.extras[i] for i in index] if self.extras else [])


class FamilyAdapter:
    """How one model family exposes vision features, placeholder layout and its extra inputs."""

    model_types: tuple[str, ...] = ()
    image_input_names: tuple[str, ...] = ()
    llm_module_name = "language_model"   # the language model's module name (what a LoRA targets)
    # False: the model scatters its own image features (passed in `llm_inputs`) into the positions
    # that carry the image token's embedding; the wrapper writes only the safety tokens.
    features_in_embeds = True

    # -- sizes ---------------------------------------------------------------------------------
    def vision_width(self, config) -> int:
        return config.vision_config.hidden_size

    def text_width(self, config) -> int:
        return config.text_config.hidden_size

    def text_heads(self, config) -> int:
        return config.text_config.num_attention_heads

    def patch_grid(self, config) -> int:
        """Side of the square patch grid the safety projector reads (the tower's own, by default)."""
        vc = config.vision_config
        return vc.image_size // vc.patch_size

    def num_patches(self, config) -> int:
        """Patch features per image fed to the safety projector (CLS excluded)."""
        return self.patch_grid(config) ** 2

    def image_token_id(self, config) -> int:
        """The placeholder token whose positions receive image features (and the safety slots)."""
        token = getattr(config, "image_token_id", None)
        return token if token is not None else config.image_token_index

    # -- vision --------------------------------------------------------------------------------
    def image_features(self, model: nn.Module, pixel_values: torch.Tensor, image_inputs: dict,
                       feature_layer: int) -> VisionFeatures:
        raise NotImplementedError

    @staticmethod
    def _required_input(model: nn.Module, image_inputs: dict, name: str, purpose: str) -> torch.Tensor:
        """An image input the family cannot do without, or a ValueError naming it (fail closed)."""
        value = image_inputs.get(name)
        if value is None:
            raise ValueError(f"{model.config.model_type} needs `{name}` (the processor returns it) to {purpose}")
        return value

    def image_inputs_from_ids(self, config, input_ids: torch.Tensor, num_safety_tokens: int) -> dict:
        """Image inputs read off the placeholder layout, for what the processor does not return."""
        return {}

    def _select_patches(self, hidden: torch.Tensor, config) -> torch.Tensor:
        """Drop the leading non-patch tokens (CLIP's CLS) by shape, whatever the tower."""
        extra = hidden.shape[1] - self.num_patches(config)
        if extra < 0:
            raise ValueError(f"vision tower gave {hidden.shape[1]} tokens per image, expected at least "
                             f"{self.num_patches(config)} patches")
        return hidden[:, extra:]

    def _to_grid(self, grid: torch.Tensor, config) -> torch.Tensor:
        """(H, W, C) patch features resampled to the fixed (patch_grid ** 2, C) the projector reads."""
        side = self.patch_grid(config)
        if grid.shape[0] != side or grid.shape[1] != side:
            grid = F.interpolate(grid.permute(2, 0, 1).unsqueeze(0).float(), size=(side, side),
                                 mode="bilinear", align_corners=False).squeeze(0).permute(1, 2, 0).to(grid.dtype)
        return grid.reshape(side * side, grid.shape[-1])

    # -- the LLM's extra inputs ----------------------------------------------------------------
    def llm_inputs(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   image_positions: torch.Tensor, vision: VisionFeatures | None,
                   prompt_mask: torch.Tensor | None = None) -> dict:
        """Extra keyword inputs of the unchanged model's forward and generate, beyond `inputs_embeds`.

        image_positions: bool (batch, seq), the positions holding image features (the safety slots
        are NOT among them: they are typed as text).
        prompt_mask: bool (batch, seq), the prompt's positions (image, safety slots and question);
        the rest is response. None: the whole sequence is prompt (generation starts there). Only a
        prefix-LM family, whose prompt attends bidirectionally, needs it.
        """
        return {}

    def prepare_generation(self, model: nn.Module) -> None:
        """Make `model.generate(inputs_embeds=...)` possible, if the family needs it (in place, once)."""

    # -- the processor -------------------------------------------------------------------------
    def reserve(self, processor, num_safety_tokens: int):
        """A copy of `processor` whose every image is preceded by `num_safety_tokens` placeholders.

        The default wraps the processor's own expansion (`replace_image_token`, the transformers 5
        processor hook): the slots are the image-token placeholder written `k` more times in front
        of the image's expansion, so the image's own runs stay exactly its feature count.
        """
        if not hasattr(processor, "replace_image_token"):
            raise TypeError(f"{type(processor).__name__} has no replace_image_token: cannot reserve safety-token "
                            "positions")
        slot = processor.tokenizer.convert_ids_to_tokens(self.processor_image_token_id(processor))
        reserved = copy.copy(processor)
        reserved.replace_image_token = _SlotsBeforeImage(reserved, type(processor).replace_image_token,
                                                         slot * num_safety_tokens)
        return reserved

    def processor_image_token_id(self, processor) -> int:
        """The id of the placeholder the processor repeats per image feature."""
        token_id = getattr(processor, "image_token_id", None)
        if token_id is None:
            token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        return token_id


def placeholder_runs(input_ids: torch.Tensor, token_id: int) -> list[int]:
    """Lengths of the runs of `token_id` in `input_ids`, row by row, in sequence order."""
    runs: list[int] = []
    for row in (input_ids == token_id).tolist():
        length = 0
        for is_token in row + [False]:
            if is_token:
                length += 1
            elif length:
                runs.append(length)
                length = 0
    return runs


class _SlotsBeforeImage:
    """A processor's `replace_image_token` with the safety slots written in front of each image.

    A plain callable object (not a closure) so that a reserved processor still pickles, e.g. into
    data-loader workers.
    """

    def __init__(self, processor, expand, slots: str) -> None:
        self.processor, self.expand, self.slots = processor, expand, slots

    def __call__(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.slots + self.expand(self.processor, image_inputs, image_idx, **kwargs)


_REGISTRY: dict[str, FamilyAdapter] = {}


class PooledFeaturesAdapter(FamilyAdapter):
    """Towers with one pooled output per image and no extra image inputs (Gemma 3, PaliGemma): the
    model's own projected features, and the patches of `feature_layer` for the safety projector."""

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor, image_inputs: dict,
                       feature_layer: int) -> VisionFeatures:
        out = model.get_image_features(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        patches = self._select_patches(out.hidden_states[feature_layer], model.config)
        return VisionFeatures(base=list(out.pooler_output), patches=patches, extras=[{} for _ in out.pooler_output])


class DynamicResolutionAdapter(FamilyAdapter):
    """Towers that see each image at its own resolution (Mistral 3, Qwen2-VL): the patch grid of
    every image comes from one image input (`image_input_names[0]`), and the safety projector reads
    the patches resampled to `DYNAMIC_PATCH_GRID`."""

    def patch_grid(self, config) -> int:
        return DYNAMIC_PATCH_GRID

    def _encode(self, model: nn.Module, pixel_values: torch.Tensor, image_inputs: dict, purpose: str):
        """(the grid input, the tower's output with hidden states); the grid input is required, to `purpose`."""
        name = self.image_input_names[0]
        grids = self._required_input(model, image_inputs, name, purpose)
        out = model.get_image_features(pixel_values=pixel_values, output_hidden_states=True, return_dict=True,
                                       **{name: grids})
        return grids, out


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def supported_families() -> list[str]:
    """The model types an adapter is registered for."""
    return sorted(_REGISTRY)


def family_for(config) -> FamilyAdapter:
    """The adapter for a model config's `model_type`, or an error listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(f"no safety-module family adapter for model_type {model_type!r}; "
                         f"supported: {sorted(_REGISTRY)}")
    return _REGISTRY[model_type]
