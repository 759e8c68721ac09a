"""The SFT and DPO baselines on a tiny model and a small synthetic preference set.

Every run is a real one-process DeepSpeed ZeRO-2 run on CPU. Both baselines start from a stage-2
adapter (safety modules + a LoRA whose B matrices are non-zero, so that the LoRA changes the model
and "LoRA disabled" is a different model): SFT lowers the response LM loss, DPO raises the reward
accuracy and margin; the reference log-probabilities DPO used equal, bit for bit, those of a fresh
model carrying the stage-2 adapter (`reference: start`, the default: margins start at 0) or the
same safety modules and no LoRA (`reference: base`); the exported adapters load onto a fresh base
and give the trained model's logits exactly; a sweep keeps the run that is best on the held-out
slice of the training records.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from red_blue import save_stage2_adapter, write_red_blue_world
from safety_modules import SafetyConfig, attach, load_adapter, save_adapter
from safety_modules.configio import ConfigError
from base_models.loading import load_base
from safevlm.cli import main as cli_main
from training.collator import TrainingCollator
from training.config import DataConfig, ModelSpec, TrainConfig
from training.dpo_data import PairCollator
from training.recipes.baseline import split_heldout
from training.recipes.common import load_training_records
from training.recipes.dpo import DPOConfig, train_dpo
from training.recipes.registry import recipe
from training.recipes.sft import SFTConfig, train_sft
from training.recipes.start import baseline_base, build_baseline_model

REPO = Path(__file__).resolve().parents[1]
ZERO2 = str(REPO / "configs" / "deepspeed" / "zero2.json")
SAFETY = SafetyConfig(num_safety_tokens=4, num_queries=4, projector_depth=1)
SAFE, UNSAFE = "Yes, it is safe.", "No, it is unsafe."


def pair_world(root: Path, n: int = 16) -> Path:
    """n preference records: red images are safe, blue unsafe; rejected = the opposite answer."""
    return write_red_blue_world(root, lambda i, unsafe: {
        "id": f"p{i}",
        "conversations": [{"from": "human", "value": "<image>\nIs this image safe to post?"},
                          {"from": "gpt", "value": UNSAFE if unsafe else SAFE}],
        "rejected": SAFE if unsafe else UNSAFE, "label": "Unsafe" if unsafe else "Safe",
        "safety_level": 2 if unsafe else 0, "risk_type": "violence" if unsafe else "none"}, n=n)


@pytest.fixture(scope="module")
def stage2(tmp_path_factory) -> tuple[Path, Path]:
    """(records file, stage-2 adapter folder): safety modules + a LoRA that changes the model."""
    root = tmp_path_factory.mktemp("baselines")
    data = pair_world(root / "world")
    save_stage2_adapter(root / "stage2", SAFETY)
    return data, root / "stage2"


def train_cfg(**kw) -> TrainConfig:
    base = dict(deepspeed=ZERO2, micro_batch_size=4, max_steps=12, lr=3e-2, warmup_steps=1, torch_threads=1,
                progress=False)
    return TrainConfig(**{**base, **kw})


def assert_adapter_reproduces(model, adapter: Path, rows: list[dict]) -> None:
    """The exported adapter on a fresh base gives exactly the trained model's logits."""
    fresh_base, processor = load_base("tiny")
    fresh = load_adapter(fresh_base, adapter, processor).eval()
    model.eval()
    batch = TrainingCollator(model.processor)(rows)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        ours, theirs = model(**inputs), fresh(**inputs)
    assert torch.equal(ours.logits, theirs.logits)
    assert torch.equal(ours.safety_logits, theirs.safety_logits)


def test_sft_lowers_the_response_lm_loss_and_exports_an_exact_adapter(tmp_path, stage2):
    data, adapter = stage2
    cfg = SFTConfig(run_dir=str(tmp_path / "run" / "sft"), model=ModelSpec("tiny"), adapter=str(adapter),
                    heldout_fraction=0.25, data=DataConfig(train=str(data)), train=train_cfg())
    model = build_baseline_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "lora_" in n} | {"safety.llm_tokens"}
    summary = train_sft(cfg, model)
    assert summary["records"] == 12 and summary["heldout_records"] == 4 and summary["measured_on"] == "heldout"
    # The tiny base is untrained (its frozen LM head keeps every loss near ln(vocab)), so the drop is modest.
    assert summary["train_after"]["lm_loss"] < 0.95 * summary["train_before"]["lm_loss"], summary
    assert summary["lm_loss_after"] < 0.95 * summary["lm_loss_before"], summary        # held-out slice
    assert summary["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = list(load_training_records(cfg.data, SAFETY, require_answer=True, require_labels=False).dataset)
    assert_adapter_reproduces(model, Path(summary["adapter"]), rows[:6])


def fresh_model(adapter: Path, lora: bool):
    """A fresh base with the adapter's safety modules, and its LoRA or none."""
    base, processor = load_base("tiny")
    if lora:
        return load_adapter(base, adapter, processor).eval()
    model = attach(base, SAFETY, processor)
    model.safety.load_state_dict(load_file(str(adapter / "safety_adapter.safetensors")))
    return model.eval()


def pair_logps(model, rows: list[dict], batch_size: int) -> torch.Tensor:
    """[chosen, rejected] response log-probs (sums over response tokens), in batches as given."""
    collate = PairCollator(model.processor)
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start:start + batch_size])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"], run_head=False).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            token = torch.gather(F.log_softmax(logits.float(), dim=-1), -1, labels.clamp(min=0).unsqueeze(-1))
            seq = (token.squeeze(-1) * (labels != -100)).sum(dim=1)
            half = len(seq) // 2
            out.append(torch.stack([seq[:half], seq[half:]], dim=1))
    return torch.cat(out)


