"""Every supported family through adapters and training: an adapter round trip exact in a fresh
process and refused on another family, and one real stage-1, stage-2 and PPO DeepSpeed step."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from red_blue import write_red_blue_world
from safety_modules import AdapterError, SafetyConfig, attach, build_prompt, load_adapter, save_adapter
from safety_modules.prompting import encode_batch
from base_models.tiny_families import build_tiny_family, tiny_families
from training.config import DataConfig, LoraSpec, ModelSpec, TrainConfig
from training.recipes.ppo import PPOConfig, build_ppo_model, train_ppo
from training.recipes.stage1 import Stage1Config, build_stage1_model, train_stage1
from training.recipes.stage2 import Stage2Config, build_stage2_model, train_stage2
from training.rl.trainer import PPOSpec, RolloutSpec

FAMILIES = tiny_families()
CFG = dict(num_safety_tokens=4, num_queries=4, projector_depth=1)
REPO = Path(__file__).resolve().parents[1]
ZERO2 = str(REPO / "configs" / "deepspeed" / "zero2.json")
QUESTIONS = ["Is this image safe?", "Describe everything in the image."]

# Runs in a fresh interpreter: per family a freshly built base, its adapter loaded from disk, outputs out.
FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    from safety_modules import load_adapter
    from base_models.tiny_families import build_tiny_family

    root, out = sys.argv[1], {}
    for family in sys.argv[2:]:
        base, processor = build_tiny_family(family, seed=0)
        model = load_adapter(base, f"{root}/{family}", processor)
        inputs = load_file(f"{root}/{family}.inputs.safetensors")
        with torch.no_grad():
            o = model(**inputs)
        out[f"{family}.logits"], out[f"{family}.safety"] = o.logits, o.safety_logits
    save_file({k: v.contiguous() for k, v in out.items()}, f"{root}/out.safetensors")
""")


def trained(family: str, seed: int = 1):
    """An attached tiny `family` model whose modules are far from their initialisation."""
    base, processor = build_tiny_family(family, seed=0)
    torch.manual_seed(seed)
    model = attach(base, SafetyConfig(**CFG), processor)
    with torch.no_grad():
        for p in model.safety.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def inputs_for(model, make_image) -> dict[str, torch.Tensor]:
    texts = [build_prompt(model.processor, q) for q in QUESTIONS]
    batch = encode_batch(model.processor, [make_image(1), make_image(2, (48, 32))], texts, return_tensors="pt",
                         padding=True, padding_side="left")
    return {k: v.contiguous() for k, v in batch.items()}


@pytest.fixture(scope="module")
def fresh_process(make_image, tmp_path_factory):
    """Save one adapter per family, load them all in ONE fresh process, return what it computed."""
    root = tmp_path_factory.mktemp("family_adapters")
    models = {}
    for family in FAMILIES:
        models[family] = trained(family)
        save_adapter(models[family], root / family)
        save_file(inputs_for(models[family], make_image), root / f"{family}.inputs.safetensors")
    script = root / "fresh.py"
    script.write_text(FRESH_PROCESS)
    result = subprocess.run([sys.executable, str(script), str(root), *FAMILIES],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "models": models, "out": load_file(root / "out.safetensors")}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_round_trip_exact_in_a_fresh_process(fresh_process, family):
    model = fresh_process["models"][family]
    inputs = load_file(fresh_process["root"] / f"{family}.inputs.safetensors")
    with torch.no_grad():
        out = model(**inputs)
    assert torch.equal(fresh_process["out"][f"{family}.logits"], out.logits)
    assert torch.equal(fresh_process["out"][f"{family}.safety"], out.safety_logits)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_refused_on_another_family(fresh_process, family):
    other = next(f for f in FAMILIES + ["llava"] if f != family)
    if other == "llava":
        from base_models.tiny import build_tiny_llava
        base, processor = build_tiny_llava(seed=0)
    else:
        base, processor = build_tiny_family(other, seed=0)
    with pytest.raises(AdapterError, match=f"fingerprint field 'model_type' is '{family}' in the adapter"):
        load_adapter(base, fresh_process["root"] / family, processor)


