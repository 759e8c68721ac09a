"""Turn answers into classes: response classifiers and the rule-based check, behind one interface.

Why several labellers: the evaluation must not be judged only by the classifier PPO was rewarded
with (the reference used one classifier for both, which flatters PPO). The primary labeller is a
separately trained response classifier; a second classifier and the rule-based check run beside
it, and their agreement is reported, so a reader sees how much the numbers depend on the judge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol, Sequence

from eval.core.items import MULTIPLE_CHOICE, TEXT_ALIGNMENT, EvalItem
from response_classifier.data import named_option
from response_classifier.model import ResponseClassifier
from response_classifier.rules import rule_based_label
from safety_modules.labels import ALIGNMENT, NA, PERCEPTION

# Item task -> the classifier task that labels its answers.
CLASSIFIER_TASK = {PERCEPTION: PERCEPTION, ALIGNMENT: ALIGNMENT, TEXT_ALIGNMENT: ALIGNMENT,
                   MULTIPLE_CHOICE: PERCEPTION}


class Labeler(Protocol):
    name: str

    def label(self, questions: list[str], answers: list[str], task: str) -> list[str]:
        """One class per answer: Safe/Unsafe/NA (task 'alignment') or A-D/NA ('perception')."""


class RuleLabeler:
    """The rule-based check of `response_classifier.rules` (keywords and letters, no model)."""

    name = "rules"

    def label(self, questions: list[str], answers: list[str], task: str) -> list[str]:
        return [rule_based_label(q, a, task) for q, a in zip(questions, answers)]


class ClassifierLabeler:
    """A trained `ResponseClassifier` loaded from a folder."""

    def __init__(self, directory: str | Path, name: str | None = None, device: str = "cpu",
                 batch_size: int = 64) -> None:
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"response classifier folder not found: {directory}")
        self.classifier = ResponseClassifier.load(directory, device=device)
        self.name = name or f"classifier:{directory.name}"
        self.batch_size = batch_size

    def label(self, questions: list[str], answers: list[str], task: str) -> list[str]:
        """Each distinct (question, answer) pair is classified once.

        Why: greedy answers repeat (five alignment prompts per image, a handful of distinct
        verdicts), and the classifier's forward is most of an evaluation's time on a CPU.
        """
        pairs = list(dict.fromkeys(zip(questions, answers)))
        labels: list[str] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            labels.extend(self.classifier.predict([q for q, _ in chunk], [a for _, a in chunk], task=task))
        by_pair = dict(zip(pairs, labels))
        return [by_pair[pair] for pair in zip(questions, answers)]


def label_items(items: Sequence[EvalItem], answers: Mapping[str, str],
                labelers: Mapping[str, Labeler]) -> dict[str, dict[str, str]]:
    """labeller name -> item id -> class, each task labelled in one call per labeller."""
    if not labelers:
        raise ValueError("at least one labeller (a response classifier or the rules) is needed")
    by_task: dict[str, list[EvalItem]] = {}
    for it in items:
        if it.task not in CLASSIFIER_TASK:
            raise ValueError(f"item {it.id}: task {it.task!r} has no classifier task")
        by_task.setdefault(CLASSIFIER_TASK[it.task], []).append(it)
    out: dict[str, dict[str, str]] = {name: {} for name in labelers}
    for task, group in by_task.items():
        questions = [it.question for it in group]
        texts = [answers[it.id] for it in group]
        for name, labeler in labelers.items():
            labels = labeler.label(questions, texts, task)
            if len(labels) != len(group):
                raise ValueError(f"labeller {name} returned {len(labels)} labels for {len(group)} answers")
            if task == PERCEPTION:
                labels = with_named_options(questions, texts, labels)
            out[name].update({it.id: lab for it, lab in zip(group, labels)})
    return out


def with_named_options(questions: Sequence[str], answers: Sequence[str], labels: Sequence[str]) -> list[str]:
    """Perception labels where an NA becomes the option the answer names by its text.

    Why: "The image shows a knife attack" answers "C: Knife attacks" as surely as "C" does, and the
    protocol scores it as that option; a labeller that only reads letters would count it NA (wrong
    under one convention, dropped under the other). Several options named, or the one named
    negated, stay NA (`response_classifier.data.named_option`).
    """
    return [(named_option(q, a) or NA) if lab == NA else lab for q, a, lab in zip(questions, answers, labels)]


def build_labelers(classifier: str | Path | None = None, second: str | Path | None = None,
                   rules: bool = True, device: str = "cpu") -> dict[str, Labeler]:
    """Primary first: the classifier if given (else the rules), then the second classifier, then rules."""
    labelers: dict[str, Labeler] = {}
    if classifier:
        labelers["classifier"] = ClassifierLabeler(classifier, name="classifier", device=device)
    if second:
        labelers["second_classifier"] = ClassifierLabeler(second, name="second_classifier", device=device)
    if rules or not labelers:
        labelers["rules"] = RuleLabeler()
    return labelers