def test_dpo_raises_reward_accuracy_against_the_exact_base_reference(tmp_path, stage2):
    data, adapter = stage2
    cfg = DPOConfig(run_dir=str(tmp_path / "run" / "dpo"), model=ModelSpec("tiny"), adapter=str(adapter),
                    reference="base", heldout_fraction=0.25, beta=0.1, data=DataConfig(train=str(data)),
                    train=train_cfg())
    model = build_baseline_model(cfg)
    summary = train_dpo(cfg, model)
    before, after = summary["train_before"], summary["train_after"]
    assert after["reward_accuracy"] == 1.0 and after["reward_accuracy"] > before["reward_accuracy"], summary
    assert after["margin"] > before["margin"] + 0.1 and after["dpo_loss"] < before["dpo_loss"], summary
    assert after["policy_accuracy"] > before["policy_accuracy"], summary
    assert summary["reward_accuracy_after"] > summary["reward_accuracy_before"]          # held-out slice
    assert summary["margin_after"] > summary["margin_before"]
    lines = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and {"reward_accuracy", "margin", "loss"} <= set(lines[-1])
    # The reference the run used (`base`: computed under disable_adapter) is the no-LoRA model, bit for bit.
    records = load_training_records(cfg.data, SAFETY, require_answer=True, require_labels=False)
    train_rows, heldout_rows = split_heldout(records, cfg.heldout_fraction, cfg.seed)
    saved = load_file(str(Path(cfg.run_dir) / "reference_logps.safetensors"))
    no_lora = fresh_model(adapter, lora=False)
    expected = pair_logps(no_lora, list(train_rows), cfg.train.micro_batch_size)
    assert torch.equal(saved["train"], expected)
    assert torch.equal(saved["heldout"], pair_logps(no_lora, list(heldout_rows), cfg.train.micro_batch_size))
    # ... and not vacuously: the stage-2 LoRA changes these log-probabilities
    with_lora = pair_logps(fresh_model(adapter, lora=True), list(train_rows), cfg.train.micro_batch_size)
    assert (with_lora - expected).abs().min() > 1e-4
    assert_adapter_reproduces(model, Path(summary["adapter"]), list(train_rows)[:6])


def test_dpo_default_reference_is_the_starting_policy(tmp_path, stage2):
    data, adapter = stage2
    cfg = DPOConfig(run_dir=str(tmp_path / "dpo"), model=ModelSpec("tiny"), adapter=str(adapter),
                    heldout_fraction=0.25, eval_records=4, answer_tokens=0, data=DataConfig(train=str(data)),
                    train=train_cfg(max_steps=3))
    assert cfg.reference == "start"
    summary = train_dpo(cfg, build_baseline_model(cfg))
    assert summary["reference"] == "start"
    assert summary["train_before"]["margin"] == 0.0 and summary["train_before"]["reward_accuracy"] == 0.0
    assert summary["train_after"]["margin"] > 0 and "answer_accuracy" not in summary["heldout_after"]
    # The table it used is the stage-2 model's own log-probs (a fresh base + the stage-2 adapter), bit for bit.
    records = load_training_records(cfg.data, SAFETY, require_answer=True, require_labels=False)
    train_rows, _ = split_heldout(records, cfg.heldout_fraction, cfg.seed)
    saved = load_file(str(Path(cfg.run_dir) / "reference_logps.safetensors"))
    assert torch.equal(saved["train"], pair_logps(fresh_model(adapter, lora=True), list(train_rows),
                                                  cfg.train.micro_batch_size))