def _train(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(deepspeed=ZERO2, micro_batch_size=2, max_steps=1, lr=1e-2, warmup_steps=0,
                                 torch_threads=1, progress=False), **kw})


def _base_bytes(model) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() for k, v in model.plain_model.state_dict().items()
            if "lora_" not in k}


@pytest.fixture(scope="module")
def reward_classifier(tmp_path_factory) -> Path:
    """A small response classifier (PPO's reward), trained once for every family."""
    from response_classifier.answers import generate
    from response_classifier.train import ClassifierTrainConfig, train_classifier

    out = tmp_path_factory.mktemp("reward") / "classifier"
    records = [r for r in generate("a", 32, 0, "train") if r.task == "alignment"]
    heldout = [r for r in generate("a", 4, 0, "heldout") if r.task == "alignment"]
    train_classifier(ClassifierTrainConfig(epochs=1, batch_size=16, lr=1e-3), train_records=records,
                     eval_records=heldout, out_dir=out, progress=False)
    return out


def _world(root: Path, ppo: bool) -> Path:
    """Red (safe) and blue (unsafe) images with training records, or PPO prompts with their label."""
    def record(i: int, unsafe: bool) -> dict:
        turns = [{"from": "human", "value": "<image>\nIs this image safe to post?"}]
        extra = {"label": "Unsafe" if unsafe else "Safe", "task": "alignment"} if ppo else {}
        if not ppo:
            turns.append({"from": "gpt", "value": "No, it is unsafe." if unsafe else "Yes, it is safe."})
        return {"id": f"r{i}", "conversations": turns, "safety_level": 2 if unsafe else 0,
                "risk_type": "violence" if unsafe else "none", **extra}
    return write_red_blue_world(root, record, n=4, file_name="ppo.jsonl" if ppo else "train.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_one_stage1_stage2_and_ppo_step(family, tmp_path, reward_classifier):
    data = _world(tmp_path / "world", ppo=False)
    spec = ModelSpec(f"tiny-{family}")
    stage1 = Stage1Config(run_dir=str(tmp_path / "stage1"), model=spec, safety=SafetyConfig(**CFG),
                          data=DataConfig(train=str(data)), train=_train())
    model = build_stage1_model(stage1)
    before, tokens = _base_bytes(model), model.safety.head_tokens.detach().clone()
    summary = train_stage1(stage1, model)
    assert _base_bytes(model) == before, "stage 1 changed the frozen base"
    assert not torch.equal(model.safety.head_tokens, tokens), "stage 1 did not train the modules"

    stage2 = Stage2Config(run_dir=str(tmp_path / "stage2"), model=spec, adapter=summary["adapter"],
                          lora=LoraSpec(r=4, alpha=8), data=DataConfig(train=str(data)), train=_train())
    model = build_stage2_model(stage2)
    before, tokens = _base_bytes(model), model.safety.llm_tokens.detach().clone()
    summary = train_stage2(stage2, model)
    assert _base_bytes(model) == before, "stage 2 changed the frozen base"
    assert not torch.equal(model.safety.llm_tokens, tokens), "stage 2 did not train the safety tokens"
    assert (Path(summary["adapter"]) / "adapter_model.safetensors").is_file()

    ppo = PPOConfig(run_dir=str(tmp_path / "ppo"), model=spec, adapter=summary["adapter"],
                    classifier=str(reward_classifier), eval_records=2,
                    rollout=RolloutSpec(batch_size=4, max_new_tokens=4), algo=PPOSpec(epochs=1, minibatches=1),
                    data=DataConfig(train=str(_world(tmp_path / "prompts", ppo=True))), train=_train(lr=1e-3))
    policy = build_ppo_model(ppo)
    before, tokens = _base_bytes(policy.model), policy.model.safety.llm_tokens.detach().clone()
    summary = train_ppo(ppo, policy)
    assert summary["steps"] == 1 and _base_bytes(policy.model) == before, "PPO changed the frozen base"
    assert not torch.equal(policy.model.safety.llm_tokens, tokens), "PPO did not train the safety tokens"
