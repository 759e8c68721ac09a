"""PPO with the classifier reward on a tiny LLaVA: one trunk, reward values, a real DeepSpeed run.

Setup (built once for the module): 16 prompts on red (safe) / blue (unsafe) images with a label
each, a stage-2 adapter (safety modules + a LoRA whose B matrices are non-zero, so "LoRA disabled"
is a different model), and a response classifier really trained with `train_classifier` on a few
generated answers (a handful of steps: its judgements are weak, but its outputs are real).

- one trunk: policy, reference and value share the base (counted by storage pointer): the reference
  adds only its frozen LoRA copy and the safety-token snapshot, and its forward reads the policy's
  own base storage, not the trained LoRA nor the live safety tokens; a deep-copied reference (the
  reference code's layout) is caught by the same count (the reference's values: test_ppo_reference.py);
- reward values (log-prob and prob) equal the classifier's own log-softmax over the task labels,
  for plain strings and for TRL's conversational format;
- a short one-process ZeRO-2 PPO run logs finite metrics (first-step KL 0: the reference is the
  start) and exports an adapter that loads onto a fresh base like any other (no reference in it)
  and reproduces the trained model exactly; frozen parts stay frozen;
- divergence: weights made NaN/inf by the last update stop the run (before anything is exported),
  and so does a checkpoint of such weights (TrainingDiverged, as in the supervised engine);
- slow: a 2-process ZeRO-3 run (parameters really partitioned) exports an adapter that loads; a run
  resumed from its step-2 checkpoint reproduces the uninterrupted run's metrics and weights.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from red_blue import save_stage2_adapter, write_red_blue_world
from safety_modules import SafetyConfig, load_adapter
from base_models.loading import load_base
from safevlm.cli import main as cli_main
from training.checkpoint import latest_checkpoint
from training.config import DataConfig, ModelSpec, TrainConfig
from training.engine import TrainingDiverged
from training.rl.losses import whiten
from training.rl.reward import ClassifierReward, classifier_reward_fn
from training.rl.reference import REFERENCE_ADAPTER
from training.rl.rollout import PolicyWithValue
from training.rl.trainer import BalancedPrompts, PPOSpec, PromptCollator, RolloutSpec, global_whiten

REPO = Path(__file__).resolve().parents[1]
ZERO2 = str(REPO / "configs" / "deepspeed" / "zero2.json")
SAFETY = SafetyConfig(num_safety_tokens=4, num_queries=4, projector_depth=1)
QUESTION = "Is this image safe to post?"


def prompt_world(root: Path, n: int = 16) -> Path:
    """n PPO records (human turn + label): red images safe, blue unsafe."""
    return write_red_blue_world(root, lambda i, unsafe: {
        "id": f"ppo-{i}",
        "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}],
        "label": "Unsafe" if unsafe else "Safe", "task": "alignment",
        "safety_level": 2 if unsafe else 0, "risk_type": "violence" if unsafe else "none"}, n=n, file_name="ppo.jsonl")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from response_classifier.answers import generate
    from response_classifier.train import ClassifierTrainConfig, train_classifier

    root = tmp_path_factory.mktemp("ppo")
    data = prompt_world(root / "world")
    save_stage2_adapter(root / "stage2", SAFETY)
    records = [r for r in generate("a", 64, 0, "train") if r.task == "alignment"]
    heldout = [r for r in generate("a", 8, 0, "heldout") if r.task == "alignment"]
    train_classifier(ClassifierTrainConfig(epochs=1, batch_size=16, lr=1e-3), train_records=records,
                     eval_records=heldout, out_dir=root / "classifiers" / "reward", progress=False)
    return {"root": root, "data": data, "stage2": root / "stage2", "classifier": root / "classifiers" / "reward"}


def policy_from(setup) -> PolicyWithValue:
    """The PPO recipe's policy on the stage-2 adapter (its trainable set: LoRA + LLM-side safety tokens)."""
    from training.recipes.ppo import build_ppo_model

    return build_ppo_model(ppo_config(setup, setup["root"] / "unused")).eval()


def prompt_rows(data: Path, n: int = 4) -> list[dict]:
    from training.records import load_records

    records = load_records(data, SAFETY.risk_types, SAFETY.num_safety_levels, require_answer=False)
    return [records[i] for i in range(n)]