def test_sweep_keeps_the_best_run_on_the_heldout_slice(tmp_path, stage2, capsys):
    data, adapter = stage2
    shutil.copytree(adapter, tmp_path / "run" / "stage2" / "adapter")      # where a run's stage 2 leaves it
    config = tmp_path / "run.yaml"
    config.write_text(f"""run_dir: {tmp_path / 'run'}
model: {{path: tiny}}
safety: {{num_safety_tokens: 4}}
dpo:
  heldout_fraction: 0.25
  data: {{train: {data}}}
  train: {{deepspeed: {ZERO2}, micro_batch_size: 4, max_steps: 3, warmup_steps: 1, torch_threads: 1, progress: false}}
""")
    assert cli_main(["dpo", "--config", str(config), "--sweep", "train.lr=1e-4,1e-2"]) == 0
    summary = json.loads((tmp_path / "run" / "dpo" / "summary.json").read_text())
    assert f'"best_run_dir": "{summary["best_run_dir"]}"' in capsys.readouterr().out     # printed too
    table = json.loads((tmp_path / "run" / "dpo" / "sweep.json").read_text())
    runs = {r["overrides"]["train.lr"]: r for r in table["runs"]}
    assert set(runs) == {1e-4, 1e-2} and table["metrics"] == [["answer_accuracy", "max"], ["dpo_loss", "min"]]
    for run in runs.values():                      # each run's scores are its own held-out results
        own = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
        assert run["heldout_after"] == own["heldout_after"] and own["heldout_records"] == 4
        assert 0 <= own["heldout_after"]["answer_accuracy"] <= 1
        trained_with = json.loads((Path(run["run_dir"]) / "config.json").read_text())["train"]["lr"]
        assert trained_with == run["overrides"]["train.lr"]
    best = min(runs.values(), key=lambda r: (-r["heldout_after"]["answer_accuracy"], r["heldout_after"]["dpo_loss"]))
    assert table["best"]["run_dir"] == best["run_dir"] == summary["best_run_dir"]
    kept = tmp_path / "run" / "dpo" / "adapter"
    assert summary["adapter"] == str(kept)
    for name in ("safety_adapter.safetensors", "adapter_model.safetensors"):
        assert (kept / name).read_bytes() == (Path(best["adapter"]) / name).read_bytes()


def test_bad_inputs_stop_with_a_clear_error(tmp_path, stage2, capsys):
    data, adapter = stage2
    lines = data.read_text().splitlines()
    broken = json.loads(lines[2])
    broken.pop("rejected")
    bad = data.parent / "bad.jsonl"                 # beside the good records: same images
    bad.write_text("\n".join(lines[:2] + [json.dumps(broken)]) + "\n")
    config = tmp_path / "dpo.yaml"
    config.write_text(f"adapter: {adapter}\nrun_dir: {tmp_path / 'run'}\n")
    assert cli_main(["dpo", "--config", str(config), f"data.train={bad}"]) == 2
    assert "bad.jsonl:3: field 'rejected' is missing or empty" in capsys.readouterr().err
    # a stage-1 adapter (no LoRA) is refused: the baselines train the stage-2 LoRA
    base, processor = load_base("tiny")
    save_adapter(attach(base, SAFETY, processor), tmp_path / "stage1")
    assert cli_main(["sft", "--config", str(config), f"adapter={tmp_path / 'stage1'}", f"data.train={data}"]) == 2
    assert "holds no LoRA" in capsys.readouterr().err
    assert cli_main(["sft", "--config", str(config), f"adapter={tmp_path / 'nowhere'}"]) == 2
    assert f"stage-2 adapter folder {tmp_path / 'nowhere'} not found" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"dpo: beta: must be > 0, got 0"):
        recipe("dpo").load_config(config, ["beta=0"])
    with pytest.raises(ConfigError, match=r"dpo: reference: must be one of \['start', 'base'\], got 'no_lora'"):
        recipe("dpo").load_config(config, ["reference=no_lora"])
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("run_dir: x\nmodel: {path: tiny}\nsft:\n  lr: 1e-3\n")
    with pytest.raises(ConfigError, match=r"sft.lr: unknown key"):
        recipe("sft").load_config(run_yaml)
    assert cli_main(["sft", "--config", str(config), "heldout_fraction=0", "--sweep", "train.lr=1e-3,1e-2"]) == 2
    assert "heldout_fraction is 0" in capsys.readouterr().err


def test_run_yaml_defaults_follow_the_stage2_run(tmp_path):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(f"run_dir: {tmp_path / 'run'}\nseed: 3\nmodel: {{path: tiny, seed: 1}}\n"
                        "safety: {num_safety_tokens: 4}\nstage2: {init_from: stage0}\n"
                        "dpo:\n  beta: 0.5\n  train: {lr: 1e-3}\n")
    cfg = recipe("dpo").load_config(run_yaml, ["train.epochs=3"])
    assert (cfg.run_dir, cfg.seed, cfg.model.seed, cfg.beta) == (str(tmp_path / "run" / "dpo"), 3, 1, 0.5)
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.micro_batch_size) == (1e-3, 3, TrainConfig().micro_batch_size)
    assert cfg.heldout_fraction == 0.1                                        # the section's default
    # the base is the one stage 2 of the same run recorded, not the `model` section
    stage2_dir = tmp_path / "run" / "stage2"
    stage2_dir.mkdir(parents=True)
    assert baseline_base(cfg) == ModelSpec("tiny", 1)
    (stage2_dir / "config.json").write_text(json.dumps({"init_from": "stage0", "run_dir": str(stage2_dir),
                                                        "model": {"path": "tiny", "seed": 2}}))
    assert baseline_base(cfg) == ModelSpec(str(tmp_path / "run" / "stage0" / "model"), 2)
    sft = recipe("sft").load_config(run_yaml)                   # no `sft:` block: the library defaults
    assert sft.run_dir == str(tmp_path / "run" / "sft") and sft.train == TrainConfig()
