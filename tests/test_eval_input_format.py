"""Faithful LLaVA-1.5 input: images padded to a square with the mean colour (the original's
expand2square) instead of centre-cropped, and the original `llava_v1` conversation template with
its system prompt, each recomputed here from the reference code's own definitions."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.core.models import GenerationSettings, load_runner
from safety_modules.images import use_square_padding
from safety_modules.prompting import build_prompt, use_conversation

REPO = Path(__file__).resolve().parents[1]
RED = (255, 0, 0)
QUESTION = "Is this image safe for viewing on social media?"


def _edge_marker_image(width: int = 48, height: int = 24, marker: int = 4) -> Image.Image:
    """A white landscape image with a red stripe along its left edge."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    image.paste(Image.new("RGB", (marker, height), RED), (0, 0))
    return image


def _pixels(image_processor, pixel_values: torch.Tensor) -> np.ndarray:
    """Processed pixels back in [0, 1], (height, width, 3)."""
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    return (pixel_values[0] * std + mean).permute(1, 2, 0).numpy()


def _red(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)


def _expand2square(pil_img, background_color):
    """The original LLaVA code's expand2square, as written there."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def test_a_marker_at_the_edge_survives_padding_but_not_the_centre_crop(tiny_builder):
    _, processor = tiny_builder()
    cropping = copy.deepcopy(processor)
    padding = use_square_padding(processor)
    image = _edge_marker_image()
    batch = {"crop": cropping(images=[image], text=["USER: <image>\nx ASSISTANT:"], return_tensors="pt"),
             "pad": padding(images=[image], text=["USER: <image>\nx ASSISTANT:"], return_tensors="pt")}
    cropped = _pixels(cropping.image_processor, batch["crop"]["pixel_values"])
    padded = _pixels(padding.image_processor, batch["pad"]["pixel_values"])
    assert cropped.shape == padded.shape == (32, 32, 3)            # same input size for the model
    assert not _red(cropped).any()                                 # the centre crop cut the marker off
    red = _red(padded)
    assert red.any() and red[8:24, 0].all() and not red[:, 4:].any()   # kept, at the left edge, mid-height
    # The bands added above and below carry the image processor's mean colour.
    mean = np.array([int(x * 255) / 255 for x in padding.image_processor.image_mean])
    assert np.allclose(padded[0, 16], mean, atol=0.02) and np.allclose(padded[-1, 16], mean, atol=0.02)
    assert batch["pad"]["input_ids"].shape == batch["crop"]["input_ids"].shape


def test_padding_equals_the_original_expand2square_then_the_same_processor(tiny_builder, make_image):
    _, processor = tiny_builder()
    original = copy.deepcopy(processor.image_processor)
    padding = use_square_padding(processor).image_processor
    background = tuple(int(x * 255) for x in original.image_mean)
    for size in ((90, 40), (40, 90), (33, 33)):
        image = make_image(seed=size[0], size=size)
        expected = original(_expand2square(image, background), return_tensors="pt")["pixel_values"]
        assert torch.equal(padding(image, return_tensors="pt")["pixel_values"], expected), size
    _, next_processor = tiny_builder(family="llava_next")
    with pytest.raises(ValueError, match="LLaVA-NeXT"):
        use_square_padding(next_processor)


def _reference_llava_v1_prompt(turns: list[tuple[str, str | None]]) -> str:
    """conv_templates['llava_v1'].get_prompt() of the original LLaVA code (SeparatorStyle.TWO)."""
    system = ("A chat between a curious human and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the human's questions.")
    seps = [" ", "</s>"]
    ret = system + seps[0]
    for i, (role, message) in enumerate(turns):
        ret += role + ": " + message + seps[i % 2] if message else role + ":"
    return ret


def test_the_llava_v1_template_gives_the_original_prompt(tiny_builder):
    _, processor = tiny_builder()
    use_conversation(processor, "llava_v1")
    assert build_prompt(processor, QUESTION) == _reference_llava_v1_prompt(
        [("USER", "<image>\n" + QUESTION), ("ASSISTANT", None)])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": "No, it is not safe."}]},
                {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        _reference_llava_v1_prompt([("USER", "<image>\n" + QUESTION), ("ASSISTANT", "No, it is not safe."),
                                    ("USER", "Why?"), ("ASSISTANT", None)])
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        use_conversation(processor, "vicuna")


def test_runners_use_the_settings_and_cache_keys_follow_them(tmp_path):
    from safety_modules import SafetyConfig, attach, save_adapter
    from base_models.tiny import build_tiny_llava

    plain = load_runner("tiny", device="cpu")
    faithful = load_runner("tiny", device="cpu", image_preprocess="pad_to_square", conversation="llava_v1")
    padded_only = load_runner("tiny", device="cpu", image_preprocess="pad_to_square")
    assert len({plain.fingerprint, faithful.fingerprint, padded_only.fingerprint}) == 3
    assert faithful.format_prompt(QUESTION) == _reference_llava_v1_prompt(
        [("USER", "<image>\n" + QUESTION), ("ASSISTANT", None)])
    base, processor = build_tiny_llava(seed=0)
    adapter = save_adapter(attach(base, SafetyConfig(num_safety_tokens=4, num_queries=4), processor), tmp_path / "a")
    safe = load_runner("tiny", adapter=adapter, device="cpu", image_preprocess="pad_to_square", conversation="llava_v1")
    assert safe.processor.image_processor.do_pad and safe.format_prompt(QUESTION) == faithful.format_prompt(QUESTION)
    answers = safe.generate([QUESTION], [_edge_marker_image()], GenerationSettings(max_new_tokens=2, greedy=True))
    assert len(answers) == 1 and isinstance(answers[0], str)
    with pytest.raises(ValueError, match="image_preprocess: must be one of"):
        load_runner("tiny", device="cpu", image_preprocess="letterbox")


def test_the_llava_1_5_configs_pad_images_as_the_original(tmp_path):
    from safevlm.pipeline import load_pipeline_config
    from safety_modules.configio import ConfigError

    for name in ("llava-1.5-7b.yaml", "llava-1.5-7b-shape.yaml"):
        assert load_pipeline_config(REPO / "configs" / name).model.image_preprocess == "pad_to_square", name
    assert load_pipeline_config(REPO / "configs" / "tiny.yaml").model.image_preprocess == "processor"
    with pytest.raises(ConfigError, match="model.conversation: expected one of"):
        load_pipeline_config(REPO / "configs" / "tiny.yaml", ["model.conversation=vicuna"])


def test_training_stages_see_the_same_input_format_as_evaluation():
    """The model section's input settings reach every recipe's base: training pads images and
    formats prompts exactly as the evaluation of its adapter does."""
    from safevlm.pipeline import _recipe_config, load_pipeline_config

    cfg = load_pipeline_config(REPO / "configs" / "tiny.yaml", ["model.image_preprocess=pad_to_square",
                                                                  "model.conversation=llava_v1"])
    runner = load_runner("tiny", device="cpu", image_preprocess="pad_to_square", conversation="llava_v1")
    image = _edge_marker_image()
    evaluated = runner.processor.image_processor(image, return_tensors="pt")["pixel_values"]
    for stage in ("stage1", "stage2", "ppo", "sft", "dpo"):
        spec = _recipe_config(cfg, stage).model
        _, processor = spec.load("tiny")
        trained = processor.image_processor(image, return_tensors="pt")["pixel_values"]
        assert torch.equal(trained, evaluated), stage
        assert build_prompt(processor, QUESTION) == runner.format_prompt(QUESTION), stage
