"""RTVLM ("Red Teaming Visual Language Models", Li et al. 2024): read the subsets, judge, score.

Two folder layouts are read:
- the framework's local copy: `<root>/<file>.jsonl`, images under `<root>/images/<file stem>/<name>`,
  except the flag images of the visual-misleading and order subsets, shared under
  `<root>/images/flags/<Country>.jpg` (spaces removed);
- the published data set's folders once its zips are unpacked: `<root>[/data]/<Folder>/<file>.jsonl`
  with images in `<Folder>/img/` (or `img/img/`, or the folder itself).
Field names differ per file (see `SUBSETS`); both the early-2024 files and the later revision
(politics, racial and jailbreak enlarged to 200 items, same fields) are read the same way.

The ten scored subtasks and their aspects are in `eval.core.metrics` (overall = unweighted mean of ten).
The order subsets show two images; single-image models see them side by side in one picture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from eval.core.items import RTVLM, DataError, EvalItem, read_jsonl, require
from eval.core.metrics import RTVLM_SUBTASKS, rtvlm_scores
from eval.core.refusal import is_refusal
from eval.judges.base import Judge, JudgeRequest
from safety_modules.images import ImageError, resolve_image_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclass(frozen=True)
class Subset:
    """One RTVLM subset: its file, how its records read, where its images live, its rubric."""

    name: str
    file: str
    aspect: str
    risk: str                       # rubric key (eval.judges.base.RUBRICS)
    kind: str                       # record format, see _PARSERS
    folders: tuple[str, ...]        # folder names in the published layout
    flags: bool = False             # images shared under images/flags/

    @property
    def stem(self) -> str:
        return Path(self.file).stem


SUBSETS: dict[str, Subset] = {s.name: s for s in (
    Subset("text_misleading", "misleading.jsonl", "faithfulness", "misleading", "misleading", ("Harmful", "Misleading")),
    Subset("visual_misleading", "visual_misleading_wrong.jsonl", "faithfulness", "misleading", "flag",
           ("VisualMisleadingWrong", "VisualMisleadWrong"), flags=True),
    Subset("visual_misleading_correct", "visual_misleading_correct.jsonl", "control", "misleading", "flag",
           ("VisualMisleadingCorrect", "VisualMisleadCorrect"), flags=True),
    Subset("order_a", "visual_order_a.jsonl", "faithfulness", "misleading", "order", ("VisualOrderA",), flags=True),
    Subset("order_b", "visual_order_b.jsonl", "faithfulness", "misleading", "order", ("VisualOrderB",), flags=True),
    Subset("celebrity", "celebrity.jsonl", "privacy", "privacy", "celebrity", ("Celebrity",)),
    Subset("face", "face.jsonl", "privacy", "fairness", "prompt_id", ("Face",)),
    Subset("politics", "politics.jsonl", "safety", "politics", "prompt_id", ("Politics",)),
    Subset("racial", "racial.jsonl", "safety", "bullying", "prompt_id", ("Racial",)),
    Subset("captcha", "captcha.jsonl", "safety", "illegal risk", "captcha", ("Captcha",)),
    Subset("jailbreak", "jailbreak.jsonl", "safety", "illegal risk", "jailbreak", ("Jailbreak",)),
)}
DEFAULT_SUBSETS: tuple[str, ...] = RTVLM_SUBTASKS


@dataclass
class Question:
    """A parsed record (before image resolution): one question and its image names."""

    question: str
    image_names: tuple[str, ...]
    image_field: str
    refused_to_answer: str | None = None
    reference: str | None = None


def _image_name(value: object) -> str:
    name = str(value).strip()
    return name if name.lower().endswith(IMAGE_SUFFIXES) else f"{name}.jpg"


def _flag(country: str) -> str:
    return _image_name(country.replace(" ", ""))


def _opt_str(record: dict, key: str, where: str) -> str | None:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {value!r}")
    return value


def _parse_misleading(rec: dict, where: str) -> list[Question]:
    questions = require(rec, "questions", list, where)
    index = require(rec, "index", (int, str), where)
    if not questions:
        raise DataError(f"{where}: field 'questions' is empty")
    refused = rec.get("refused_to_answer", [None] * len(questions))
    answers = rec.get("answers", [None] * len(questions))
    for key, values in (("refused_to_answer", refused), ("answers", answers)):
        if not isinstance(values, list) or len(values) != len(questions):
            raise DataError(f"{where}: field {key!r} must be a list as long as 'questions' ({len(questions)})")
    out = []
    for k, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{where}: field 'questions'[{k}] must be a non-empty string, got {q!r}")
        out.append(Question(q, (_image_name(index),), "index", refused[k], answers[k]))
    return out


def _parse_flag(rec: dict, where: str) -> list[Question]:
    img = require(rec, "img", str, where)
    return [Question(require(rec, "question", str, where), (_flag(img),), "img",
                     _opt_str(rec, "refused_to_answer", where), _opt_str(rec, "answers", where))]


def _parse_order(rec: dict, where: str) -> list[Question]:
    imgs = require(rec, "img", list, where)
    if len(imgs) != 2 or not all(isinstance(c, str) and c.strip() for c in imgs):
        raise DataError(f"{where}: field 'img' must be a list of two country names, got {imgs!r}")
    return [Question(require(rec, "question", str, where), tuple(_flag(c) for c in imgs), "img",
                     _opt_str(rec, "refused_to_answer", where), _opt_str(rec, "answers", where))]


def _parse_celebrity(rec: dict, where: str) -> list[Question]:
    ident = require(rec, "id", (int, str), where)
    refused = rec.get("Refuse to Answer", rec.get("refused_to_answer"))  # sic: the published field name
    return [Question(require(rec, "instruction", str, where), (_image_name(ident),), "id", refused)]


def _parse_prompt_id(rec: dict, where: str) -> list[Question]:
    ident = require(rec, "id", (int, str), where)
    return [Question(require(rec, "prompt", str, where), (_image_name(ident),), "id",
                     _opt_str(rec, "refused_to_answer", where))]


def _parse_captcha(rec: dict, where: str) -> list[Question]:
    ident = require(rec, "id", (int, str), where)
    answer = rec.get("answer")
    return [Question(require(rec, "instruction", str, where), (_image_name(ident),), "id", None,
                     None if answer is None else str(answer))]


def _parse_jailbreak(rec: dict, where: str) -> list[Question]:
    index = require(rec, "index", (int, str), where)
    return [Question(require(rec, "instruction", str, where), (_image_name(index),), "index",
                     _opt_str(rec, "refused_to_answer", where))]


_PARSERS: dict[str, Callable[[dict, str], list[Question]]] = {
    "misleading": _parse_misleading, "flag": _parse_flag, "order": _parse_order, "celebrity": _parse_celebrity,
    "prompt_id": _parse_prompt_id, "captcha": _parse_captcha, "jailbreak": _parse_jailbreak,
}


def find_subset_file(root: Path, subset: Subset) -> Path:
    """The subset's JSONL in the local layout, else in the published folders (DataError if absent)."""
    tried = [root / subset.file]
    for base in (root / "data", root):
        for folder in subset.folders:
            tried.append(base / folder / subset.file)
    for path in tried:
        if path.is_file():
            return path
    for base in (root / "data", root):
        for folder in subset.folders:
            found = sorted((base / folder).glob("*.jsonl")) if (base / folder).is_dir() else []
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise DataError(f"RTVLM subset {subset.name!r}: {base / folder} holds several JSONL files "
                                f"({[p.name for p in found]}) and none is named {subset.file}")
    raise DataError(f"RTVLM subset {subset.name!r}: {subset.file} not found under {root} "
                    f"(looked at {[str(p) for p in tried[:3]]} ...)")


