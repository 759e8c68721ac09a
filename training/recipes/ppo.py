"""PPO with a response-classifier reward, on top of the stage-2 model (Qu et al., USENIX Security 2025).

Policy = base + the stage-2 adapter (safety modules active + LoRA), loaded trainable; trained: the
LoRA, the LLM-side safety tokens (`train_tokens`) and a value head; frozen: the base, the safety
projector, the head and its tokens. Reference = the frozen starting policy (the stage-2 LoRA as a
second, frozen PEFT adapter and a snapshot of the safety tokens; one base in memory), so the KL of
the first rollout is 0 (training/rl/reference.py says why not "LoRA disabled"). Value = a linear
head on the policy trunk's last hidden state. Reward = the reward classifier's log-probability of
the record's label (`reward: logprob`, = -CE) or its probability (`reward: prob`). Prompts: the
concept world's `records/ppo.jsonl` (human turn + "label"), safe and unsafe balanced in every
batch. The loop: training/rl/trainer.py.

Why one trunk with a value head, not the reference code's layout (separate policy, reference and
value models plus the reward model) nor a separate small critic: `bench/ppo_memory.py` runs one PPO
step of each layout at the same config in fresh processes. On CPU at a ~1B LLaVA shape (CLIP
ViT-B/32 + a 0.95B Llama, fp32, 2 prompts x 16 sampled tokens, LoRA r 64, RoBERTa-base-shaped
reward model in both) the one-trunk step peaked at 6.25 GiB against 14.86 GiB (peak-memory ratio
0.42; 0.41 counting only what the step added to the bare process) and took 182 s against 328 s
(step-time ratio 0.55, a busy 2-core machine); it holds 1.26 B parameters against 3.49 B (measured
when the reference was the LoRA-disabled trunk; the frozen start adds one copy of the LoRA and of
the safety tokens, not of the base). The value costs one linear layer and no extra forward
(log-probs and values come from one pass, one backward trains both), and the vision tower runs
once per rollout instead of once per model. At LLaVA-1.5-7B shape the weights
dominate even more (three 7B trunks against one), which is where the <= 0.4x memory target
applies: `python bench/ppo_memory.py --device cuda --shape llava-1.5-7b` (not run here: no GPU was
available to this work). A separate small critic would save little over the head (the trunk is
already in memory) and would need its own vision features and tokenisation of the rollout. The
price of the shared trunk: the value loss flows into the shared LoRA (scaled by `algo.vf_coef`,
small by default) -- the usual trade-off of TRL-style value heads.

Outputs in `run_dir`: metrics.jsonl (reward, KL, entropy, classifier-judged accuracy, losses per
step), checkpoints/ (trainable tensors only: a resumed run rebuilds the reference from the stage-2
adapter), before.json, summary.json (`reference`: which model the KL is measured against),
`adapter/` (safety modules + the trained LoRA, without the reference, loadable with `load_adapter`
onto a fresh base) and `value_head.safetensors` (the critic, kept out of the adapter).
`safevlm ppo --config FILE [key=value ...] [--resume]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save as safetensors_bytes

from safety_modules.configio import ConfigError
from safety_modules.fileio import write_bytes_atomic
from training.checkpoint import nonfinite_tensors
from training.config import DataConfig, ModelSpec, TrainConfig
from runtime.distributed import is_main
from training.engine import TrainingDiverged
from training.recipes import export_adapter, load_training_records, measured_before, save_run_config, write_json
from training.recipes.baselines import build_baseline_model, load_baseline_config, stage2_adapter_path
from training.rl.reference import REFERENCE_KIND
from training.rl.reward import REWARD_KINDS, ClassifierReward, classifier_task
from training.rl.rollout import PolicyWithValue
from training.rl.trainer import PPOSpec, PPOTrainer, RolloutSpec

VALUE_HEAD_FILE = "value_head.safetensors"


def ppo_train_defaults() -> TrainConfig:
    """The tiny default: a LoRA rate, constant after no warm-up (PPO's own KL terms keep it stable)."""
    return TrainConfig(epochs=1, micro_batch_size=8, lr=1e-4, lr_schedule="constant", warmup_ratio=0.0,
                       save_every=20, torch_threads=1)


@dataclass
class PPOSection:
    """The `ppo:` block of a run YAML."""

    init_from: str = ""          # base of the stage-2 adapter; "": the base recorded beside it, else `model`
    adapter: str = ""            # stage-2 adapter (safety modules + LoRA); "": <run_dir>/../stage2/adapter
    classifier: str = ""         # reward classifier folder; "": <run_dir>/../classifiers/reward
    reward: str = "logprob"      # logprob: log P(correct label) (= -CE); prob: P(correct label)
    classifier_device: str = ""  # "": the policy's device
    train_tokens: bool = True    # train the LLM-side safety tokens with the LoRA (head, projector: frozen)
    eval_file: str = ""          # records with labels for the greedy before/after check; "": training prompts
    eval_records: int = 64       # at most this many of them (0: all)
    rollout: RolloutSpec = field(default_factory=RolloutSpec)
    algo: PPOSpec = field(default_factory=PPOSpec)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=ppo_train_defaults)

    def __post_init__(self) -> None:
        if self.reward not in REWARD_KINDS:
            raise ConfigError(f"reward: must be one of {list(REWARD_KINDS)}, got {self.reward!r}")
        if self.eval_records < 0:
            raise ConfigError(f"eval_records: must be >= 0, got {self.eval_records}")


