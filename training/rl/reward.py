"""The PPO reward: how sure the response classifier is that an answer expresses the correct label.

Two kinds, chosen by configuration:
- `logprob` (default): log P(correct label | question, answer) = minus the classifier's
  cross-entropy, the paper's reward. Unbounded below, so a confidently wrong answer is punished
  much harder than a hedge; whitening over the batch (training/rl/losses.py) keeps its scale sane.
- `prob`: P(correct label), in [0, 1]; bounded, gentler on confident mistakes.

`ClassifierReward` serves our PPO loop (tensors, plus the classifier-judged correctness it reports
as accuracy). `classifier_reward_fn` is the same reward as a plain function in the shape TRL's
GRPOTrainer / RLOOTrainer expect for `reward_funcs` (`fn(prompts, completions, **columns) ->
list[float]`, the dataset's "labels" column arriving as `labels=`), so the classifier can reward
models that do not carry our safety modules::

    from training.rl.reward import classifier_reward_fn
    reward = classifier_reward_fn("checkpoints/tiny/classifiers/reward")
    trainer = GRPOTrainer(model=..., reward_funcs=reward, train_dataset=ds_with_prompt_and_labels_columns)

The rewards are raw (not whitened): GRPO/RLOO normalise within their groups themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from response_classifier.data import check_task
from response_classifier.model import ResponseClassifier
from safety_modules.labels import ALIGNMENT, PERCEPTION, TASK_LABELS

REWARD_KINDS = ("logprob", "prob")
IMAGE_MARKER = "<image>"


def classifier_task(record_task: str | None) -> str:
    """The classifier task that judges an answer to a record of `record_task`.

    Perception questions are judged A-D/NA; every safety question (image "alignment" and the
    text-only "text_alignment") is judged Safe/Unsafe/NA.
    """
    return PERCEPTION if record_task == PERCEPTION else ALIGNMENT


def check_kind(kind: str) -> str:
    if kind not in REWARD_KINDS:
        raise ValueError(f"reward kind must be one of {list(REWARD_KINDS)}, got {kind!r}")
    return kind


@dataclass
class RewardOutput:
    """Per answer: the reward, log P(correct label), the classifier's top label, and whether it is correct."""

    scores: torch.Tensor       # (N,) float32: log-prob or prob of the correct label
    log_prob: torch.Tensor     # (N,) float32
    correct: torch.Tensor      # (N,) bool: argmax label == correct label (the "accuracy" PPO logs)
    predicted: list[str]       # the classifier's most probable label per answer


class ClassifierReward:
    """Scores answers with a `ResponseClassifier` (response_classifier/model.py)."""

    def __init__(self, classifier, kind: str = "logprob", batch_size: int = 64) -> None:
        self.classifier = classifier
        self.kind = check_kind(kind)
        self.batch_size = batch_size

    @classmethod
    def load(cls, directory: str | Path, kind: str = "logprob", device: str | torch.device = "cpu",
             batch_size: int = 64) -> "ClassifierReward":
        return cls(ResponseClassifier.load(directory, device=device), kind, batch_size)

    @torch.no_grad()
    def __call__(self, questions: Sequence[str], answers: Sequence[str], labels: Sequence[str],
                 tasks: Sequence[str] | str = ALIGNMENT) -> RewardOutput:
        """Rewards for N answers; `tasks` is one classifier task or one per answer."""
        n = len(questions)
        if len(answers) != n or len(labels) != n:
            raise ValueError(f"reward: {n} questions, {len(answers)} answers and {len(labels)} labels "
                             "(one of each per sample)")
        tasks = [tasks] * n if isinstance(tasks, str) else list(tasks)
        if len(tasks) != n:
            raise ValueError(f"reward: {len(tasks)} tasks for {n} samples")
        log_prob = torch.zeros(n)
        correct = torch.zeros(n, dtype=torch.bool)
        predicted = [""] * n
        for task in sorted(set(tasks)):            # one classifier pass per task (each its own label set)
            idx = [i for i, t in enumerate(tasks) if t == task]
            names = [labels[i] for i in idx]
            ids = self.classifier.label_ids(names, task).cpu()
            log_probs = self.classifier.log_probabilities([questions[i] for i in idx], [answers[i] for i in idx],
                                                          task, self.batch_size).float().cpu()
            log_prob[idx] = log_probs.gather(1, ids[:, None]).squeeze(1)
            top = log_probs.argmax(dim=1)
            correct[idx] = top == ids
            task_labels = TASK_LABELS[task]
            for i, j in zip(idx, top.tolist()):
                predicted[i] = task_labels[j]
        scores = log_prob if self.kind == "logprob" else log_prob.exp()
        return RewardOutput(scores=scores, log_prob=log_prob, correct=correct, predicted=predicted)


