"""The safety modules on tiny LLaVA / LLaVA-NeXT models: shapes, what the head reads, what trains,
one vision pass per forward, detach, and the processor contract."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from safety_modules import SafetyConfig, SafetyVLM, add_lora, attach, build_prompt, detach

# A second tiny size: every width differs from the default (image 32/8, vision 32, text 64, 4 heads).
SIZES_B = dict(image_size=48, patch_size=8, vision_hidden=48, vision_heads=3, text_hidden=96,
               text_heads=6, text_intermediate=160)
CABS = dict(num_safety_tokens=4, num_queries=4, projector_depth=1)


def make_model(tiny_builder, family="llava", cfg=None, seed=0, **sizes) -> tuple[SafetyVLM, object]:
    """An attached tiny model (modules seeded) and the ORIGINAL processor."""
    base, processor = tiny_builder(family, **sizes)
    torch.manual_seed(seed)
    return attach(base, cfg or SafetyConfig(**CABS), processor), processor


def batch_for(processor, images, questions, padding_side="left"):
    texts = [build_prompt(processor, q) for q in questions]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side=padding_side))


# -- shapes -------------------------------------------------------------------------------------
SHAPE_CASES = [
    pytest.param("llava", {}, dict(CABS), id="llava-default-cabs"),
    pytest.param("llava_next", {}, dict(CABS), id="next-default-cabs"),
    pytest.param("llava", SIZES_B, dict(num_safety_tokens=3, num_queries=9, projector_depth=2,
                                        num_safety_levels=3, risk_types=["none", "a", "b", "c", "d"]),
                 id="llava-sizeB-cabs"),
    pytest.param("llava_next", SIZES_B, dict(num_safety_tokens=5, num_queries=4, projector_depth=1,
                                             projector_mlp_depth=3), id="next-sizeB-cabs"),
    pytest.param("llava", {}, dict(num_safety_tokens=2, projector="mlp", num_queries=1), id="llava-default-mlp"),
    pytest.param("llava_next", SIZES_B, dict(num_safety_tokens=2, projector="mlp", num_queries=1),
                 id="next-sizeB-mlp"),
]


@pytest.mark.parametrize("family, sizes, cfg_kwargs", SHAPE_CASES)
def test_shapes(tiny_builder, make_image, family, sizes, cfg_kwargs):
    cfg = SafetyConfig(**cfg_kwargs)
    model, _ = make_model(tiny_builder, family, cfg, **sizes)
    conf = model.config
    text_w, vis_w = conf.text_config.hidden_size, conf.vision_config.hidden_size
    side = conf.vision_config.image_size
    patches = (side // conf.vision_config.patch_size) ** 2
    k = cfg.num_safety_tokens

    assert model.safety.llm_tokens.shape == (k, text_w)
    assert model.safety.head_tokens.shape == (k, text_w)

    images = [make_image(1, (side, side)), make_image(2, (side + 16, side)), make_image(3, (side, 2 * side))]
    batch = batch_for(model.processor, images, ["Describe it.", "Is this image safe to post?", "Why?"])
    encoded = model.encode_images(batch["pixel_values"], batch.get("image_sizes"))
    assert encoded.vision.patches.shape == (3, patches, vis_w)
    queries = patches if cfg.projector == "mlp" else cfg.num_queries
    assert encoded.safety_features.shape == (3, queries, text_w)

    # each image's placeholder run = k safety tokens + the model's own features for that image
    slots = (batch["input_ids"] == conf.image_token_id).sum(dim=1)
    assert slots.tolist() == [k + f.shape[0] for f in encoded.vision.base]
    assert all(f.shape[-1] == text_w for f in encoded.vision.base)

    seq = batch["input_ids"].shape[1]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, : seq - 3] = -100  # the last 3 positions play the response
    out = model(**batch, labels=labels, safety_labels=torch.tensor([0, 1, 2]),
                risk_labels=torch.tensor([0, 1, len(cfg.risk_types) - 1]))
    assert out.logits.shape == (3, seq, conf.text_config.vocab_size)
    assert out.safety_logits.shape == (3, cfg.num_safety_levels)
    assert out.risk_logits.shape == (3, len(cfg.risk_types))
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.lm_loss + cfg.loss_weight * out.safety_loss, rtol=0, atol=1e-5)


def test_no_width_is_hard_coded(tiny_builder):
    """The same config attaches to two different sizes; module widths follow each base."""
    cfg = SafetyConfig(**CABS)
    a, _ = make_model(tiny_builder, "llava", cfg)
    b, _ = make_model(tiny_builder, "llava", cfg, **SIZES_B)
    assert a.safety.head.level.in_features == 64 and b.safety.head.level.in_features == 96
    assert a.safety.head.attention.num_heads == 4 and b.safety.head.attention.num_heads == 6
    assert a.safety.projector.pos_embed.shape == (1, 16, 32) and b.safety.projector.pos_embed.shape == (1, 36, 48)


# -- the head reads the question, never the padding or the response ------------------------------
def head_logits(model, batch):
    with torch.no_grad():
        out = model(**batch, run_llm=False)
    return out.safety_logits, out.risk_logits


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_head_reads_the_question(tiny_builder, make_image, family):
    model, _ = make_model(tiny_builder, family)
    image = make_image(5)
    a = head_logits(model, batch_for(model.processor, [image], ["Is this image safe for children?"]))
    b = head_logits(model, batch_for(model.processor, [image], ["Is this image violent for children?"]))
    assert (a[0] - b[0]).abs().max() > 1e-4
    assert (a[1] - b[1]).abs().max() > 1e-4
    # and the image too
    c = head_logits(model, batch_for(model.processor, [make_image(6)], ["Is this image safe for children?"]))
    assert (a[0] - c[0]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_does_not_change_the_head(tiny_builder, make_image, family, padding_side):
    model, _ = make_model(tiny_builder, family)
    image, other = make_image(5), make_image(7)
    question = "Is this safe?"
    alone = head_logits(model, batch_for(model.processor, [image], [question]))
    padded_batch = batch_for(model.processor, [image, other],
                             [question, "Please describe every object in this picture in great detail."],
                             padding_side=padding_side)
    assert (padded_batch["attention_mask"][0] == 0).sum() >= 5, "the first sample should be padded"
    padded = head_logits(model, padded_batch)
    torch.testing.assert_close(padded[0][:1], alone[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(padded[1][:1], alone[1], rtol=0, atol=1e-6)


def test_head_ignores_the_response_when_labels_mark_it(tiny_builder, make_image):
    model, _ = make_model(tiny_builder)
    proc = model.processor
    prompt = build_prompt(proc, "Is this image safe?")
    n_prompt = proc(images=[make_image(1)], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    outs = []
    for answer in [" Yes, it is safe.", " No, it shows violence."]:
        batch = dict(proc(images=[make_image(1)], text=[prompt + answer], return_tensors="pt"))
        labels = batch["input_ids"].clone()
        labels[:, :n_prompt] = -100
        assert labels.shape[1] > n_prompt
        with torch.no_grad():
            outs.append(model(**batch, labels=labels))
    torch.testing.assert_close(outs[0].safety_logits, outs[1].safety_logits, rtol=0, atol=1e-6)
    assert not torch.equal(outs[0].logits[:, -1], outs[1].logits[:, -1])  # the LLM did see the answers


# -- training touches the modules only -----------------------------------------------------------
def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


def _train_step(model, batch):
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :-4] = -100
    out = model(**batch, labels=labels, safety_labels=torch.tensor([2, 0]), risk_labels=torch.tensor([1, 0]))
    # every parameter handed to the optimizer, weight decay on: frozen ones must still not move
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-2, weight_decay=0.1)
    out.loss.backward()
    return opt


@pytest.mark.parametrize("lora", [False, True])
def test_gradients_reach_only_the_modules(tiny_builder, make_image, lora):
    model, _ = make_model(tiny_builder)
    if lora:
        add_lora(model, r=4, alpha=8)
    model.train()
    frozen = {n: _bytes(p) for n, p in model.base.named_parameters() if "lora_" not in n}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("safety.") for n in trainable_before)
    assert all(n.startswith("safety.") or "lora_" in n for n in trainable_before)

    batch = batch_for(model.processor, [make_image(1), make_image(2)], ["Is this safe?", "Describe the image."])
    opt = _train_step(model, batch)
    for name, p in model.base.named_parameters():
        if "lora_" not in name:
            assert p.grad is None, f"gradient reached the frozen base: {name}"
    for name, p in model.safety.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for safety module {name}"
    opt.step()

    for name, p in model.base.named_parameters():
        if "lora_" not in name:
            assert _bytes(p) == frozen[name], f"base weight changed: {name}"
    changed = {n for n, p in model.named_parameters() if n in trainable_before and not torch.equal(p, trainable_before[n])}
    safety_names = {n for n in trainable_before if n.startswith("safety.")}
    assert safety_names <= changed, f"modules not updated: {sorted(safety_names - changed)}"
    if lora:
        assert any("lora_" in n for n in changed)


# -- one vision pass per forward -------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_vision_tower_runs_once_per_forward(tiny_builder, make_image, family):
    model, _ = make_model(tiny_builder, family)
    calls = []
    hook = model.plain_model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        batch = batch_for(model.processor, [make_image(1), make_image(2, (48, 32))], ["Safe?", "Describe it."])
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    assert len(calls) == 1


# -- detach and the processor contract -------------------------------------------------------------
def test_detach_gives_back_the_plain_model(tiny_builder, make_image):
    base, processor = tiny_builder("llava")
    plain_batch = batch_for(processor, [make_image(1), make_image(2)], ["Is this safe?", "Describe the image now."])
    with torch.no_grad():
        before = base(**plain_batch).logits
    model = attach(base, SafetyConfig(**CABS), processor)
    add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.base.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # a LoRA that really changes the outputs
        with_lora = model.base(**plain_batch).logits
    assert not torch.allclose(with_lora, before, atol=1e-3)

    plain = detach(model)
    assert type(plain) is LlavaForConditionalGeneration
    assert not any("lora" in n for n, _ in plain.named_modules())
    assert all(p.requires_grad for p in plain.parameters()), "detach should undo attach()'s freezing"
    with torch.no_grad():
        after = plain(**plain_batch).logits
    assert torch.equal(after, before)
    with pytest.raises(TypeError, match="attach"):
        detach(plain)


def test_unreserved_processor_is_a_clear_error(tiny_builder, make_image):
    model, original = make_model(tiny_builder)
    assert model.processor is not original
    assert model.processor.num_additional_image_tokens == original.num_additional_image_tokens + CABS["num_safety_tokens"]
    batch = batch_for(original, [make_image(1)], ["Is this safe?"])   # NOT the processor attach() returned
    with pytest.raises(ValueError, match="placeholders") as err:
        model(**batch)
    assert "attach()" in str(err.value)
    with pytest.raises(ValueError, match="already attached"):
        attach(model)


def test_image_placeholders_without_pixels_is_an_error(tiny_builder, make_image):
    model, _ = make_model(tiny_builder)
    batch = batch_for(model.processor, [make_image(1)], ["Is this safe?"])
    batch.pop("pixel_values")
    with pytest.raises(ValueError, match="no pixel_values"):
        model(**batch, run_head=False)


def test_shape_specs_build_the_shape_with_seeded_random_weights(make_image):
    """`model.path: shape:NAME` (the 7B proof, the benchmarks): the named widths and depths, the same
    weights for the same seed (every rank of a run builds the same model), others for another seed,
    and a clear error for an unknown shape."""
    from base_models.loading import load_base
    from base_models.shapes import SHAPES

    one, processor = load_base("shape:small", seed=3)
    (v_hidden, v_layers, _, image, patch), (t_hidden, t_layers, _, _), _, _ = SHAPES["small"]
    assert (one.config.vision_config.hidden_size, one.config.vision_config.num_hidden_layers) == (v_hidden, v_layers)
    assert (one.config.text_config.hidden_size, one.config.text_config.num_hidden_layers) == (t_hidden, t_layers)
    assert next(one.parameters()).dtype == torch.float32            # fp32 on CPU, bf16 on a GPU
    batch = processor(images=[make_image(size=(image, image))], text=["USER: <image>\nHi ASSISTANT:"], return_tensors="pt")
    assert int((batch["input_ids"] == one.config.image_token_id).sum()) == (image // patch) ** 2
    probe = "model.language_model.layers.0.self_attn.q_proj.weight"
    same, _ = load_base("shape:small", seed=3)
    other, _ = load_base("shape:small", seed=4)
    weights = dict(one.named_parameters())[probe]
    assert torch.equal(weights, dict(same.named_parameters())[probe])
    assert not torch.equal(weights, dict(other.named_parameters())[probe])
    with pytest.raises(ValueError, match=r"model shape: expected one of .*'llava-1.5-7b'"):
        load_base("shape:llava-13b")
