"""Generation with the safety modules attached: KV cache, left-padded batches, reused image features."""

from __future__ import annotations

import pytest
import torch

from greedy import eos_ids, greedy_by_full_forwards
from safety_modules import SafetyConfig, attach, build_prompt

NEW_TOKENS = 12
QUESTIONS = ["Describe it.", "Is this picture of a street safe to share with other people online?", "What is shown?"]


@pytest.fixture(params=["llava", "llava_next"])
def setup(request, tiny_builder, make_image):
    base, processor = tiny_builder(request.param)
    torch.manual_seed(0)
    model = attach(base, SafetyConfig(num_safety_tokens=4, num_queries=4, projector_depth=1), processor)
    # different sizes: on llava_next they also give different placeholder counts
    images = [make_image(1), make_image(2, (48, 32)), make_image(3, (32, 64))]
    return model, images


def encode(model, images, questions):
    texts = [build_prompt(model.processor, q) for q in questions]
    return dict(model.processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left"))


def greedy(model, batch, **kwargs):
    return model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=model.processor.tokenizer.pad_token_id, **kwargs)


def assert_not_degenerate(tokens: torch.Tensor) -> None:
    for row in tokens.tolist():
        assert len(set(row)) >= 3, f"greedy output is degenerate, the comparison would prove little: {row}"


def test_greedy_with_cache_equals_full_recomputation(setup):
    """`generate(inputs_embeds=...)` always caches; one full forward per token is the uncached truth."""
    model, images = setup
    batch = encode(model, images, QUESTIONS)
    cached = greedy(model, batch)
    assert cached.shape == (3, NEW_TOKENS)  # new tokens only
    assert_not_degenerate(cached)
    suppress = [model.config.image_token_id] + eos_ids(model)
    assert torch.equal(cached, greedy_by_full_forwards(model, batch, NEW_TOKENS, suppress))


def test_batched_left_padding_equals_one_at_a_time(setup):
    model, images = setup
    batch = encode(model, images, QUESTIONS)
    lengths = batch["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) == 3, "prompts should have different lengths"
    assert (batch["attention_mask"][:, -1] == 1).all(), "generation batches are left-padded"
    together = greedy(model, batch)
    assert together.shape == (3, NEW_TOKENS)
    assert_not_degenerate(together)
    assert len({tuple(r) for r in together.tolist()}) == 3, "samples should differ"
    for i in range(3):
        alone = greedy(model, encode(model, images[i:i + 1], QUESTIONS[i:i + 1]))
        assert torch.equal(together[i:i + 1], alone), f"sample {i} differs when batched"


def test_reused_image_features_give_the_same_tokens(setup):
    model, images = setup
    batch = encode(model, images[:2], QUESTIONS[:2])
    from_pixels = greedy(model, batch)
    encoded = model.encode_images(batch["pixel_values"], batch.get("image_sizes"))
    reused = greedy(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                    images=encoded)
    assert torch.equal(from_pixels, reused)


def test_safety_tokens_take_part_in_generation(setup):
    """The LLM reads the safety tokens: changing them changes the greedy continuation."""
    model, images = setup
    batch = encode(model, images[:1], QUESTIONS[:1])
    before = greedy(model, batch)
    with torch.no_grad():
        model.safety.llm_tokens.normal_(std=5.0)
    assert not torch.equal(before, greedy(model, batch))
