"""Tiny random models of every supported non-LLaVA family, built offline from a config.

Why: the per-family proofs (equivalence with the unchanged model, generation, training steps) must
run on CPU in seconds without a download. Each builder makes the family's real model class, a
byte-level BPE tokenizer trained locally (with the family's special tokens) and the family's real
processor with a small chat template in the family's own format. Nothing in the model layer imports
this module; `base_models.loading` builds `tiny-<family>` through it on demand. Each builder imports
its family's transformers classes itself: importing the modeling code of all eleven families costs
far more than the one a run builds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerFast

from base_models.tiny import build_tiny_llava, build_tiny_tokenizer
from safety_modules.processors import pixtral_processor_class, without_video

TEXT_HIDDEN = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_INTERMEDIATE = 128
VISION_HIDDEN = 32
VISION_LAYERS = 2
VISION_HEADS = 2
MAX_POSITIONS = 2048
# Weight scale of the tiny text models: large enough that logits span a real model's range (tens,
# not tenths), so that a wrong position or mask shows as a large difference, not a rounding one.
TEXT_INIT_STD = 0.2

CHATML_ROLES = {"user": "user", "assistant": "assistant"}


def chatml_template(image_markup: str) -> str:
    """A ChatML conversation template (Qwen's format) whose image item is `image_markup`."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}" + image_markup + "{% elif item['type'] == 'text' %}{{ item['text'] }}"
        "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def _text_sizes(tokenizer: PreTrainedTokenizerFast) -> dict:
    """The text-model fields every tiny family shares."""
    return dict(
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_HEADS,
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=TEXT_INIT_STD,
    )


def _finish(model, tokenizer: PreTrainedTokenizerFast):
    """Generation defaults from the tokenizer, eval mode."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.eval()
    return model


# -- Qwen2-VL / Qwen2.5-VL -------------------------------------------------------------------------
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
QWEN_IMAGE_MARKUP = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_PATCH = 8
QWEN_MERGE = 2
QWEN_MIN_PIXELS = 32 * 32
QWEN_MAX_PIXELS = 64 * 64
# head_dim / 2 split over (temporal, height, width) rotary sections
QWEN_MROPE_SECTION = [2, 3, 3]


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer(special_tokens=QWEN_SPECIALS, image_token="<|image_pad|>", unk_token=None,
                                bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _qwen_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def _qwen_processor(tokenizer: PreTrainedTokenizerFast, processor_cls=None):
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
        patch_size=QWEN_PATCH, merge_size=QWEN_MERGE, temporal_patch_size=2,
    )
    return without_video(processor_cls or Qwen2VLProcessor, image_processor=image_processor, tokenizer=tokenizer,
                         video_processor=None, chat_template=chatml_template(QWEN_IMAGE_MARKUP))


def _qwen_text(tokenizer: PreTrainedTokenizerFast) -> dict:
    return dict(**_text_sizes(tokenizer), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": QWEN_MROPE_SECTION})


def build_qwen2_vl(tokenizer: PreTrainedTokenizerFast):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=VISION_LAYERS, embed_dim=VISION_HIDDEN, hidden_size=TEXT_HIDDEN, num_heads=VISION_HEADS,
                  mlp_ratio=2, patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=_qwen_text(tokenizer), vision_config=vision, tie_word_embeddings=False,
                           **_qwen_ids(tokenizer))
    return Qwen2VLForConditionalGeneration(config), _qwen_processor(tokenizer)


def build_qwen2_5_vl(tokenizer: PreTrainedTokenizerFast):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # window of 2 x 2 merged patches, and one full-attention block: both attention paths run
    vision = dict(depth=VISION_LAYERS, hidden_size=VISION_HIDDEN, out_hidden_size=TEXT_HIDDEN,
                  intermediate_size=VISION_HIDDEN * 2, num_heads=VISION_HEADS, patch_size=QWEN_PATCH,
                  spatial_merge_size=QWEN_MERGE, temporal_patch_size=2, window_size=QWEN_PATCH * QWEN_MERGE * 2,
                  fullatt_block_indexes=[VISION_LAYERS - 1])
    config = Qwen2_5_VLConfig(text_config=_qwen_text(tokenizer), vision_config=vision, tie_word_embeddings=False,
                              **_qwen_ids(tokenizer))
    return Qwen2_5_VLForConditionalGeneration(config), _qwen_processor(tokenizer)


def build_qwen3_vl(tokenizer: PreTrainedTokenizerFast):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    grid_side = QWEN_MAX_PIXELS ** 0.5 // QWEN_PATCH  # learned position table: the largest image's grid
    vision = dict(depth=VISION_LAYERS, hidden_size=VISION_HIDDEN, intermediate_size=VISION_HIDDEN * 2,
                  num_heads=VISION_HEADS, patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=2,
                  out_hidden_size=TEXT_HIDDEN, num_position_embeddings=int(grid_side) ** 2,
                  deepstack_visual_indexes=[0])
    text = {**_qwen_text(tokenizer), "head_dim": TEXT_HIDDEN // TEXT_HEADS}
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_qwen_ids(tokenizer))
    return Qwen3VLForConditionalGeneration(config), _qwen_processor(tokenizer, Qwen3VLProcessor)


# -- LLaVA-OneVision ------------------------------------------------------------------------------
ONEVISION_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
TOWER_IMAGE = 32          # fixed-resolution towers: 32 x 32 pixels in 8 x 8 patches
TOWER_PATCH = 8


def _chatml_tokenizer(specials: list[str], image_token: str, **extra_named: str) -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer(special_tokens=specials, image_token=image_token, extra_named=extra_named,
                                unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _siglip(**overrides) -> dict:
    return dict(model_type="siglip_vision_model", hidden_size=VISION_HIDDEN, intermediate_size=VISION_HIDDEN * 2,
                num_hidden_layers=VISION_LAYERS, num_attention_heads=VISION_HEADS, image_size=TOWER_IMAGE,
                patch_size=TOWER_PATCH, **overrides)


def build_llava_onevision(tokenizer: PreTrainedTokenizerFast):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    side = TOWER_IMAGE
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        vision_config=_siglip(), text_config={"model_type": "qwen2", **_text_sizes(tokenizer)},
        image_token_id=ids("<image>"), video_token_id=ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False,
    )
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": side, "width": side},
                                                      image_grid_pinpoints=pinpoints)
    processor = without_video(
        LlavaOnevisionProcessor, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
        num_image_tokens=(side // TOWER_PATCH) ** 2, vision_feature_select_strategy="full",
        chat_template=chatml_template("<image>\n"),
    )
    return LlavaOnevisionForConditionalGeneration(config), processor


# -- Mistral 3 (Pixtral tower) -----------------------------------------------------------------------
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}[IMG]"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}[/INST]"
    "{% else %}{% for item in message['content'] %}{{ item['text'] }}{% endfor %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
PIXTRAL_MAX_EDGE = 64


def build_mistral3(tokenizer: PreTrainedTokenizerFast):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    PixtralProcessor = pixtral_processor_class()
    vision = dict(model_type="pixtral", hidden_size=VISION_HIDDEN, intermediate_size=VISION_HIDDEN * 2,
                  num_hidden_layers=VISION_LAYERS, num_attention_heads=VISION_HEADS, image_size=PIXTRAL_MAX_EDGE,
                  patch_size=TOWER_PATCH, head_dim=VISION_HIDDEN // VISION_HEADS)
    text = {"model_type": "mistral", **_text_sizes(tokenizer), "head_dim": TEXT_HIDDEN // TEXT_HEADS}
    config = Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=2, vision_feature_layer=-1,
                            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), tie_word_embeddings=False)
    image_processor = PixtralImageProcessorPil(size={"longest_edge": PIXTRAL_MAX_EDGE},
                                               patch_size={"height": TOWER_PATCH, "width": TOWER_PATCH})
    processor = PixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=TOWER_PATCH,
                                 spatial_merge_size=2, chat_template=MISTRAL_TEMPLATE)
    return Mistral3ForConditionalGeneration(config), processor


# -- InternVL ----------------------------------------------------------------------------------------
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                   "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
INTERNVL_MAX_TILES = 4
INTERNVL_DOWNSAMPLE = 0.5


def _internvl_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS.values()]
    return _chatml_tokenizer(specials, "<IMG_CONTEXT>", **INTERNVL_TOKENS)


def build_internvl(tokenizer: PreTrainedTokenizerFast):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    side = TOWER_IMAGE
    vision = dict(model_type="internvl_vision", hidden_size=VISION_HIDDEN, intermediate_size=VISION_HIDDEN * 2,
                  num_hidden_layers=VISION_LAYERS, num_attention_heads=VISION_HEADS, image_size=[side, side],
                  patch_size=[TOWER_PATCH, TOWER_PATCH])
    per_tile = round((side // TOWER_PATCH) ** 2 * INTERNVL_DOWNSAMPLE ** 2)
    config = InternVLConfig(vision_config=vision, text_config={"model_type": "qwen2", **_text_sizes(tokenizer)},
                            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=per_tile,
                            downsample_ratio=INTERNVL_DOWNSAMPLE, vision_feature_layer=-1,
                            vision_feature_select_strategy="default", tie_word_embeddings=False)
    image_processor = GotOcr2ImageProcessorPil(size={"height": side, "width": side}, crop_to_patches=True,
                                               min_patches=1, max_patches=INTERNVL_MAX_TILES)
    processor = without_video(InternVLProcessor, image_processor=image_processor, tokenizer=tokenizer,
                              video_processor=None, image_seq_length=per_tile,
                              chat_template=chatml_template("<IMG_CONTEXT>\n"))
    return InternVLForConditionalGeneration(config), processor


# -- Gemma 3 -------------------------------------------------------------------------------------------
GEMMA_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", *GEMMA_TOKENS.values(),
                  "<image_soft_token>"]
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA_TOKENS_PER_IMAGE = 4   # SigLIP's 4 x 4 patches pooled to 2 x 2


def _gemma_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer(special_tokens=GEMMA_SPECIALS, image_token="<image_soft_token>",
                                extra_named=GEMMA_TOKENS, unk_token="<unk>", bos_token="<bos>",
                                eos_token="<end_of_turn>", pad_token="<pad>")


def _gemma_text(tokenizer: PreTrainedTokenizerFast) -> dict:
    head_dim = TEXT_HIDDEN // TEXT_HEADS
    return {**_text_sizes(tokenizer), "head_dim": head_dim, "query_pre_attn_scalar": head_dim,
            "sliding_window": MAX_POSITIONS}


def build_gemma3(tokenizer: PreTrainedTokenizerFast):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        text_config={"model_type": "gemma3_text", **_gemma_text(tokenizer)}, vision_config=_siglip(),
        mm_tokens_per_image=GEMMA_TOKENS_PER_IMAGE, boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"), tie_word_embeddings=False,
        initializer_range=TEXT_INIT_STD,
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": TOWER_IMAGE, "width": TOWER_IMAGE}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA_TEMPLATE,
                                image_seq_length=GEMMA_TOKENS_PER_IMAGE)
    return Gemma3ForConditionalGeneration(config), processor


# -- Idefics3 / SmolVLM --------------------------------------------------------------------------------
IDEFICS_GRID = 6  # the processor names row/column markers up to 6 x 6 tiles
IDEFICS_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                    "<global-img>"] + [f"<row_{i + 1}_col_{j + 1}>" for i in range(IDEFICS_GRID)
                                       for j in range(IDEFICS_GRID)]
IDEFICS_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
IDEFICS_SCALE = 2
IDEFICS_MAX_EDGE = 64     # images up to 64 px: up to 2 x 2 tiles of 32 px plus the global view


def _idefics_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer(special_tokens=IDEFICS_SPECIALS, image_token="<image>", unk_token=None,
                                bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|endoftext|>")


def build_idefics3(tokenizer: PreTrainedTokenizerFast):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    vision = dict(model_type="idefics3_vision", hidden_size=VISION_HIDDEN, intermediate_size=VISION_HIDDEN * 2,
                  num_hidden_layers=VISION_LAYERS, num_attention_heads=VISION_HEADS, image_size=TOWER_IMAGE,
                  patch_size=TOWER_PATCH)
    config = Idefics3Config(vision_config=vision, text_config={"model_type": "llama", **_text_sizes(tokenizer)},
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=IDEFICS_SCALE,
                            tie_word_embeddings=False)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": IDEFICS_MAX_EDGE},
                                                max_image_size={"longest_edge": TOWER_IMAGE})
    per_view = (TOWER_IMAGE // TOWER_PATCH) ** 2 // IDEFICS_SCALE ** 2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=per_view,
                                  chat_template=IDEFICS_TEMPLATE)
    return Idefics3ForConditionalGeneration(config), processor


# -- PaliGemma --------------------------------------------------------------------------------------
PALIGEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
# No chat turns: the prompt is the image then the question; the processor writes <bos> after the
# image and a newline after the prompt (the prefix), and the answer comes as its `suffix`.
PALIGEMMA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
)


def _paligemma_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer(special_tokens=PALIGEMMA_SPECIALS, image_token="<image>", unk_token="<unk>",
                                bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def build_paligemma(tokenizer: PreTrainedTokenizerFast):
    """PaliGemma 2 layout: SigLIP tower, one linear projector, a Gemma 2 text model."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(size={"height": TOWER_IMAGE, "width": TOWER_IMAGE})
    image_processor.image_seq_length = (TOWER_IMAGE // TOWER_PATCH) ** 2
    # the processor adds its location and segmentation tokens to the tokenizer: size the model after it
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=PALIGEMMA_TEMPLATE)
    text = {"model_type": "gemma2", **_gemma_text(tokenizer)}
    config = PaliGemmaConfig(text_config=text, vision_config=_siglip(projection_dim=TEXT_HIDDEN),
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"), projection_dim=TEXT_HIDDEN,
                             hidden_size=TEXT_HIDDEN, tie_word_embeddings=False)
    return PaliGemmaForConditionalGeneration(config), processor


# family -> (tokenizer builder, model + processor builder)
BUILDERS: dict[str, tuple[Callable[[], PreTrainedTokenizerFast], Callable]] = {
    "qwen2_vl": (_qwen_tokenizer, build_qwen2_vl),
    "qwen2_5_vl": (_qwen_tokenizer, build_qwen2_5_vl),
    "qwen3_vl": (_qwen_tokenizer, build_qwen3_vl),
    "llava_onevision": (lambda: _chatml_tokenizer(ONEVISION_SPECIALS, "<image>"), build_llava_onevision),
    "gemma3": (_gemma_tokenizer, build_gemma3),
    "idefics3": (_idefics_tokenizer, build_idefics3),
    "paligemma": (_paligemma_tokenizer, build_paligemma),
    "internvl": (_internvl_tokenizer, build_internvl),
    "mistral3": (lambda: build_tiny_tokenizer(special_tokens=MISTRAL_SPECIALS, image_token="[IMG]"), build_mistral3),
}


# built by base_models.tiny (the original tiny models, with their own size options)
LLAVA_FAMILIES = ("llava", "llava_next")


def tiny_families() -> list[str]:
    """The families `build_tiny_family` can build."""
    return sorted([*BUILDERS, *LLAVA_FAMILIES])


def build_tiny_family(family: str, seed: int = 0):
    """A tiny (model, processor) pair of `family` (a model_type); the same seed gives the same weights."""
    if family in LLAVA_FAMILIES:
        return build_tiny_llava(seed=seed, family=family)
    if family not in BUILDERS:
        raise ValueError(f"build_tiny_family: no tiny builder for {family!r}; known: {tiny_families()}")
    make_tokenizer, make_model = BUILDERS[family]
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    model, processor = make_model(tokenizer)
    return _finish(model, tokenizer), processor