# -- the plain reward function (TRL's reward_funcs) -----------------------------------------------
def _text_of(item: Any, role: str | None) -> str:
    """A prompt or completion as plain text: a string as is (image markers removed), or the last
    message of a conversation (`[{"role": ..., "content": str | [{"type": "text", "text": ...}]}]`)."""
    if isinstance(item, str):
        return item.replace(IMAGE_MARKER, "").strip()
    if isinstance(item, dict):
        item = [item]
    if isinstance(item, (list, tuple)) and item and all(isinstance(m, dict) for m in item):
        messages = [m for m in item if role is None or m.get("role") == role] or list(item)
        content = messages[-1].get("content", "")
        if isinstance(content, list):
            content = " ".join(part.get("text", "") for part in content
                               if isinstance(part, dict) and part.get("type", "text") == "text")
        if not isinstance(content, str):
            raise ValueError(f"reward: message content must be text, got {type(content).__name__}")
        return content.replace(IMAGE_MARKER, "").strip()
    raise ValueError(f"reward: expected a string or a list of chat messages, got {type(item).__name__}")


def classifier_reward_fn(classifier_dir: str | Path, task: str = ALIGNMENT, kind: str = "logprob",
                         device: str | torch.device = "cpu", batch_size: int = 64,
                         label_column: str = "labels") -> Callable[..., list[float]]:
    """`fn(prompts, completions, labels, **kw) -> list[float]`: the classifier reward as TRL reward_funcs.

    prompts / completions: strings, or conversations (the last user / assistant message is read).
    labels: the correct label per sample ("Safe"/"Unsafe" for alignment, "A".."D" for perception),
    i.e. a dataset column `labels` (another name: `label_column`). A `task` column, when the
    dataset has one, overrides `task` per sample (records' "text_alignment" is judged as alignment).
    """
    check_task(task)
    reward = ClassifierReward.load(classifier_dir, kind=kind, device=device, batch_size=batch_size)

    def classifier_reward(prompts: Sequence[Any], completions: Sequence[Any], labels: Sequence[str] | None = None,
                          **kwargs: Any) -> list[float]:
        if labels is None:
            labels = kwargs.get(label_column)
        if labels is None:
            raise ValueError(f"reward: no labels given (pass labels=..., or give the dataset a {label_column!r} "
                             "column with the correct label of each prompt)")
        labels = list(labels)
        if len(prompts) != len(completions) or len(labels) != len(prompts):
            raise ValueError(f"reward: {len(prompts)} prompts, {len(completions)} completions and "
                             f"{len(labels)} labels (one of each per sample)")
        task_column = kwargs.get("task")
        tasks = [classifier_task(t) for t in task_column] if task_column is not None else task
        questions = [_text_of(p, "user") for p in prompts]
        answers = [_text_of(c, "assistant") for c in completions]
        return reward(questions, answers, labels, tasks).scores.tolist()

    classifier_reward.__name__ = f"classifier_{kind}"      # TRL logs each reward function by its name
    return classifier_reward
