"""Adapters: exact round trip in a fresh process (with and without a LoRA), and loud failures for a
different base, renamed or misshapen tensors, and corrupt or truncated files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safety_modules import AdapterError, SafetyConfig, add_lora, attach, build_prompt, load_adapter, save_adapter
from safety_modules.adapter_io import CONFIG_NAME, LORA_WEIGHTS_NAME, WEIGHTS_NAME

CFG = dict(num_safety_tokens=4, num_queries=4, projector_depth=1)

# Runs in a fresh interpreter: a freshly built base, the adapter loaded from disk, outputs written out.
FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    from safety_modules import has_lora, load_adapter
    from base_models.tiny import build_tiny_llava

    inputs = load_file(sys.argv[1])
    out = {}
    for i, adapter in enumerate(sys.argv[3:]):
        base, processor = build_tiny_llava(seed=0)
        model = load_adapter(base, adapter, processor)
        with torch.no_grad():
            o = model(**inputs)
            out[f"{i}.logits"], out[f"{i}.safety"], out[f"{i}.risk"] = o.logits, o.safety_logits, o.risk_logits
            if has_lora(model):
                with model.base.disable_adapter():
                    out[f"{i}.no_lora_logits"] = model(**inputs).logits
    save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[2])
""")


def trained_model(tiny_builder, seed: int = 1, lora: bool = False, family: str = "llava", **sizes):
    """An attached tiny model whose modules (and LoRA) are far from their initialisation."""
    base, processor = tiny_builder(family, **sizes)
    torch.manual_seed(seed)
    model = attach(base, SafetyConfig(**CFG), processor)
    if lora:
        add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("safety.") or "lora_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model, processor


def inputs_for(model, make_image) -> dict[str, torch.Tensor]:
    texts = [build_prompt(model.processor, q) for q in ["Is this image safe?", "Describe everything in the image."]]
    batch = model.processor(images=[make_image(1), make_image(2)], text=texts, return_tensors="pt",
                            padding=True, padding_side="left")
    return {k: v.contiguous() for k, v in batch.items()}


def outputs(model, inputs):
    with torch.no_grad():
        o = model(**inputs)
    return o.logits, o.safety_logits, o.risk_logits


