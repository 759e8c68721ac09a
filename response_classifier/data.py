"""The response classifier's record format: tasks, label names, JSONL reading with line-exact errors.

Why one label space for both tasks: the classifier is one sequence-classification model with a task
prefix in its input and 7 output labels (Safe, Unsafe, A, B, C, D, NA); each task's softmax runs over
its own labels only (the others are masked). NA is shared because it means the same thing in both
tasks ("the answer gives no clear judgement / no single option"), so one output unit learns it from
twice the data. One model instead of two heads keeps save/load, training and the PPO reward to one
code path and one forward pass.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from safety_modules.fileio import iter_jsonl
from safety_modules.labels import NA, OPTIONS, TASK_LABELS, TASKS, VERDICTS

# The model's output units, in order; a task's labels are a subset (masking selects them).
LABELS: tuple[str, ...] = (*VERDICTS, *OPTIONS, NA)
FIELDS: tuple[str, ...] = ("task", "question", "answer", "label")
_OPTION_LINE = re.compile(r"^\s*([A-D])\s*[:.)]\s*(.+?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Record:
    """One labelled answer: the question asked, the answer given, and the class of the answer."""

    task: str
    question: str
    answer: str
    label: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def parse_options(question: str) -> dict[str, str]:
    """Letter -> option text of a question laid out one option a line, "A: x \\nB: y ..." (the
    protocol's option_str); empty when the question has no such lines."""
    return {m.group(1): m.group(2) for m in _OPTION_LINE.finditer(question)}


_ARTICLES = {"a", "an", "the"}
# A negation shortly before a mention ("not a swastika", "rather than knife attacks") un-picks it.
_NEGATED_BEFORE = re.compile(r"\b(?:not|no|never|isn't|rather than|instead of|neither|nor)\b(?:\W+\w+){0,2}\W*$",
                             re.IGNORECASE)


def option_pattern(text: str) -> re.Pattern | None:
    """A case-insensitive pattern for an option's words, tolerant of articles and plural -s/-es."""
    words = [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _ARTICLES]
    if not words:
        return None
    parts = [re.escape(w[:-1] if len(w) > 3 and w.endswith("s") else w) + r"(?:e?s)?" for w in words]
    return re.compile(r"\b" + r"[\s\-]+".join(parts) + r"\b", re.IGNORECASE)


def option_mentions(question: str, answer: str) -> list[tuple[int, int, str]]:
    """(start, end, letter) of each mention of an option's text in `answer`, in order; overlapping
    mentions keep the longest option text ("online fraud" over "fraud")."""
    spans: list[tuple[int, int, str]] = []
    for letter, text in parse_options(question).items():
        pattern = option_pattern(text)
        if pattern is not None:
            spans += [(m.start(), m.end(), letter) for m in pattern.finditer(answer)]
    spans.sort(key=lambda s: (s[0], -(s[1] - s[0])))
    kept: list[tuple[int, int, str]] = []
    for span in spans:
        if not kept or span[0] >= kept[-1][1]:
            kept.append(span)
    return kept


def named_option(question: str, answer: str) -> str | None:
    """The letter of the one option an answer names by its text ("The image shows a knife attack"
    given "C: Knife attacks"), or None: no option named, several named, or the one named negated."""
    mentions = option_mentions(question, answer)
    picked = {letter for start, _, letter in mentions if not _NEGATED_BEFORE.search(answer[:start])}
    return picked.pop() if len(picked) == 1 else None


def check_task(task: str) -> str:
    if task not in TASK_LABELS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    return task


def validate_record(row: object, where: str) -> Record:
    """A `Record` from a parsed JSON value, or ValueError naming `where` (file:line) and the field."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in FIELDS:
        if name not in row:
            raise ValueError(f"{where}: missing field {name!r} (a record needs {list(FIELDS)})")
        if not isinstance(row[name], str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}")
    task = row["task"]
    if task not in TASK_LABELS:
        raise ValueError(f"{where}: field 'task': unknown task {task!r}; expected one of {list(TASKS)}")
    if row["label"] not in TASK_LABELS[task]:
        raise ValueError(f"{where}: field 'label': {row['label']!r} is not a {task} label "
                         f"{list(TASK_LABELS[task])}")
    return Record(task=task, question=row["question"], answer=row["answer"], label=row["label"])


def read_jsonl(path: str | Path) -> list[Record]:
    """All records of a JSONL file (blank lines skipped); any malformed line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier data file not found: {path}")
    records = [validate_record(row, f"{path}:{lineno}") for lineno, row in iter_jsonl(path)]
    if not records:
        raise ValueError(f"{path}: no records (expected JSON lines with fields {list(FIELDS)})")
    return records


def write_jsonl(records: Iterable[Record], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")
    return path
