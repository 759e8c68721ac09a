"""Tiny LLaVA-family models built from a config, fully offline.

Why: tests and the default run must never download weights or tokenizers. This builds a small CLIP
vision tower + small Llama with a byte-level BPE tokenizer trained locally on
`tiny_corpus`, and the PIL image processors (there is no CPU torchvision here). The result is a real
`LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration` and its real processor, so
every code path the framework runs on a 7B checkpoint also runs here.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from safety_modules.prompting import LLAVA_CHAT_TEMPLATE
from base_models.tiny_corpus import corpus

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


DEFAULT_SIZES: dict[str, int] = {
    "image_size": 32,
    "patch_size": 8,
    "vision_hidden": 32,
    "vision_layers": 2,
    "vision_heads": 2,
    "text_hidden": 64,
    "text_layers": 2,
    "text_heads": 4,
    "text_intermediate": 128,
    "vocab_size": 640,
}


def build_tiny_tokenizer(vocab_size: int = DEFAULT_SIZES["vocab_size"], special_tokens: list[str] | None = None,
                         image_token: str = "<image>", extra_named: dict[str, str] | None = None,
                         **named_tokens: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the embedded corpus (deterministic, offline).

    `special_tokens` (default: LLaVA's) are added whole; `named_tokens` (e.g. `eos_token="<|im_end|>"`)
    override the LLaVA defaults for the tokenizer's named roles; `extra_named` names more of them as
    attributes (`tokenizer.image_token`, `tokenizer.boi_token`, ...), as families' processors expect.
    """
    special_tokens = list(special_tokens or SPECIAL_TOKENS)
    roles = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", **named_tokens}
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        extra_special_tokens={"image_token": image_token, **(extra_named or {})},
        padding_side="left",
        **roles,
    )


def _sizes(overrides: dict[str, int]) -> dict[str, int]:
    unknown = set(overrides) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"build_tiny_llava: unknown size key(s) {sorted(unknown)}; known: {sorted(DEFAULT_SIZES)}")
    sizes = {**DEFAULT_SIZES, **overrides}
    if sizes["image_size"] % sizes["patch_size"]:
        raise ValueError(f"build_tiny_llava: image_size {sizes['image_size']} is not a multiple of patch_size {sizes['patch_size']}")
    return sizes


def build_tiny_llava(seed: int = 0, family: str = "llava", **sizes: int):
    """Build a tiny (model, processor) pair of the given family ("llava" or "llava_next").

    Deterministic for a seed: the same seed gives bit-identical weights.
    """
    s = _sizes(sizes)
    tokenizer = build_tiny_tokenizer(s["vocab_size"])
    vision = CLIPVisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=s["vision_hidden"] * 2,
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        image_size=s["image_size"],
        patch_size=s["patch_size"],
        projection_dim=s["vision_hidden"],
    )
    text = LlamaConfig(
        hidden_size=s["text_hidden"],
        intermediate_size=s["text_intermediate"],
        num_hidden_layers=s["text_layers"],
        num_attention_heads=s["text_heads"],
        num_key_value_heads=s["text_heads"],
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    size = s["image_size"]
    if family == "llava":
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        processor_class = LlavaProcessor
    elif family == "llava_next":
        pinpoints = [[size, size], [size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=pinpoints, **common))
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_grid_pinpoints=pinpoints,
        )
        processor_class = LlavaNextProcessor
    else:
        raise ValueError(f"build_tiny_llava: family must be 'llava' or 'llava_next', got {family!r}")
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=s["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.eval()
    return model, processor