@pytest.fixture(scope="module")
def fresh_process(tiny_builder, make_image, tmp_path_factory):
    """Save two adapters (plain, with LoRA), load both in ONE fresh process, return everything."""
    root = tmp_path_factory.mktemp("adapters")
    plain, _ = trained_model(tiny_builder, seed=1)
    lora, _ = trained_model(tiny_builder, seed=2, lora=True)
    inputs = inputs_for(plain, make_image)
    save_file(inputs, root / "inputs.safetensors")
    save_adapter(plain, root / "plain")
    save_adapter(lora, root / "lora")
    script = root / "fresh.py"
    script.write_text(FRESH_PROCESS)
    result = subprocess.run([sys.executable, str(script), str(root / "inputs.safetensors"),
                             str(root / "out.safetensors"), str(root / "plain"), str(root / "lora")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"plain": plain, "lora": lora, "inputs": inputs, "root": root,
            "out": load_file(root / "out.safetensors")}


@pytest.mark.slow
def test_round_trip_exact_in_a_fresh_process(fresh_process, tiny_builder):
    model, inputs, out = fresh_process["plain"], fresh_process["inputs"], fresh_process["out"]
    logits, safety, risk = outputs(model, inputs)
    assert torch.equal(out["0.logits"], logits)
    assert torch.equal(out["0.safety"], safety)
    assert torch.equal(out["0.risk"], risk)
    # the adapter is what makes them equal: modules from another initialisation give other outputs
    other, _ = trained_model(tiny_builder, seed=3)
    other_logits, other_safety, _ = outputs(other, inputs)
    assert not torch.equal(other_logits, logits) and not torch.equal(other_safety, safety)
    names = set(load_file(fresh_process["root"] / "plain" / WEIGHTS_NAME))
    assert names == set(model.safety.state_dict()), "only the safety modules are saved"
    assert not (fresh_process["root"] / "plain" / LORA_WEIGHTS_NAME).exists()


@pytest.mark.slow
def test_round_trip_exact_with_lora_in_a_fresh_process(fresh_process):
    model, inputs, out = fresh_process["lora"], fresh_process["inputs"], fresh_process["out"]
    logits, safety, risk = outputs(model, inputs)
    assert torch.equal(out["1.logits"], logits)
    assert torch.equal(out["1.safety"], safety)
    assert torch.equal(out["1.risk"], risk)
    with torch.no_grad(), model.base.disable_adapter():
        no_lora = model(**inputs).logits
    assert torch.equal(out["1.no_lora_logits"], no_lora)
    assert not torch.allclose(no_lora, logits, atol=1e-3), "the LoRA should matter"
    meta = json.loads((fresh_process["root"] / "lora" / CONFIG_NAME).read_text())
    assert meta["has_lora"] is True
    assert (fresh_process["root"] / "lora" / LORA_WEIGHTS_NAME).is_file()


def test_round_trip_in_process_onto_an_attached_model(tiny_builder, make_image, tmp_path):
    model, _ = trained_model(tiny_builder, seed=1)
    save_adapter(model, tmp_path)
    target, _ = trained_model(tiny_builder, seed=5)   # same config, other weights
    inputs = inputs_for(model, make_image)
    assert not torch.equal(outputs(target, inputs)[1], outputs(model, inputs)[1])
    load_adapter(target, tmp_path)
    for a, b in zip(outputs(target, inputs), outputs(model, inputs)):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in target.safety.parameters())  # trainable=False by default
    load_adapter(target, tmp_path, trainable=True)
    assert all(p.requires_grad for p in target.safety.parameters())

    base, processor = tiny_builder("llava")
    other_cfg = attach(base, SafetyConfig(num_safety_tokens=2, num_queries=4, projector_depth=1), processor)
    with pytest.raises(AdapterError, match="safety_config differs"):
        load_adapter(other_cfg, tmp_path)


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, sizes, field", [
    ("llava", dict(text_hidden=96), "text_hidden_size"),
    ("llava", dict(vision_hidden=48, vision_heads=3), "vision_hidden_size"),
    ("llava", dict(text_layers=3), "text_num_layers"),
    ("llava_next", {}, "model_type"),
])
def test_adapter_for_another_base_names_the_field(tiny_builder, tmp_path, family, sizes, field):
    model, _ = trained_model(tiny_builder, family=family, **sizes)
    save_adapter(model, tmp_path)
    base, processor = tiny_builder("llava")
    with pytest.raises(AdapterError) as err:
        load_adapter(base, tmp_path, processor)
    message = str(err.value)
    assert repr(field) in message and CONFIG_NAME in message and "different base" in message


@pytest.fixture
def saved(tiny_builder, tmp_path):
    model, _ = trained_model(tiny_builder, seed=1)
    save_adapter(model, tmp_path)
    return tmp_path


def rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def load_fresh(tiny_builder, directory):
    base, processor = tiny_builder("llava")
    return load_adapter(base, directory, processor)


def test_renamed_tensor_is_an_error(tiny_builder, saved):
    rewrite(saved / WEIGHTS_NAME, lambda t: t.__setitem__("head.levels.weight", t.pop("head.level.weight")))
    with pytest.raises(AdapterError) as err:
        load_fresh(tiny_builder, saved)
    message = str(err.value)
    assert "head.level.weight" in message and "head.levels.weight" in message and WEIGHTS_NAME in message