def image_dirs(root: Path, subset: Subset, jsonl: Path) -> list[Path]:
    """Folders searched, in order, for a subset's images."""
    local = root / "images" / ("flags" if subset.flags else subset.stem)
    folder = jsonl.parent
    dirs = [local]
    if folder != root:
        dirs += [folder / "img", folder / "img" / "img", folder / "images", folder]
    return dirs


def _resolve(dirs: list[Path], name: str, where: str, field: str) -> str:
    for directory in dirs:
        try:
            path = resolve_image_path(directory, name)
        except ImageError as exc:
            raise DataError(f"{where}: field {field!r}: {exc}") from None
        if path.is_file():
            return str(path)
    raise DataError(f"{where}: field {field!r}: image {name!r} not found (looked in {[str(d) for d in dirs]})")


def load_subset(root: str | Path, name: str) -> list[EvalItem]:
    """Every question of one subset as EvalItems (images resolved, errors naming file, line, field)."""
    if name not in SUBSETS:
        raise ValueError(f"unknown RTVLM subset {name!r}; subsets: {sorted(SUBSETS)}")
    root = Path(root)
    subset = SUBSETS[name]
    path = find_subset_file(root, subset)
    dirs = image_dirs(root, subset, path)
    items = []
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        for k, q in enumerate(_PARSERS[subset.kind](rec, where)):
            images = tuple(_resolve(dirs, n, where, q.image_field) for n in q.image_names)
            items.append(EvalItem(
                id=f"{name}/{lineno}/{k}", task=RTVLM, question=q.question, images=images,
                meta={"subset": name, "aspect": subset.aspect, "risk": subset.risk, "source": where,
                      "refused_to_answer": q.refused_to_answer, "reference": q.reference}))
    if not items:
        raise DataError(f"{path}: no records")
    return items


def load_rtvlm(root: str | Path, subsets: Sequence[str] | None = None) -> list[EvalItem]:
    """Items of the chosen subsets (default: the ten scored subtasks)."""
    names = list(subsets) if subsets else list(DEFAULT_SUBSETS)
    items: list[EvalItem] = []
    for name in names:
        items.extend(load_subset(root, name))
    return items


def score(items: Sequence[EvalItem], answers: Mapping[str, str], judge: Judge) -> dict:
    """Judge every answer and aggregate: per subtask, per aspect, overall (failures reported)."""
    requests = [JudgeRequest(question=it.question, answer=answers[it.id], risk=it.meta["risk"], images=it.images,
                             reference=it.meta.get("reference"), subset=it.meta["subset"]) for it in items]
    judgements = judge.judge(requests)
    records = []
    for it, req, j in zip(items, requests, judgements):
        records.append({"id": it.id, "subset": it.meta["subset"], "aspect": it.meta["aspect"], "risk": it.meta["risk"],
                        "question": it.question, "answer": req.answer, "score": j.score, "judge_error": j.error,
                        "judge_cached": j.cached, "refused": is_refusal(req.answer),
                        "refused_to_answer": it.meta.get("refused_to_answer"), "source": it.meta["source"]})
    metrics = rtvlm_scores(records)
    metrics["judge"] = getattr(judge, "name", type(judge).__name__)
    metrics["refusal_rate"] = {s: sum(r["refused"] for r in records if r["subset"] == s) /
                               max(1, sum(1 for r in records if r["subset"] == s))
                               for s in sorted({r["subset"] for r in records})}
    return {"records": records, "metrics": metrics}
