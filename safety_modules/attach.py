"""Attach the safety modules to an unchanged Hugging Face VLM, and run it.

How: the wrapper builds the LLM's input embeddings itself -- text embeddings, then per image the
safety tokens followed by the model's own image features, scattered into the image placeholders --
and calls the unchanged model with `inputs_embeds` plus the extra inputs its family adapter computes
(position ids, token types). The processor reserves `k` extra placeholder positions in front of
each image (the family adapter says how), so nothing of the model's modeling code is copied or
patched. The vision tower runs once per image; both projectors read its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from safety_modules.config import SafetyConfig
from safety_modules.families import TOKEN_TYPE_NAMES, FamilyAdapter, VisionFeatures, family_for
from safety_modules.head import SafetyHead, safety_loss
from safety_modules.labels import IGNORE_INDEX
from safety_modules.projector import build_projector


class SafetyModules(nn.Module):
    """The trainable parts: safety projector, two sets of safety tokens, safety head.

    Their `state_dict()` is exactly what an adapter file holds.
    """

    def __init__(self, cfg: SafetyConfig, vision_width: int, text_width: int, num_patches: int,
                 num_heads: int, init_std: float) -> None:
        super().__init__()
        self.projector = build_projector(cfg, vision_width, text_width, num_patches)
        self.llm_tokens = nn.Parameter(torch.randn(cfg.num_safety_tokens, text_width) * init_std)
        self.head_tokens = nn.Parameter(torch.randn(cfg.num_safety_tokens, text_width) * init_std)
        self.head = SafetyHead(text_width, num_heads, cfg.num_safety_levels, len(cfg.risk_types))


@dataclass
class EncodedImages:
    """Vision features computed once per image: the base path's and the safety projector's."""

    vision: VisionFeatures
    safety_features: torch.Tensor  # (num_images, Q, text_width)

    def select(self, index: list[int]) -> "EncodedImages":
        """The encoded images at `index` (e.g. the samples a guard lets through), extras included."""
        return EncodedImages(vision=self.vision.select(index), safety_features=self.safety_features[index])


@dataclass
class SafetyOutput(ModelOutput):
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    safety_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    safety_logits: torch.Tensor | None = None
    risk_logits: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: tuple | None = None


def reserve_safety_positions(processor, num_safety_tokens: int, family: FamilyAdapter | object):
    """A copy of `processor` that lays out `num_safety_tokens` placeholders in front of each image.

    `family` is the base model's adapter (or its config); the adapter says how its processor
    reserves them. The copy is marked with `safety_reserved_tokens`, which the guard checks.
    """
    already = getattr(processor, "safety_reserved_tokens", 0)
    if already == num_safety_tokens:
        return processor
    if already:
        raise ValueError(f"processor already reserves {already} safety positions, not {num_safety_tokens}")
    adapter = family if isinstance(family, FamilyAdapter) else family_for(family)
    reserved = adapter.reserve(processor, num_safety_tokens)
    reserved.safety_reserved_tokens = num_safety_tokens
    return reserved


def _plain(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a PEFT wrapper, if any."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class SafetyVLM(nn.Module):
    """A VLM with safety modules attached. `base` is the unchanged model (or its PEFT LoRA wrapper)."""

    def __init__(self, base: nn.Module, cfg: SafetyConfig, processor=None) -> None:
        super().__init__()
        self.base = base
        self.safety_config = cfg
        config = _plain(base).config
        self.family = family_for(config)
        ref = next(base.parameters())
        init_std = getattr(config.text_config, "initializer_range", 0.02)
        heads = cfg.head_num_heads or self.family.text_heads(config)
        self.safety = SafetyModules(
            cfg, self.family.vision_width(config), self.family.text_width(config),
            self.family.num_patches(config), heads, init_std,
        ).to(device=ref.device, dtype=ref.dtype)
        self.train(base.training)
        self.processor = (reserve_safety_positions(processor, cfg.num_safety_tokens, self.family)
                          if processor is not None else None)

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def config(self):
        return _plain(self.base).config

    @property
    def plain_model(self) -> nn.Module:
        return _plain(self.base)

    @property
    def device(self) -> torch.device:
        return next(self.safety.parameters()).device

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.plain_model.gradient_checkpointing_enable(**kwargs)

    # -- the pieces of a forward pass -------------------------------------------------------
    def image_inputs(self, batch: dict) -> dict:
        """`pixel_values` and the family's extra image inputs (by name) out of a processor batch."""
        names = ("pixel_values",) + self.family.image_input_names
        inputs = {name: batch[name] for name in names if batch.get(name) is not None}
        if "pixel_values" in inputs and "input_ids" in batch:
            inputs = {**self.family.image_inputs_from_ids(self.config, batch["input_ids"],
                                                          self.safety_config.num_safety_tokens), **inputs}
        return inputs

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None,
                      **image_inputs: torch.Tensor) -> EncodedImages:
        """Run the vision tower once; return the base features and the safety features.

        `image_inputs`: the family's extra image inputs by name (`image_grid_thw`, ...); unknown
        names are an error, so that nothing a family needs is dropped silently.
        """
        if image_sizes is not None:
            image_inputs["image_sizes"] = image_sizes
        unknown = set(image_inputs) - set(self.family.image_input_names)
        if unknown and any(image_inputs[name] is not None for name in unknown):
            raise ValueError(f"encode_images: {sorted(unknown)} are not image inputs of {self.config.model_type} "
                             f"(it takes {list(self.family.image_input_names)})")
        image_inputs = {k: v for k, v in image_inputs.items() if k in self.family.image_input_names}
        vision = self.family.image_features(self.base, pixel_values, image_inputs,
                                            self.safety_config.vision_feature_layer)
        patches = vision.patches.to(next(self.safety.projector.parameters()).dtype)
        return EncodedImages(vision=vision, safety_features=self.safety.projector(patches))

    def placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Image placeholders: per image, the safety slots and then its feature positions."""
        return input_ids == self.family.image_token_id(self.config)

    def slot_mask(self, input_ids: torch.Tensor, images: EncodedImages | None) -> torch.Tensor:
        """The safety-slot positions: the first `k` placeholders of each image, in sequence order."""
        placeholders = self.placeholder_mask(input_ids)
        slots = torch.zeros_like(placeholders)
        if images is None:
            return slots
        k = self.safety_config.num_safety_tokens
        self._check_slot_count(placeholders, images)
        is_slot = torch.cat([torch.arange(k + f.shape[0], device=input_ids.device) < k for f in images.vision.base])
        flat = placeholders.flatten().nonzero().squeeze(1)
        slots.view(-1)[flat[is_slot]] = True
        return slots

    def _check_slot_count(self, placeholders: torch.Tensor, images: EncodedImages) -> None:
        k = self.safety_config.num_safety_tokens
        n_slots = int(placeholders.sum())
        n_feat = sum(f.shape[0] for f in images.vision.base)
        need = n_feat + k * len(images.vision.base)
        if need != n_slots:
            raise ValueError(
                f"input has {n_slots} image placeholders, but {len(images.vision.base)} image(s) need "
                f"{n_feat} feature + {k} safety-token positions each ({need} in all): build inputs "
                "with the processor returned by attach()/reserve_safety_positions()"
            )

    def build_inputs_embeds(self, input_ids: torch.Tensor, images: EncodedImages | None) -> torch.Tensor:
        """Text embeddings with [safety tokens ; image features] scattered into each image's placeholders.

        For a family that fills its own features (`features_in_embeds` False), the feature positions
        keep the image token's embedding, by which the model finds them, and only the slots change.
        """
        placeholders = self.placeholder_mask(input_ids)
        embed = self.base.get_input_embeddings()
        if images is None:
            n_slots = int(placeholders.sum())
            if n_slots:
                raise ValueError(f"input has {n_slots} image placeholders but no pixel_values were given")
            return embed(input_ids)
        self._check_slot_count(placeholders, images)
        if not self.family.features_in_embeds:
            slots = self.slot_mask(input_ids, images)
            embeds = embed(input_ids.masked_fill(slots, 0))
            tokens = self.safety.llm_tokens.to(embeds.dtype).repeat(len(images.vision.base), 1)
            return embeds.masked_scatter(slots.unsqueeze(-1), tokens)
        embeds = embed(input_ids.masked_fill(placeholders, 0))
        tokens = self.safety.llm_tokens.to(embeds.dtype)
        fill = torch.cat([torch.cat([tokens, feats.to(embeds.dtype)]) for feats in images.vision.base])
        return embeds.masked_scatter(placeholders.unsqueeze(-1), fill)

    def llm_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   images: EncodedImages | None, prompt_mask: torch.Tensor | None = None) -> dict:
        """`inputs_embeds` and the family's extra model inputs (the safety slots typed as text).

        `prompt_mask`: the prompt's positions, the rest being response (None: all prompt); what a
        prefix-LM family's model must be told.
        """
        embeds = self.build_inputs_embeds(input_ids, images)
        image_positions = self.placeholder_mask(input_ids) & ~self.slot_mask(input_ids, images)
        extra = self.family.llm_inputs(self.plain_model, input_ids, attention_mask, image_positions,
                                       images.vision if images is not None else None, prompt_mask)
        return {"inputs_embeds": embeds, **extra}

    def _split_inputs(self, image_sizes: torch.Tensor | None, kwargs: dict) -> dict:
        """Take the family's image inputs out of `kwargs` (the rest goes to the LLM); drop the
        processor's token types, which the adapter recomputes with the safety slots as text."""
        image_inputs = {"image_sizes": image_sizes} if image_sizes is not None else {}
        for name in self.family.image_input_names:
            if name in kwargs:
                image_inputs[name] = kwargs.pop(name)
        for name in TOKEN_TYPE_NAMES:
            kwargs.pop(name, None)
        return image_inputs

    def head_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    images: EncodedImages | None, prompt_mask: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Safety-level and risk-type logits: prompt tokens attend to [head tokens ; safety features]."""
        placeholders = self.placeholder_mask(input_ids)
        if prompt_mask is None:
            prompt_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is not None:
            prompt_mask = prompt_mask & attention_mask.bool()
        prompt_mask = prompt_mask & ~placeholders
        head_dtype = next(self.safety.head.parameters()).dtype
        queries = self.base.get_input_embeddings()(input_ids.masked_fill(placeholders, 0)).to(head_dtype)
        batch = input_ids.shape[0]
        memory = self.safety.head_tokens.unsqueeze(0).expand(batch, -1, -1)
        if images is not None:
            if images.safety_features.shape[0] != batch:
                raise ValueError(f"the safety head reads one image per sample: got "
                                 f"{images.safety_features.shape[0]} images for {batch} samples")
            memory = torch.cat([memory, images.safety_features.to(head_dtype)], dim=1)
        return self.safety.head(queries, prompt_mask, memory)

    # -- forward / generate -----------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, safety_labels: torch.Tensor | None = None,
                risk_labels: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
                run_llm: bool = True, run_head: bool = True, images: EncodedImages | None = None,
                **llm_kwargs) -> SafetyOutput:
        """The base model's forward with the safety modules active.

        `prompt_mask` (bool, batch x seq): the prompt; by default the positions without a label, the
        response being what is labelled (without labels: all prompt). The head reads the prompt only,
        and a prefix-LM family attends within it bidirectionally: a caller scoring a
        response without labels (PPO, DPO) passes it. `run_llm=False` skips the LLM (stage 1, the
        guard); total loss = LM loss + loss_weight * (CE(level) + CE(risk type)).
        """
        image_inputs = self._split_inputs(image_sizes, llm_kwargs)
        if images is None and pixel_values is not None:
            batch = {"input_ids": input_ids, "pixel_values": pixel_values, **image_inputs}
            images = self.encode_images(**self.image_inputs(batch))
        if prompt_mask is None and labels is not None:
            prompt_mask = labels == IGNORE_INDEX
        out = SafetyOutput()
        if run_head:
            out.safety_logits, out.risk_logits = self.head_logits(input_ids, attention_mask, images, prompt_mask)
            out.safety_loss = safety_loss(out.safety_logits, out.risk_logits, safety_labels, risk_labels)
        if run_llm:
            inputs = self.llm_inputs(input_ids, attention_mask, images, prompt_mask)
            llm_out = self.base(attention_mask=attention_mask, labels=labels, **inputs, **llm_kwargs)
            out.logits = llm_out.logits
            out.lm_loss = llm_out.loss
            out.cache = getattr(llm_out, "cache", None)
            out.hidden_states = getattr(llm_out, "hidden_states", None)
        parts = []
        if out.lm_loss is not None:
            parts.append(out.lm_loss)
        if out.safety_loss is not None:
            parts.append(self.safety_config.loss_weight * out.safety_loss)
        out.loss = sum(parts) if parts else None
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                 images: EncodedImages | None = None, **generate_kwargs) -> torch.Tensor:
        """Generate with the safety tokens in the sequence; returns the new tokens only.

        Pass `images` (from `encode_images`) to reuse vision features already computed, e.g. by the guard.
        Use left padding for batches. The image placeholder token is never generated: a sampled
        placeholder in an answer would make that answer unscorable later (PPO scores prompt + answer
        in one forward, which would count one placeholder too many).
        """
        image_inputs = self._split_inputs(image_sizes, generate_kwargs)
        if images is None and pixel_values is not None:
            batch = {"input_ids": input_ids, "pixel_values": pixel_values, **image_inputs}
            images = self.encode_images(**self.image_inputs(batch))
        inputs = self.llm_inputs(input_ids, attention_mask, images)
        self.family.prepare_generation(self.plain_model)
        image_token = self.family.image_token_id(self.config)
        suppressed = list(generate_kwargs.pop("suppress_tokens", None) or [])
        generate_kwargs["suppress_tokens"] = sorted(set(suppressed) | {int(image_token)})
        return self.base.generate(attention_mask=attention_mask, **inputs, **generate_kwargs)


def attach(model: nn.Module, config: SafetyConfig | None = None, processor=None,
           freeze_base: bool = True) -> SafetyVLM:
    """Add the safety modules to a VLM of a supported family; returns the wrapped model.

    With a processor, `model.processor` is a copy that reserves the safety-token positions. The base
    is frozen by default (stage 1 trains only the modules).
    """
    if isinstance(model, SafetyVLM):
        raise ValueError("safety modules are already attached to this model")
    cfg = config or SafetyConfig()
    # Remembered so that detach() gives back the model as it came, trainable where it was.
    requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
    if freeze_base:
        for param in model.parameters():
            param.requires_grad_(False)
    wrapped = SafetyVLM(model, cfg, processor)
    wrapped._base_requires_grad = requires_grad
    return wrapped


def detach(model: SafetyVLM) -> nn.Module:
    """Give back the plain model: safety modules dropped, a LoRA (if any) removed unmerged, and each
    parameter's `requires_grad` as it was before attach() froze the base."""
    if not isinstance(model, SafetyVLM):
        raise TypeError(f"detach expects a model returned by attach(), got {type(model).__name__}")
    base = model.base
    if hasattr(base, "unload"):
        base = base.unload()
    for name, param in base.named_parameters():
        param.requires_grad_(getattr(model, "_base_requires_grad", {}).get(name, param.requires_grad))
    return base