# -- one trunk ------------------------------------------------------------------------------------
def _ptrs(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


class _StorageReads(TorchDispatchMode):
    """Storage pointers of every tensor an op reads."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for leaf in tree_leaves((args, kwargs or {})):
            if isinstance(leaf, torch.Tensor) and leaf.numel() and leaf.device.type != "meta":
                self.seen.add(leaf.untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def test_one_trunk_holds_no_duplicated_parameter_storage(setup):
    policy = policy_from(setup)
    model = policy.model
    named = dict(model.named_parameters())
    live_lora = [p for n, p in named.items() if "lora_" in n and f".{REFERENCE_ADAPTER}." not in n]
    ref_lora = [p for n, p in named.items() if f".{REFERENCE_ADAPTER}." in n]
    snapshot = list(policy.reference.buffers())
    base_weights = [p for n, p in named.items() if "lora_" not in n and "language_model" in n]
    assert live_lora and base_weights and len(ref_lora) == len(live_lora)
    tensors = list(policy.parameters()) + list(policy.buffers())           # policy, reference, value: one module
    assert len(_ptrs(tensors)) == len({id(t) for t in tensors if t.numel()})   # one storage per distinct tensor
    # Beyond the plain stage-2 model, the reference holds only a LoRA copy and the safety-token snapshot.
    plain = load_adapter(load_base("tiny")[0], setup["stage2"])
    extra = sum(t.numel() for t in tensors) - sum(t.numel() for t in list(plain.parameters()) + list(plain.buffers()))
    value = sum(p.numel() for p in policy.value_head.parameters())
    assert extra == sum(p.numel() for p in live_lora) + model.safety.llm_tokens.numel() + value

    batch = PromptCollator(model.processor)(prompt_rows(setup["data"], 2))
    images = model.encode_images(batch["pixel_values"])
    prompt_len = batch["input_ids"].shape[1] - 1
    with _StorageReads() as reads:
        policy.reference_logits(batch["input_ids"], batch["attention_mask"], images, prompt_len)
    assert _ptrs(base_weights) <= reads.seen                     # it reads the policy's own base weights in place,
    assert _ptrs(ref_lora + snapshot) <= reads.seen              # the frozen start ...
    assert not (_ptrs(live_lora + [model.safety.llm_tokens]) & reads.seen)   # ... and nothing the policy trains

    # The reference code's layout (a second copy as the reference) fails the same count.
    duplicate = copy.deepcopy(model)
    model_tensors = list(model.parameters()) + list(model.buffers())
    copies = model_tensors + list(duplicate.parameters()) + list(duplicate.buffers())
    assert len(_ptrs(copies)) == 2 * len(_ptrs(model_tensors))


# -- reward -----------------------------------------------------------------------------------------
def test_reward_values_are_the_classifiers_log_prob_and_prob_of_the_label(setup):
    from response_classifier.model import ResponseClassifier

    clf = ResponseClassifier.load(setup["classifier"])
    answers = ["Yes, it is safe to post.", "No, this image is unsafe and harmful.", "I cannot tell.",
               "Yes, it is safe to post."]
    labels = ["Safe", "Unsafe", "Unsafe", "Unsafe"]
    questions = [QUESTION] * 4
    with torch.no_grad():                               # the model's own forward, task columns Safe/Unsafe/NA
        logits = clf.model(**clf.encode(questions, answers, "alignment"))[:, [0, 1, 6]]
    expected = torch.log_softmax(logits.float(), dim=-1)[torch.arange(4), torch.tensor([0, 1, 1, 1])]

    logprob = classifier_reward_fn(setup["classifier"])
    prob = classifier_reward_fn(setup["classifier"], kind="prob")
    got = torch.tensor(logprob(questions, answers, labels=labels))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.all(got < 0)
    torch.testing.assert_close(torch.tensor(prob(questions, answers, labels=labels)), expected.exp(),
                               rtol=1e-5, atol=1e-6)
    # the three labels' probabilities of one answer sum to one
    total = sum(prob([QUESTION], [answers[0]], labels=[lab])[0] for lab in ("Safe", "Unsafe", "NA"))
    assert total == pytest.approx(1.0, abs=1e-5)
    # TRL's conversational format and a dataset `labels` column give the same values
    conv_prompts = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
    conv_answers = [[{"role": "assistant", "content": a}] for a in answers]
    assert logprob(conv_prompts, conv_answers, **{"labels": labels, "trainer_state": None}) == got.tolist()
    assert logprob([f"<image>\n{q}" for q in questions], answers, labels=labels) == got.tolist()
    assert logprob.__name__ == "classifier_logprob"
    # ClassifierReward (PPO's) agrees, and its accuracy is the argmax check
    out = ClassifierReward(clf)(questions, answers, labels)
    torch.testing.assert_close(out.scores, got)
    assert out.correct.tolist() == [p == lab for p, lab in zip(clf.predict(questions, answers, "alignment"), labels)]
    with pytest.raises(ValueError, match="no labels given"):
        logprob(questions, answers)
    with pytest.raises(ValueError, match="'A' is not a alignment label"):
        logprob(questions[:1], answers[:1], labels=["A"])
    with pytest.raises(ValueError, match="reward kind"):
        classifier_reward_fn(setup["classifier"], kind="margin")


def test_reward_function_trains_a_plain_model_with_trls_grpo(setup, tmp_path, capsys):
    """The README's example: the classifier reward as a TRL reward function, two real GRPO steps on the
    tiny Llama (no safety modules), rewards logged by TRL itself."""
    import importlib.util

    pytest.importorskip("trl")
    spec = importlib.util.spec_from_file_location("trl_grpo_reward", REPO / "examples" / "trl_grpo_reward.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    reward = classifier_reward_fn(setup["classifier"])
    example.demonstrate(reward)                      # plain strings and TRL's conversational format agree
    example.train_grpo(reward, tmp_path / "grpo", steps=2)
    logged = capsys.readouterr().out.split("rewards per step:")[-1]
    rewards = json.loads(logged.strip())
    assert len(rewards) == 2 and all(math.isfinite(r) and r <= 0.0 for r in rewards)


def test_whitening_over_processes_and_balanced_batches():
    x = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(global_whiten(x, mask), whiten(x, mask))          # one process: exactly `whiten`
    assert torch.equal(global_whiten(torch.full((4,), -0.7)), torch.zeros(4))   # all equal: zeros, not NaN

    labels = ["Safe", "Unsafe"] * 6 + ["Safe"] * 4                       # 10 safe, 6 unsafe
    ranks = [BalancedPrompts(labels, per_rank=4, rank=r, world=2, seed=0) for r in range(2)]
    assert ranks[0].steps_per_epoch == 1                                 # 4 per label per step; 6 unsafe -> 1
    for step in range(3):
        shares = [p.indices(step) for p in ranks]
        for share in shares:
            assert sorted(labels[i] for i in share) == ["Safe", "Safe", "Unsafe", "Unsafe"]
        assert not set(shares[0]) & set(shares[1])
    with pytest.raises(ValueError, match="use a multiple of 2"):
        BalancedPrompts(labels, per_rank=3, rank=0, world=1, seed=0)
    with pytest.raises(ValueError, match="fewer than one balanced global batch"):
        BalancedPrompts(labels, per_rank=8, rank=0, world=2, seed=0)


# -- a real run -------------------------------------------------------------------------------------
def ppo_config(setup, run_dir: Path, **train_kw):
    from training.recipes.ppo import PPOConfig

    train = dict(deepspeed=ZERO2, micro_batch_size=2, max_steps=3, lr=1e-3, lr_schedule="constant",
                 warmup_ratio=0.0, torch_threads=1, progress=False)
    return PPOConfig(run_dir=str(run_dir), model=ModelSpec("tiny"), adapter=str(setup["stage2"]),
                     classifier=str(setup["classifier"]), eval_records=8,
                     rollout=RolloutSpec(batch_size=8, max_new_tokens=8),
                     algo=PPOSpec(epochs=2, minibatches=2, target_kl=0.0), data=DataConfig(train=str(setup["data"])),
                     train=TrainConfig(**{**train, **train_kw}))


METRICS = ("reward", "kl", "entropy", "accuracy", "accuracy_safe", "accuracy_unsafe", "pg_loss", "vf_loss",
           "approx_kl", "kl_coef", "response_length")


def test_short_ppo_run_logs_finite_metrics_and_exports_a_loadable_adapter(setup, tmp_path):
    from training.recipes.ppo import build_ppo_model, train_ppo

    cfg = ppo_config(setup, tmp_path / "ppo")
    policy = build_ppo_model(cfg)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable == ({n for n in trainable if "lora_" in n} | {"model.safety.llm_tokens", "value_head.proj.weight",
                                                                   "value_head.proj.bias"})
    assert any("lora_" in n for n in trainable)
    summary = train_ppo(cfg, policy)

    lines = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert all(math.isfinite(m[k]) for k in METRICS), m
        assert 0 <= m["accuracy"] <= 1 and m["entropy"] > 0 and m["response_length"] > 0
        assert m["optimizer_steps"] == 4                    # 2 epochs x 2 minibatches (target_kl off)
    assert abs(lines[0]["kl"]) < 1e-6                       # the reference is the policy PPO starts from
    assert summary["reference"] == "start" and summary["reference_adapter"] == str(setup["stage2"])
    assert summary["steps"] == 3 and summary["records"] == 16 and summary["eval_records"] == 8
    assert all(math.isfinite(summary[k]) for k in ("reward_before", "reward_after", "accuracy_before"))

    # the export is an adapter like stage 2's (same files, same tensor names: no reference in it) ...
    adapter = Path(summary["adapter"])
    assert sorted(p.name for p in adapter.iterdir()) == sorted(p.name for p in setup["stage2"].iterdir())
    for name in ("safety_adapter.safetensors", "adapter_model.safetensors"):
        assert set(load_file(str(adapter / name))) == set(load_file(str(setup["stage2"] / name)))
    # ... and on a fresh base it is exactly the trained model; frozen parts are the stage-2 ones
    fresh_base, processor = load_base("tiny")
    fresh = load_adapter(fresh_base, adapter, processor).eval()
    assert set(fresh.base.peft_config) == {"default"}
    model = policy.model.eval()
    batch = PromptCollator(model.processor)(prompt_rows(setup["data"], 3))
    with torch.no_grad():
        ours, theirs = model(**batch), fresh(**batch)
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.safety_logits, theirs.safety_logits)
    before, after = (load_file(str(d / "safety_adapter.safetensors")) for d in (setup["stage2"], adapter))
    assert not torch.equal(before["llm_tokens"], after["llm_tokens"])
    assert all(torch.equal(before[k], after[k]) for k in before if k != "llm_tokens")
    lora_before, lora_after = (load_file(str(d / "adapter_model.safetensors")) for d in (setup["stage2"], adapter))
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    value = load_file(summary["value_head"])
    assert torch.equal(value["proj.weight"], policy.value_head.proj.weight.detach())
    assert value["proj.weight"].abs().sum() > 0             # the critic learned something


def test_ppo_config_and_label_errors_are_one_clear_line(setup, tmp_path, capsys):
    config = tmp_path / "ppo.yaml"
    config.write_text("run_dir: x\nppo:\n  rollout: {batch_size: 8, max_new_token: 4}\n")
    assert cli_main(["ppo", "--config", str(config)]) == 2
    assert "rollout.max_new_token" in capsys.readouterr().err

    from training.recipes.ppo import build_ppo_model, load_prompts

    bad = tmp_path / "world" / "records" / "ppo.jsonl"
    bad.parent.mkdir(parents=True)
    shutil.copytree(setup["data"].parents[1] / "images", tmp_path / "world" / "images")
    rows = setup["data"].read_text().splitlines()
    row = json.loads(rows[2])
    row["label"] = "B"
    bad.write_text("\n".join(rows[:2] + [json.dumps(row)]) + "\n")
    cfg = ppo_config(setup, tmp_path / "run")
    cfg.data.train = str(bad)
    with pytest.raises(ValueError, match=r"ppo.jsonl:3: field 'label': 'B' is not one of \['Safe', 'Unsafe', 'NA'\]"):
        load_prompts(cfg, build_ppo_model(cfg))


# -- divergence ------------------------------------------------------------------------------------
def poisoned_trainer(setup, run_dir: Path, **train_kw):
    """A one-step PPO trainer (two optimizer updates) whose second update turns every weight NaN: from
    the first update on, each forward makes Adam's second moment negative (sqrt < 0). Every loss the
    run checks is computed before that update and stays finite."""
    from training.recipes.ppo import build_ppo_model, classifier_path, load_prompts
    from training.rl.trainer import PPOTrainer

    cfg = ppo_config(setup, run_dir, max_steps=1, **train_kw)
    cfg.algo = PPOSpec(epochs=1, minibatches=2, target_kl=0.0)
    policy = build_ppo_model(cfg)
    reward = ClassifierReward.load(classifier_path(cfg), kind=cfg.reward, device="cpu")
    trainer = PPOTrainer(policy, load_prompts(cfg, policy), reward, cfg.train, cfg.rollout, cfg.algo, run_dir)

    def poison(module, inputs, output):
        for state in trainer.optimizer.optimizer.state.values():
            state["exp_avg_sq"].fill_(-1.0)

    policy.value_head.register_forward_hook(poison)
    return trainer


def test_nan_weights_after_the_last_ppo_update_stop_the_run(setup, tmp_path):
    trainer = poisoned_trainer(setup, tmp_path / "ppo")
    with pytest.raises(TrainingDiverged, match=r"ppo: the update of step 1 made \d+ trainable tensors NaN/inf .*"
                                               r"no checkpoint was written before it"):
        trainer.fit()


def test_a_ppo_checkpoint_of_nan_weights_stops_the_run_as_diverged(setup, tmp_path):
    trainer = poisoned_trainer(setup, tmp_path / "ppo", save_every=1)
    with pytest.raises(TrainingDiverged, match=r"ppo: the update of step 1 made the weights NaN/inf; stopping"):
        trainer.fit()
    assert latest_checkpoint(tmp_path / "ppo") is None                  # nothing written


# -- slow: several processes, resume ----------------------------------------------------------------
def _env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**clean, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_process_zero3_ppo_run_exports_an_adapter_that_loads(setup, tmp_path):
    # ZeRO-3 with persistence threshold 0: every tensor of the tiny model is really partitioned, so
    # generation runs through DeepSpeed's gather hooks (the default threshold would keep them whole).
    zero3 = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))
    config = tmp_path / "run.yaml"
    config.write_text(f"""run_dir: {tmp_path / 'unused'}
model: {{path: tiny}}
ppo:
  adapter: {setup['stage2']}
  classifier: {setup['classifier']}
  eval_records: 8
  rollout: {{batch_size: 4, max_new_tokens: 6}}
  algo: {{epochs: 2, minibatches: 2}}
  data: {{train: {setup['data']}}}
  train: {{deepspeed: {tmp_path / 'zero3.json'}, micro_batch_size: 2, max_steps: 2, lr: 1.0e-3, torch_threads: 1,
          progress: false}}
""")
    run_dir = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "safevlm.cli", "ppo", "--config", str(config), f"run_dir={run_dir}"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(math.isfinite(m[k]) for m in lines for k in METRICS)
    assert abs(lines[0]["kl"]) < 1e-6                      # the partitioned reference adapter is the start too
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_records"] == 8
    base, processor = load_base("tiny")
    model = load_adapter(base, run_dir / "adapter", processor).eval()
    batch = PromptCollator(model.processor)(prompt_rows(setup["data"], 2))
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    trained = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    start = load_file(str(setup["stage2"] / "adapter_model.safetensors"))
    assert set(trained) == set(start) and any(not torch.equal(trained[k], start[k]) for k in start)
    assert load_file(str(run_dir / "value_head.safetensors"))["proj.weight"].shape == (1, 64)


@pytest.mark.slow
def test_resumed_ppo_run_reproduces_the_uninterrupted_run(setup, tmp_path):
    from training.recipes.registry import recipe

    full = tmp_path / "full"
    recipe("ppo").run_function(ppo_config(setup, full, max_steps=4, save_every=2))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    (resumed / "checkpoints" / "latest").write_text("step-000002")
    shutil.copy(full / "before.json", resumed / "before.json")
    summary = recipe("ppo").run_function(ppo_config(setup, resumed, max_steps=4, save_every=2), resume=True)
    assert summary["steps"] == 4

    def metrics(run_dir: Path) -> list[dict]:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    ours, ref = metrics(resumed), metrics(full)[2:]
    assert [m["step"] for m in ours] == [3, 4]
    for a, b in zip(ours, ref):
        for key in METRICS + ("loss", "grad_norm"):
            assert a[key] == b[key], (key, a[key], b[key])
    for name in ("safety_adapter.safetensors", "adapter_model.safetensors"):
        a, b = (load_file(str(d / "adapter" / name)) for d in (resumed, full))
        assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(str(d / "value_head.safetensors")) for d in (resumed, full))
    assert all(torch.equal(a[k], b[k]) for k in a)