def test_missing_or_extra_tensor_is_an_error(tiny_builder, saved):
    rewrite(saved / WEIGHTS_NAME, lambda t: t.__setitem__("extra.weight", torch.zeros(2)))
    with pytest.raises(AdapterError, match="unexpected.*extra.weight"):
        load_fresh(tiny_builder, saved)
    rewrite(saved / WEIGHTS_NAME, lambda t: (t.pop("extra.weight"), t.pop("llm_tokens")))
    with pytest.raises(AdapterError, match="missing.*llm_tokens"):
        load_fresh(tiny_builder, saved)


def test_misshapen_tensor_is_an_error(tiny_builder, saved):
    rewrite(saved / WEIGHTS_NAME, lambda t: t.__setitem__("head_tokens", torch.zeros(5, 64)))
    with pytest.raises(AdapterError, match=r"head_tokens.*\(5, 64\).*\(4, 64\)"):
        load_fresh(tiny_builder, saved)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_weights_file_is_a_clear_error(tiny_builder, saved, damage):
    path = saved / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 64 + data[64:],
                      "empty": b""}[damage])
    with pytest.raises(AdapterError) as err:
        load_fresh(tiny_builder, saved)
    assert str(path) in str(err.value) and "corrupt or truncated" in str(err.value)


def test_corrupt_or_missing_config_is_a_clear_error(tiny_builder, saved):
    meta = json.loads((saved / CONFIG_NAME).read_text())
    (saved / CONFIG_NAME).write_text('{"safety_config": {')
    with pytest.raises(AdapterError, match=f"{CONFIG_NAME}.*not valid JSON"):
        load_fresh(tiny_builder, saved)
    (saved / CONFIG_NAME).write_text(json.dumps({**meta, "safety_config": {"num_safety_tokenz": 4}}))
    with pytest.raises(AdapterError, match="num_safety_tokenz"):
        load_fresh(tiny_builder, saved)
    (saved / CONFIG_NAME).unlink()
    with pytest.raises(AdapterError, match=f"{CONFIG_NAME} is missing"):
        load_fresh(tiny_builder, saved)


def test_missing_weights_file_is_a_clear_error(tiny_builder, saved):
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match=f"{WEIGHTS_NAME}: adapter weights are missing"):
        load_fresh(tiny_builder, saved)


def test_lora_files_are_checked_too(tiny_builder, tmp_path):
    model, _ = trained_model(tiny_builder, seed=2, lora=True)
    save_adapter(model, tmp_path)
    # a LoRA saved under the wrong prefix would load as a silent no-op; it must be refused
    rewrite(tmp_path / LORA_WEIGHTS_NAME,
            lambda t: [t.__setitem__(k.replace("base_model.model.", "wrong."), t.pop(k)) for k in list(t)])
    with pytest.raises(AdapterError, match="LoRA tensor names"):
        load_fresh(tiny_builder, tmp_path)
    data = (tmp_path / LORA_WEIGHTS_NAME).read_bytes()
    (tmp_path / LORA_WEIGHTS_NAME).write_bytes(data[: len(data) // 3])
    base, processor = tiny_builder("llava")
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_adapter(base, tmp_path, processor)
    assert not any("lora_" in n for n, _ in base.named_modules()), "a failed load left LoRA layers behind"
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="records a LoRA"):
        load_fresh(tiny_builder, tmp_path)


def test_lora_loads_into_an_existing_lora_only_with_the_same_settings(tiny_builder, make_image, tmp_path):
    model, _ = trained_model(tiny_builder, seed=2, lora=True)
    save_adapter(model, tmp_path)
    inputs = inputs_for(model, make_image)
    same, _ = trained_model(tiny_builder, seed=4, lora=True)   # r=4, alpha=8 as saved, other weights
    load_adapter(same, tmp_path)
    for a, b in zip(outputs(same, inputs), outputs(model, inputs)):
        assert torch.equal(a, b)
    other, _ = trained_model(tiny_builder, seed=4)
    add_lora(other, r=4, alpha=16)   # same shapes, other scaling: loading would silently differ
    with pytest.raises(AdapterError, match="'lora_alpha' is 8 in the adapter but 16"):
        load_adapter(other, tmp_path)
