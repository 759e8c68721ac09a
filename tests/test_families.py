"""Every supported family on its tiny random model, through the same public API.

Per family: with safety tokens in front of each image, the wrapper's logits, greedy tokens and LM
loss equal those of the UNCHANGED model whose extra slots are ordinary tokens carrying the safety
vectors (max difference 0); without the family's extra inputs the logits differ a lot (the negative
control); greedy tokens are equal with KV cache and by full recomputation, and batched vs one at a time; reused
vision features give the same tokens; gradients reach the safety tokens and nothing of the base;
the guard's verdict is the forward's head output; collator labels decode to the answer + EOS, and a
collated batch equals the unchanged model on it; PPO's scoring forward reads the response as
generation did.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from greedy import eos_ids, greedy_by_full_forwards
from safety_modules import SafetyConfig, SafetyGuard, attach, build_prompt
from safety_modules.prompting import encode_batch, takes_suffix
from safety_modules.families import TOKEN_TYPE_NAMES
from base_models.tiny_families import build_tiny_family, tiny_families
from training.collator import IGNORE_INDEX, TrainingCollator, plain_model_inputs

FAMILIES = tiny_families()
CFG = SafetyConfig(num_safety_tokens=4, num_queries=4, projector_depth=1)
SAFETY_TOKEN_STD = 1.0   # safety tokens far from any text embedding, so that their place matters
NEW_TOKENS = 8
QUESTIONS = ["Describe it.", "Is this picture of a street safe to share with other people online?", "What is shown?"]
SIZES = [(32, 32), (48, 32), (32, 64)]
# The negative control: without the family's extra inputs the logits (spanning about +-7 on the tiny
# models) move by more than this, five orders of magnitude above float rounding.
CONTROL_MIN_DIFFERENCE = 0.5


@functools.lru_cache(maxsize=None)
def _built(family: str):
    with torch.random.fork_rng():
        return build_tiny_family(family, seed=0)


def fresh_model(family: str):
    """A fresh attached copy of the tiny `family` model, its safety tokens seeded and scaled up."""
    base, processor = (copy.deepcopy(x) for x in _built(family))
    torch.manual_seed(1)
    model = attach(base, CFG, processor)
    with torch.no_grad():
        model.safety.llm_tokens.normal_(std=SAFETY_TOKEN_STD)
    return model, processor


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def attached(family):
    """(attached model, plain processor) shared by the read-only tests of one family."""
    return fresh_model(family)


@pytest.fixture(scope="module")
def images(make_image):
    return [make_image(i + 1, size) for i, size in enumerate(SIZES)]


def encode(model, images, questions, padding_side="left") -> dict:
    texts = [build_prompt(model.processor, q) for q in questions]
    return dict(encode_batch(model.processor, images, texts, return_tensors="pt", padding=True,
                             padding_side=padding_side))


def greedy(generate, batch, **kwargs) -> torch.Tensor:
    return generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


def ordinary_token_reference(model, batch):
    """The unchanged base whose `k` ordinary tokens carry the safety vectors, `batch` with those
    tokens in the safety slots (typed as text), and the carrier ids: what the wrapper must reproduce
    exactly (as long as no carrier is generated, whose embedding only the reference changed)."""
    k = model.safety_config.num_safety_tokens
    tokenizer = model.processor.tokenizer
    special = set(tokenizer.all_special_ids)
    carriers = [i for i in range(model.config.text_config.vocab_size) if i not in special][-k:]
    reference = copy.deepcopy(model.plain_model)
    embedding = reference.get_input_embeddings()
    with torch.no_grad():  # a scaled embedding (Gemma) multiplies rows by its scale: store them divided
        embedding.weight[carriers] = model.safety.llm_tokens / getattr(embedding, "embed_scale", 1.0)
        images = model.encode_images(**model.image_inputs(batch))
    slots = model.slot_mask(batch["input_ids"], images)
    assert int(slots.sum()) == k * len(images.vision.base)
    ids = batch["input_ids"].clone()
    ids[slots] = torch.tensor(carriers).repeat(len(images.vision.base))
    ref_batch = {**batch, "input_ids": ids}
    for name in TOKEN_TYPE_NAMES:
        if name in batch:
            ref_batch[name] = batch[name].masked_fill(slots, 0)
    return reference, ref_batch, carriers


def image_token(model) -> int:
    return model.family.image_token_id(model.config)


# -- equivalence with the unchanged model -------------------------------------------------------------
def test_logits_and_loss_equal_the_unchanged_model_with_ordinary_tokens(attached, images):
    model, _ = attached
    batch = encode(model, images, QUESTIONS)
    reference, ref_batch, _ = ordinary_token_reference(model, batch)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :-3] = -100
    with torch.no_grad():  # labels only pick the compared loss: the whole sequence is prompt, as the processor typed it
        ours = model(**batch, labels=labels, prompt_mask=batch["attention_mask"].bool(), run_head=False)
        theirs = reference(**ref_batch, labels=labels)
    real = batch["attention_mask"].bool()
    assert (ours.logits - theirs.logits)[real].abs().max().item() == 0
    assert ours.lm_loss.item() == theirs.loss.item()


def test_greedy_tokens_equal_the_unchanged_model_with_ordinary_tokens(attached, images):
    model, _ = attached
    batch = encode(model, images, QUESTIONS)
    reference, ref_batch, carriers = ordinary_token_reference(model, batch)
    pad = model.processor.tokenizer.pad_token_id
    ours = greedy(model.generate, batch, pad_token_id=pad, suppress_tokens=carriers)
    theirs = greedy(reference.generate, ref_batch, pad_token_id=pad, suppress_tokens=carriers + [image_token(model)])
    assert torch.equal(ours, theirs[:, batch["input_ids"].shape[1]:])


def test_without_the_family_extras_the_logits_differ(family, images):
    """The negative control: the inputs the adapter adds are what makes the equivalence hold."""
    model, _ = fresh_model(family)
    batch = encode(model, images, QUESTIONS)
    with torch.no_grad():
        encoded = model.encode_images(**model.image_inputs(batch))
        inputs = model.llm_inputs(batch["input_ids"], batch["attention_mask"], encoded)
        ours = model.base(attention_mask=batch["attention_mask"], **inputs).logits
        bare = model.base(inputs_embeds=inputs["inputs_embeds"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    difference = (ours - bare)[real].abs().max().item()
    if set(inputs) == {"inputs_embeds"}:
        assert difference == 0, f"{family} needs no extra inputs, yet the logits moved by {difference}"
    else:
        assert difference > CONTROL_MIN_DIFFERENCE, f"{family}: extras {sorted(inputs)} change nothing"


# -- generation ---------------------------------------------------------------------------------------
def test_greedy_with_cache_equals_full_recomputation(attached, images):
    model, _ = attached
    batch = encode(model, images, QUESTIONS)
    pad = model.processor.tokenizer.pad_token_id
    cached = greedy(model.generate, batch, pad_token_id=pad)
    assert all(len(set(row)) >= 3 for row in cached.tolist()), "degenerate output would prove little"
    suppress = [image_token(model)] + eos_ids(model)   # what generate suppresses (min_new_tokens: EOS)
    assert torch.equal(cached, greedy_by_full_forwards(model, batch, NEW_TOKENS, suppress))


def test_batched_left_padding_equals_one_at_a_time(attached, images):
    model, _ = attached
    batch = encode(model, images, QUESTIONS)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3, "prompts should have different lengths"
    pad = model.processor.tokenizer.pad_token_id
    together = greedy(model.generate, batch, pad_token_id=pad)
    for i in range(len(images)):
        alone = greedy(model.generate, encode(model, images[i:i + 1], QUESTIONS[i:i + 1]), pad_token_id=pad)
        assert torch.equal(together[i:i + 1], alone), f"sample {i} differs when batched"


def test_ppo_scoring_reads_the_response_as_generation_did(attached, images):
    """PPO scores prompt + answer in one forward, told where the response starts: a greedy rollout's
    tokens are the argmax of the policy's own scores of them (a prefix-LM family would read the
    answer bidirectionally without the span)."""
    from training.rl.rollout import PolicyWithValue, sample

    model, _ = attached
    tokenizer = model.processor.tokenizer
    policy = PolicyWithValue(model)
    suppress = [image_token(model), tokenizer.pad_token_id] + eos_ids(model)
    rollout = sample(policy, encode(model, images, QUESTIONS), tokenizer, NEW_TOKENS, temperature=1.0, top_p=1.0,
                     do_sample=False, min_new_tokens=NEW_TOKENS, suppress_tokens=[tokenizer.pad_token_id])
    assert bool(rollout.response_mask.all())
    with torch.no_grad():
        logits = policy(rollout.input_ids, rollout.attention_mask, rollout.images, rollout.prompt_len,
                        with_value=False)["logits"].clone()
    logits[..., suppress] = float("-inf")
    assert torch.equal(logits.argmax(-1), rollout.response)


def test_reused_image_features_give_the_same_tokens(attached, images):
    model, _ = attached
    batch = encode(model, images, QUESTIONS)
    pad = model.processor.tokenizer.pad_token_id
    from_pixels = greedy(model.generate, batch, pad_token_id=pad)
    encoded = model.encode_images(**model.image_inputs(batch)).select([2, 0])
    text_only = {"input_ids": batch["input_ids"][[2, 0]], "attention_mask": batch["attention_mask"][[2, 0]]}
    assert torch.equal(greedy(model.generate, text_only, pad_token_id=pad, images=encoded), from_pixels[[2, 0]])


# -- training -----------------------------------------------------------------------------------------
def test_lm_gradient_reaches_the_safety_tokens_and_nothing_of_the_base(family, images):
    model, _ = fresh_model(family)
    model.train()
    batch = encode(model, images[:2], QUESTIONS[:2], padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :-3] = -100
    model(**batch, labels=labels, run_head=False).loss.backward()
    assert all(p.grad is None for p in model.base.parameters()), "gradient reached the frozen base"
    assert model.safety.llm_tokens.grad is not None and model.safety.llm_tokens.grad.abs().sum() > 0
    others = [n for n, p in model.safety.named_parameters() if n != "llm_tokens" and p.grad is not None]
    assert not others, f"the LM loss reached safety parts it never reads: {others}"


# -- guard and collator -------------------------------------------------------------------------------
def test_guard_verdict_is_the_forward_head_output(attached, images):
    model, _ = attached
    verdicts = SafetyGuard(model).verdict(images, QUESTIONS)
    with torch.no_grad():
        out = model(**encode(model, images, QUESTIONS), run_llm=False)
    assert torch.equal(torch.tensor([v.level_probs for v in verdicts]), out.safety_logits.float().softmax(-1))
    assert [v.level for v in verdicts] == out.safety_logits.argmax(-1).tolist()


ANSWERS = ["No, this image shows a weapon and is unsafe.", "Yes."]


def training_rows(make_image, tmp_path) -> list[dict]:
    """Two training records of different lengths, their images written to `tmp_path`."""
    rows = []
    for i, (size, answer) in enumerate(zip(SIZES, ANSWERS)):
        path = tmp_path / f"{i}.png"
        make_image(i, size).save(path)
        rows.append({"id": f"r{i}", "image": str(path), "question": QUESTIONS[i], "answer": answer,
                     "safety_level": i, "risk_type": i, "source": f"f:{i + 1}"})
    return rows


@pytest.mark.parametrize("which", ["attached", "plain"])
def test_collator_labels_decode_to_the_answer_and_eos(attached, make_image, tmp_path, which):
    model, plain = attached
    processor = model.processor if which == "attached" else plain
    batch = TrainingCollator(processor)(training_rows(make_image, tmp_path))
    tok = processor.tokenizer
    for i, answer in enumerate(ANSWERS):
        target = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX]
        assert tok.decode(target) == " " + answer + tok.eos_token
    if takes_suffix(processor):  # a prefix-LM processor types exactly the response as its suffix
        assert torch.equal(batch["token_type_ids"].bool(), batch["labels"] != IGNORE_INDEX)
    placeholders = batch["input_ids"] == image_token(model)
    assert placeholders.any() and bool((batch["labels"][placeholders] == IGNORE_INDEX).all())
    if which == "attached":
        with torch.no_grad():
            out = model(**batch)
        assert torch.isfinite(out.loss) and out.lm_loss is not None
    else:
        with torch.no_grad():
            out = model.plain_model(**{k: v for k, v in batch.items() if k not in ("safety_labels", "risk_labels")})
        assert torch.isfinite(out.loss)


def test_a_training_batch_equals_the_unchanged_model(attached, make_image, tmp_path):
    """A collated (right-padded, answers labelled) batch through the wrapper equals the unchanged model
    on it with ordinary-token slots: the response span the wrapper reads off the labels is the one
    the processor typed (a prefix-LM processor's suffix)."""
    model, _ = attached
    batch = TrainingCollator(model.processor)(training_rows(make_image, tmp_path))
    reference, ref_batch, _ = ordinary_token_reference(model, batch)
    with torch.no_grad():
        ours = model(**batch, run_head=False)
        theirs = reference(**plain_model_inputs(ref_batch))
    real = batch["attention_mask"].bool()
    assert (ours.logits - theirs.logits)[real].abs().max().item() == 0
    assert ours.lm_loss.item() == theirs.loss.item()


# -- evaluation of the plain model --------------------------------------------------------------------
def test_plain_model_evaluation_batched_equals_one_at_a_time(family, images):
    """`safevlm eval --model tiny-<family>`'s runner: the plain model, prompts through its own chat
    template, left-padded batches answering as each prompt alone does."""
    from eval.core.models import GenerationSettings, load_runner

    runner = load_runner(f"tiny-{family}")
    assert runner.kind == "hf"
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, greedy=True)
    together = runner.generate(QUESTIONS, images, settings)
    assert len(together) == len(QUESTIONS) and any(together)
    assert together == [runner.generate([q], [im], settings)[0] for q, im in zip(QUESTIONS, images)]


# -- failing closed -----------------------------------------------------------------------------------
# Inputs whose absence the model defines: Idefics3 assumes unpadded images without its pixel mask,
# LLaVA-OneVision one image per sample without `batch_num_images` (the framework's layout).
OPTIONAL_IMAGE_INPUTS = ("pixel_attention_mask", "batch_num_images")
def test_a_processor_without_reserved_slots_is_a_clear_error(attached, images):
    model, plain = attached
    texts = [build_prompt(plain, q) for q in QUESTIONS]
    batch = dict(encode_batch(plain, images, texts, return_tensors="pt", padding=True, padding_side="left"))
    with pytest.raises(ValueError, match=r"attach\(\)"):
        model(**batch)


def test_a_missing_image_input_is_a_clear_error(attached, images):
    """Each image input the processor returns and the family needs, dropped, is named in the error."""
    model, _ = attached
    batch = encode(model, images, QUESTIONS)
    needed = [name for name in model.family.image_input_names if name in batch and name not in OPTIONAL_IMAGE_INPUTS]
    for name in needed:
        with pytest.raises(ValueError, match=name):
            model(**{k: v for k, v in batch.items() if k != name})
