"""The collator: right padding, the prompt (image placeholders included) masked out of the labels,
and decoding the label positions gives back exactly the response -- for LLaVA and LLaVA-NeXT, with
the attached processor (reserved safety positions) and with a plain one (stage 0)."""

from __future__ import annotations

import pytest
import torch

from safety_modules import SafetyConfig, attach, build_prompt
from training.collator import IGNORE_INDEX, TrainingCollator

CFG = SafetyConfig(num_safety_tokens=4, num_queries=4, projector_depth=1)
ANSWERS = ["No, this image shows a weapon and is unsafe.", "Yes."]


def rows(tmp_path, make_image, sizes=((32, 32), (64, 32))):
    out = []
    for i, (size, answer) in enumerate(zip(sizes, ANSWERS)):
        path = tmp_path / f"{i}.png"
        make_image(seed=i, size=size).save(path)
        out.append({"id": f"r{i}", "image": str(path), "question": ["Is this image safe?", "Safe to post?"][i],
                    "answer": answer, "safety_level": [2, 0][i], "risk_type": [1, 0][i], "source": f"f:{i + 1}"})
    return out


def processors(tiny_builder, family):
    model, processor = tiny_builder(family)
    return {"attached": attach(model, CFG, processor).processor, "plain": processor}


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("which", ["attached", "plain"])
def test_labels_decode_to_exactly_the_response(tmp_path, make_image, tiny_builder, family, which):
    processor = processors(tiny_builder, family)[which]
    batch = TrainingCollator(processor)(rows(tmp_path, make_image))
    tok = processor.tokenizer
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    eos = tok.eos_token
    for i, answer in enumerate(ANSWERS):
        target = labels[i][labels[i] != IGNORE_INDEX]
        assert tok.decode(target) == " " + answer + eos          # exactly the response, nothing else
        assert tok.decode(target).strip() == answer + eos
        # right padding: real tokens first, then padding, which is never a target
        n = int(mask[i].sum())
        assert bool(mask[i, :n].all()) and not bool(mask[i, n:].any())
        assert bool((labels[i, n:] == IGNORE_INDEX).all())
        # the labelled span is the tail of the real tokens, and everything before it is the prompt
        first = int((labels[i] != IGNORE_INDEX).nonzero()[0])
        assert torch.equal(labels[i, first:n], ids[i, first:n])
        prompt = build_prompt(processor, ["Is this image safe?", "Safe to post?"][i])
        strip = processor.image_token
        assert tok.decode(ids[i, :first]).replace(strip, "") == prompt.replace(strip, "")
    # image placeholders are never targets
    placeholders = ids == processor.image_token_id
    assert placeholders.any() and bool((labels[placeholders] == IGNORE_INDEX).all())
    assert batch["safety_labels"].tolist() == [2, 0] and batch["risk_labels"].tolist() == [1, 0]
    assert batch["pixel_values"].shape[0] == 2
    assert ("image_sizes" in batch) == (family == "llava_next")


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_attached_processor_reserves_the_safety_positions(tmp_path, make_image, tiny_builder, family):
    procs = processors(tiny_builder, family)
    data = rows(tmp_path, make_image)
    attached, plain = TrainingCollator(procs["attached"])(data), TrainingCollator(procs["plain"])(data)
    token = procs["plain"].image_token_id
    extra = (attached["input_ids"] == token).sum(1) - (plain["input_ids"] == token).sum(1)
    assert extra.tolist() == [CFG.num_safety_tokens] * 2


def test_the_batch_runs_through_the_attached_model(tmp_path, make_image, tiny_builder):
    model, processor = tiny_builder("llava_next")
    safe = attach(model, CFG, processor)
    batch = TrainingCollator(safe.processor)(rows(tmp_path, make_image))
    out = safe(**batch)
    assert torch.isfinite(out.loss) and out.lm_loss is not None and out.safety_loss is not None


def test_prompt_only_mode_labels_nothing(tmp_path, make_image, tiny_builder):
    processor = processors(tiny_builder, "llava")["attached"]
    batch = TrainingCollator(processor, with_response=False)(rows(tmp_path, make_image))
    assert bool((batch["labels"] == IGNORE_INDEX).all())
    text = processor.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert text.replace(processor.image_token, "").endswith("ASSISTANT:")


def test_max_length_cuts_responses_not_prompts(tmp_path, make_image, tiny_builder):
    processor = processors(tiny_builder, "llava")["attached"]
    data = rows(tmp_path, make_image, sizes=((32, 32), (32, 32)))
    full = TrainingCollator(processor)(data)
    prompt_len = int((full["labels"][0] != IGNORE_INDEX).nonzero()[0])     # first response position
    cut = TrainingCollator(processor, max_length=prompt_len + 2)(data)
    assert cut["input_ids"].shape[1] == prompt_len + 2
    assert int((cut["labels"][0] != IGNORE_INDEX).sum()) == 2
    with pytest.raises(ValueError, match=r"f:1: the prompt alone is \d+ tokens, over max_length=5"):
        TrainingCollator(processor, max_length=5)(data)
