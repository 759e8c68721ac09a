"""LLaVA-shaped models with random weights (nothing downloaded): `model.path: shape:NAME`.

Why: proving a recipe at 7B scale (memory, step time, every stage running) needs a model of that
shape, not its weights; a download is neither possible offline nor needed for that. The
benchmarks and the pipeline (`safevlm run ... model.path=shape:llava-1.5-7b`) build their models
here. Weights are drawn from `seed`, so every process of a multi-GPU run builds the same model.

Shapes: `llava-1.5-7b` (CLIP ViT-L/14-336 + Llama-7B, untied head, quick-GELU vision tower, and the
paper's safety modules: 64 safety tokens, 576 queries, C-Abstractor depth 3, MLP depth 2, stage-2
LoRA r 256), `1b` (CLIP ViT-B/32-224 + a 0.95B Llama) and `small` (a 6-layer ViT-B/32 + a 0.2B
Llama). The processor uses the tiny tokenizer: its ids are all valid in the 32,064-token vocabulary,
and the widths, depths and image tokens per image are those of the shape.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from base_models.tiny import build_tiny_tokenizer
from safety_modules import SafetyConfig
from safety_modules.prompting import LLAVA_CHAT_TEMPLATE

# vision (hidden, layers, heads, image, patch), text (hidden, layers, heads, mlp),
# safety (tokens, queries, projector depth, MLP depth), stage-2 LoRA rank
SHAPES = {
    "small": ((512, 6, 8, 224, 32), (1024, 8, 16, 2816), (16, 49, 1, 2), 16),
    "1b": ((768, 12, 12, 224, 32), (2048, 16, 16, 5632), (16, 49, 2, 2), 64),
    "llava-1.5-7b": ((1024, 24, 16, 336, 14), (4096, 32, 32, 11008), (64, 576, 3, 2), 256),
}


def random_llava(shape: str, device: str | torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """(LlavaForConditionalGeneration in eval mode, LlavaProcessor) of `shape`, random weights in
    `dtype` drawn from `seed` and built directly on `device` (no fp32 copy of a 7B model on the way)."""
    if shape not in SHAPES:
        raise ValueError(f"model shape: expected one of {sorted(SHAPES)}, got {shape!r}")
    (v_hidden, v_layers, v_heads, image, patch), (t_hidden, t_layers, t_heads, t_mlp), _, _ = SHAPES[shape]
    tokenizer = build_tiny_tokenizer()
    vision = CLIPVisionConfig(hidden_size=v_hidden, intermediate_size=4 * v_hidden, num_hidden_layers=v_layers,
                              num_attention_heads=v_heads, image_size=image, patch_size=patch,
                              projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=t_hidden, intermediate_size=t_mlp, num_hidden_layers=t_layers,
                       num_attention_heads=t_heads, num_key_value_heads=t_heads, vocab_size=32064,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(seed)
    if str(device).startswith("cuda"):
        torch.cuda.manual_seed_all(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).to(dtype)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image}, crop_size={"height": image, "width": image}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


def safety_config(shape: str) -> SafetyConfig:
    """The safety modules benchmarked at `shape` (the paper's at llava-1.5-7b)."""
    tokens, queries, depth, mlp_depth = SHAPES[shape][2]
    return SafetyConfig(num_safety_tokens=tokens, projector="c-abstractor", projector_depth=depth,
                        projector_mlp_depth=mlp_depth, num_queries=queries)


def lora_rank(shape: str) -> int:
    """The stage-2 LoRA rank benchmarked at `shape` (the paper's 256 at llava-1.5-7b)."""
    return SHAPES[shape][3]
