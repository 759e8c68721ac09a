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
value models plus the reward model) nor a separate small critic: the value costs one linear layer
and no extra forward (log-probs and values come from one pass, one backward trains both), the
vision tower runs once per rollout instead of once per model, and one base sits in memory instead
of three. `bench/ppo_memory.py` measures both layouts' peak memory and step time in one run (the
README's benchmark table has the figures). The price of the shared trunk: the value loss flows into
the shared LoRA (scaled by `algo.vf_coef`, small by default) -- the usual trade-off of TRL-style
value heads.

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

from safety_modules.labels import TASK_LABELS
from runtime.distributed import is_main
from runtime.layout import RunLayout, StageLayout
from safety_modules.configio import ConfigError
from safety_modules.fileio import write_bytes_atomic
from training.checkpoint import nonfinite_tensors
from training.config import MethodSection
from training.engine import TrainingDiverged
from training.recipes.common import (export_adapter, fit_measured, load_training_records, save_run_config,
                                     trainable_parameters, write_summary)
from training.recipes.start import OnTopRun, build_baseline_model, stage2_adapter_path
from training.rl.reference import REFERENCE_KIND
from training.rl.reward import REWARD_KINDS, ClassifierReward, classifier_task
from training.rl.rollout import PolicyWithValue
from training.rl.trainer import PPOSpec, PPOTrainer, RolloutSpec


@dataclass
class PPOSection(MethodSection):
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

    def __post_init__(self) -> None:
        if self.reward not in REWARD_KINDS:
            raise ConfigError(f"reward: must be one of {list(REWARD_KINDS)}, got {self.reward!r}")
        if self.eval_records < 0:
            raise ConfigError(f"eval_records: must be >= 0, got {self.eval_records}")


@dataclass
class PPOConfig(PPOSection, OnTopRun):
    run_dir: str = "checkpoints/tiny/ppo"

    def pinned_inputs(self) -> dict[str, str]:
        """The starting model and adapter and the reward classifier, as settings that hold in another folder."""
        return {**super().pinned_inputs(), "classifier": str(classifier_path(self))}


def classifier_path(cfg: PPOConfig) -> Path:
    """`classifier`, else the reward classifier of the same run."""
    return Path(cfg.classifier) if cfg.classifier else RunLayout(Path(cfg.run_dir).parent).reward_classifier


def build_ppo_model(cfg: PPOConfig) -> PolicyWithValue:
    """Base + stage-2 adapter (trainable LoRA + safety tokens, as the baselines) + a zero-initialised
    value head. The base (path and tiny-model seed) is the one stage 2 recorded beside its adapter."""
    return PolicyWithValue(build_baseline_model(cfg))


def check_labels(records) -> None:
    """Every prompt needs a label its classifier task knows (Safe/Unsafe; A-D for perception)."""
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


def _write_value_head(trainer: PPOTrainer, policy: PolicyWithValue, path: Path) -> None:
    """The critic beside the adapter, written only when finite (rank 0, atomically). Collective."""
    value_head = trainer.value_head_tensors()
    bad = nonfinite_tensors(value_head)
    if bad:
        raise TrainingDiverged(f"ppo: value head tensors {bad} hold NaN/inf; {path} not written")
    if is_main():
        metadata = {"hidden_size": str(policy.value_head.proj.in_features)}
        write_bytes_atomic(path, safetensors_bytes(value_head, metadata=metadata))
    trainer.barrier()


def train_ppo(cfg: PPOConfig, policy: PolicyWithValue, resume: bool = False) -> dict[str, Any]:
    """PPO on a policy from build_ppo_model."""
    run_dir = Path(cfg.run_dir)
    layout = StageLayout(run_dir)
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
    before, last, after = fit_measured(trainer, run_dir, resume, lambda: trainer.evaluate(eval_rows))
    adapter = export_adapter(trainer, policy.model, layout.adapter)
    _write_value_head(trainer, policy, layout.value_head)
    return write_summary(run_dir, {
        "stage": "ppo", "adapter": str(adapter), "value_head": str(layout.value_head),
        "classifier": str(clf_dir), "reward_kind": cfg.reward, "reference": REFERENCE_KIND,
        "reference_adapter": str(stage2_adapter_path(cfg)), "records": len(records),
        "skipped_records": records.skipped, "eval_records": len(eval_rows),
        "eval_source": cfg.eval_file or "training prompts (greedy)", **last,
        "reward_before": before["reward"], "reward_after": after["reward"],
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "before": before, "after": after, "trainable_parameters": trainable_parameters(policy),
    })