@dataclass
class PPOConfig(PPOSection):
    run_dir: str = "checkpoints/tiny/ppo"
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)


def load_ppo_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PPOConfig:
    """From a run YAML's `ppo:` section (run_dir = <run_dir>/ppo) or a flat PPO YAML, plus overrides."""
    return load_baseline_config("ppo", PPOConfig, path, overrides)


def classifier_path(cfg: PPOConfig) -> Path:
    return Path(cfg.classifier) if cfg.classifier else Path(cfg.run_dir).parent / "classifiers" / "reward"


def build_ppo_model(cfg: PPOConfig) -> PolicyWithValue:
    """Base + stage-2 adapter (trainable LoRA + safety tokens, as the baselines) + a zero-initialised
    value head. The base (path and tiny-model seed) is the one stage 2 recorded beside its adapter."""
    return PolicyWithValue(build_baseline_model(cfg))


def check_labels(records) -> None:
    """Every prompt needs a label its classifier task knows (Safe/Unsafe; A-D for perception)."""
    from response_classifier.data import TASK_LABELS

    for row in records:
        task = classifier_task(row["task"] or None)
        if row["label"] not in TASK_LABELS[task]:
            problem = "missing" if not row["label"] else f"{row['label']!r} is not one of {list(TASK_LABELS[task])}"
            raise ValueError(f"{row['source']}: field 'label': {problem} (PPO rewards the {task} label of each "
                             "prompt)")


def load_prompts(cfg: PPOConfig, policy: PolicyWithValue, path: str | None = None):
    records = load_training_records(cfg.data, policy.model.safety_config, require_answer=False,
                                    require_labels=False, path=path)
    check_labels(records)
    return records


def run_ppo(cfg: PPOConfig, resume: bool = False) -> dict[str, Any]:
    """Train with PPO; export `<run_dir>/adapter` and `<run_dir>/value_head.safetensors`; return a summary."""
    return train_ppo(cfg, build_ppo_model(cfg), resume)


def train_ppo(cfg: PPOConfig, policy: PolicyWithValue, resume: bool = False) -> dict[str, Any]:
    """PPO on a policy from build_ppo_model."""
    run_dir = Path(cfg.run_dir)
    records = load_prompts(cfg, policy)
    clf_dir = classifier_path(cfg)
    if not clf_dir.is_dir():
        raise FileNotFoundError(f"classifier: reward classifier folder {clf_dir} not found (train one with "
                                "`safevlm classifier train`, or set classifier=DIR)")
    device = cfg.classifier_device or str(next(policy.model.safety.parameters()).device)
    reward = ClassifierReward.load(clf_dir, kind=cfg.reward, device=device)
    trainer = PPOTrainer(policy, records, reward, cfg.train, cfg.rollout, cfg.algo, run_dir, seed=cfg.seed,
                         max_image_pixels=cfg.data.max_image_pixels)
    save_run_config(run_dir, cfg)
    eval_rows = list(load_prompts(cfg, policy, cfg.eval_file).dataset) if cfg.eval_file else list(records.dataset)
    if cfg.eval_records:
        eval_rows = eval_rows[:cfg.eval_records]
    evaluate = lambda: trainer.evaluate(eval_rows)  # noqa: E731
    before = measured_before(run_dir, resume, evaluate)
    if resume:
        trainer.resume()
    last = trainer.fit()
    after = evaluate()
    adapter = export_adapter(trainer, policy.model, run_dir / "adapter")
    value_head = trainer.value_head_tensors()
    bad = nonfinite_tensors(value_head)
    if bad:
        raise TrainingDiverged(f"ppo: value head tensors {bad} hold NaN/inf; {run_dir / VALUE_HEAD_FILE} not written")
    if is_main():
        metadata = {"hidden_size": str(policy.value_head.proj.in_features)}
        write_bytes_atomic(run_dir / VALUE_HEAD_FILE, safetensors_bytes(value_head, metadata=metadata))
    trainer.barrier()
    summary = {
        "stage": "ppo", "adapter": str(adapter), "value_head": str(run_dir / VALUE_HEAD_FILE),
        "classifier": str(clf_dir), "reward_kind": cfg.reward, "reference": REFERENCE_KIND,
        "reference_adapter": str(stage2_adapter_path(cfg)), "records": len(records),
        "skipped_records": records.skipped, "eval_records": len(eval_rows),
        "eval_source": cfg.eval_file or "training prompts (greedy)", **last,
        "reward_before": before["reward"], "reward_after": after["reward"],
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "before": before, "after": after,
        "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in policy.parameters() if p.requires_grad),
    }
    write_json(run_dir / "summary.json", summary)
    return summary
