"""The guard: its verdict is the full forward's head output, a guarded generate runs the vision tower
once, and its policy fills every template (the reference shipped a literal placeholder)."""

from __future__ import annotations

import pytest
import torch

from safety_modules import GuardPolicy, SafetyConfig, SafetyGuard, Verdict, attach, build_prompt
from safety_modules.guard import DEFAULT_GUARD_PROMPT

QUESTIONS = ["Is this image safe?", "Could this picture upset a child who sees it online?", "Describe it."]
NEVER = 99  # a policy level no verdict reaches


def attached(tiny_builder, family, seed=0):
    base, processor = tiny_builder(family)
    torch.manual_seed(seed)
    return attach(base, SafetyConfig(num_safety_tokens=4, num_queries=4, projector_depth=1), processor), processor


@pytest.fixture(params=["llava", "llava_next"])
def setup(request, tiny_builder, make_image):
    model, processor = attached(tiny_builder, request.param)
    images = [make_image(1), make_image(2, (48, 32)), make_image(3, (32, 64))]
    return model, processor, images


def forward_batch(model, images, questions):
    texts = [build_prompt(model.processor, q) for q in questions]
    return dict(model.processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left"))


def test_verdict_equals_the_full_forward_head(setup):
    model, _, images = setup
    verdicts = SafetyGuard(model).verdict(images, QUESTIONS)
    assert len(verdicts) == 3
    names = model.safety_config.risk_types
    for i, verdict in enumerate(verdicts):
        # the full forward (LLM included) on this sample alone, no padding
        with torch.no_grad():
            out = model(**forward_batch(model, images[i:i + 1], QUESTIONS[i:i + 1]))
        assert out.logits is not None
        level_p = out.safety_logits[0].softmax(-1)
        risk_p = out.risk_logits[0].softmax(-1)
        torch.testing.assert_close(torch.tensor(verdict.level_probs), level_p, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.tensor([verdict.risk_probs[n] for n in names]), risk_p, rtol=0, atol=1e-6)
        assert verdict.level == int(level_p.argmax())
        assert verdict.risk_type == names[int(risk_p.argmax())]
        assert verdict.unsafe_prob == pytest.approx(1 - float(level_p[0]), abs=1e-6)
    # the same batch through forward gives the same bits as the guard
    with torch.no_grad():
        out = model(**forward_batch(model, images, QUESTIONS))
    assert [v.level_probs for v in verdicts] == out.safety_logits.softmax(-1).tolist()


def test_default_prompt_and_prompt_checks(setup):
    model, _, images = setup
    guard = SafetyGuard(model)
    one = guard.verdict(images[:2])                  # the default question for every image
    also = guard.verdict(images[:2], [DEFAULT_GUARD_PROMPT] * 2)
    assert [v.level_probs for v in one] == [v.level_probs for v in also]
    assert [v.level_probs for v in one] != [v.level_probs for v in guard.verdict(images[:2], "Describe it.")]
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        guard.verdict(images[:2], QUESTIONS)


def count_vision_calls(model):
    calls = []
    handle = model.plain_model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("policy, actions", [
    (GuardPolicy(refuse_at_level=NEVER, instruct_at_level=NEVER), {"pass"}),
    (GuardPolicy(refuse_at_level=NEVER, instruct_at_level=0), {"instruct"}),
    (GuardPolicy(refuse_at_level=0, instruct_at_level=0), {"refuse"}),
], ids=["pass", "instruct", "refuse"])
def test_guarded_generate_runs_the_vision_tower_once(setup, policy, actions):
    model, _, images = setup
    guard = SafetyGuard(model, policy=policy)
    calls, handle = count_vision_calls(model)
    try:
        responses = guard.generate(images, QUESTIONS, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    finally:
        handle.remove()
    assert len(calls) == 1, f"vision tower ran {len(calls)} times for one guarded generate"
    assert {r.action for r in responses} == actions
    for r in responses:
        assert r.text and "{" not in r.text and "}" not in r.text
        if r.action == "refuse":
            assert r.text == policy.fill(policy.refusal_template, r.verdict)
            assert r.verdict.risk_type in r.text


def test_guarded_generate_matches_plain_generation(setup):
    """Reusing the guard's vision features gives exactly what a plain generate on the same text gives."""
    model, _, images = setup
    tok = model.processor.tokenizer
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    for policy in [GuardPolicy(refuse_at_level=NEVER, instruct_at_level=NEVER),
                   GuardPolicy(refuse_at_level=NEVER, instruct_at_level=0)]:
        guard = SafetyGuard(model, policy=policy)
        responses = guard.generate(images[:2], QUESTIONS[:2], **gen)
        for i, r in enumerate(responses):
            prefix = policy.fill(policy.instruction_template, r.verdict) if r.action == "instruct" else ""
            batch = forward_batch(model, images[i:i + 1], [prefix + QUESTIONS[i]])
            expected = tok.decode(model.generate(**batch, **gen)[0], skip_special_tokens=True).strip()
            assert r.text == expected


def test_mixed_actions_in_one_batch(setup, tiny_builder):
    model, _, images = setup
    family = model.config.model_type
    for seed in range(20):  # untrained modules: find an initialisation whose verdicts differ
        model, _ = attached(tiny_builder, family, seed)
        levels = [v.level for v in SafetyGuard(model).verdict(images, QUESTIONS)]
        if len(set(levels)) > 1:
            break
    assert len(set(levels)) > 1, "no seed gave different verdicts"
    # refuse the samples at the highest level seen, instruct the others
    policy = GuardPolicy(refuse_at_level=max(levels), instruct_at_level=min(levels))
    calls, handle = count_vision_calls(model)
    try:
        responses = SafetyGuard(model, policy=policy).generate(images, QUESTIONS, max_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert [r.action for r in responses] == [policy.action(lv) for lv in levels]
    assert {r.action for r in responses} >= {"refuse"} and len({r.action for r in responses}) == 2
    assert [r.prompt for r in responses] == QUESTIONS


def test_guard_does_not_change_the_callers_tokenizer(setup):
    model, processor, images = setup
    processor.tokenizer.padding_side = "right"          # e.g. a training collator's choice
    SafetyGuard(model).verdict(images[:2], QUESTIONS[:2])
    assert processor.tokenizer.padding_side == "right"
    assert model.processor.tokenizer.padding_side == "right"


def test_guard_needs_the_reserving_processor(setup, tiny_builder):
    model, processor, _ = setup
    with pytest.raises(ValueError, match="processor returned by attach"):
        SafetyGuard(model, processor=processor)
    base, _ = tiny_builder("llava")
    without = attach(base, SafetyConfig(num_safety_tokens=2, num_queries=4, projector_depth=1))
    with pytest.raises(ValueError, match="needs a processor"):
        SafetyGuard(without)


# -- the policy -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field, template, words", [
    ("refusal_template", "Sorry, {user}, this is {risk_type}.", "'user'"),
    ("instruction_template", "Careful: {category} content.", "'category'"),
    ("refusal_template", "Sorry: {} content.", "positional"),
    ("refusal_template", "Sorry: {0} content.", "'0'"),
    ("refusal_template", "Sorry: {risk_type.upper} content.", "'risk_type.upper'"),
    ("instruction_template", "Sorry: {risk_type content.", "not a valid template"),
])
def test_policy_rejects_unknown_placeholders(field, template, words):
    with pytest.raises(ValueError) as err:
        GuardPolicy(**{field: template})
    assert field in str(err.value) and words in str(err.value)


def test_policy_fills_every_placeholder_and_maps_levels():
    verdict = Verdict(level=3, risk_type="violence", level_probs=[0.1, 0.1, 0.1, 0.7], risk_probs={})
    default = GuardPolicy()
    for template in (default.refusal_template, default.instruction_template):
        text = default.fill(template, verdict)
        assert "{" not in text and "}" not in text, f"unfilled placeholder in {text!r}"
        assert "violence" in text
    custom = GuardPolicy(refusal_template="No ({level}/{risk_type}); literal {{braces}} kept.")
    assert custom.fill(custom.refusal_template, verdict) == "No (3/violence); literal {braces} kept."
    policy = GuardPolicy(refuse_at_level=2, instruct_at_level=1)
    assert [policy.action(level) for level in range(4)] == ["pass", "instruct", "refuse", "refuse"]
    with pytest.raises(ValueError, match="instruct_at_level"):
        GuardPolicy(refuse_at_level=1, instruct_at_level=2)
