"""General capability: what alignment cost. MME-style yes/no pairs, and the concept world's
multiple-choice and captioning accuracy for the tiny default.

Formats read from local files:
- MME-style JSONL (`<root>/mme.jsonl`, or a .jsonl path): {"image": "images/x.jpg", "question":
  "Is there a dog in the image? Please answer yes or no.", "answer": "Yes", "category": "existence",
  ["image_id"]}; image paths relative to the file's folder.
- The MME release's folders: `<root>/<category>/images/<name>.(jpg|png)` with
  `<root>/<category>/questions_answers_YN/<name>.txt`, or image and .txt side by side in
  `<root>/<category>/`; each .txt line is "question<TAB>answer".
- A concept-world folder (metadata.jsonl with a `split` column): its perception questions
  (multiple choice, as in UnsafeConcepts) and a caption question whose answer must name the concept.
Metrics: MME accuracy and accuracy+ (both questions of an image right) per category; multiple-choice
accuracy under both NA conventions; caption accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from eval.benchmarks import unsafeconcepts as uc
from eval.core.items import CAPTION, MME, MULTIPLE_CHOICE, DataError, EvalItem, read_jsonl, require
from eval.core.labeling import Labeler, label_items
from eval.core.metrics import accuracy, grouped_accuracy, mme_scores
from runtime.layout import DataLayout
from safety_modules.images import ImageError, resolve_image_path
from safety_modules.labels import PERCEPTION

MME_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
STAGE0_RECORDS = "stage0"          # the concept world's stage-0 records, which hold its caption question
DEFAULT_CAPTION_PROMPT = "What is shown in this image? Answer with its name."


def _image(root: Path, rel: str, where: str, field: str) -> str:
    try:
        path = resolve_image_path(root, rel)
    except ImageError as exc:
        raise DataError(f"{where}: field {field!r}: {exc}") from None
    if not path.is_file():
        raise DataError(f"{where}: field {field!r} {rel!r}: image file not found ({path})")
    return str(path)


def _yes_no(value: str, where: str) -> str:
    answer = value.strip().lower()
    if answer not in ("yes", "no"):
        raise DataError(f"{where}: field 'answer' must be Yes or No, got {value!r}")
    return answer


def load_mme_jsonl(path: str | Path) -> list[EvalItem]:
    path = Path(path)
    items = []
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        rel = require(rec, "image", str, where)
        items.append(EvalItem(
            id=f"{MME}/{lineno}", task=MME, question=require(rec, "question", str, where),
            images=(_image(path.parent, rel, where, "image"),),
            meta={"category": require(rec, "category", str, where), "image_id": str(rec.get("image_id", rel)),
                  "target": _yes_no(require(rec, "answer", str, where), where)}))
    return items


def load_mme_folders(root: str | Path) -> list[EvalItem]:
    """The MME release layout: one folder per category with images and question .txt files."""
    root = Path(root)
    items = []
    for category in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = category / "questions_answers_YN"
        img_dir = category / "images"
        txts = sorted(qa_dir.glob("*.txt")) if qa_dir.is_dir() else sorted(category.glob("*.txt"))
        for txt in txts:
            base = img_dir if img_dir.is_dir() else category
            candidates = [base / (txt.stem + s) for s in MME_IMAGE_SUFFIXES]
            image = next((c for c in candidates if c.is_file()), None)
            if image is None:
                raise DataError(f"{txt}: no image {txt.stem}.(jpg|jpeg|png) in {base}")
            for lineno, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                where = f"{txt}:{lineno}"
                if "\t" not in line:
                    raise DataError(f"{where}: expected 'question<TAB>answer'")
                question, answer = line.rsplit("\t", 1)
                items.append(EvalItem(
                    id=f"{MME}/{category.name}/{txt.stem}/{lineno}", task=MME, question=question.strip(),
                    images=(str(image),),
                    meta={"category": category.name, "image_id": txt.stem, "target": _yes_no(answer, where)}))
    if not items:
        raise DataError(f"{root}: no MME questions found (expected <category>/questions_answers_YN/*.txt)")
    return items


def caption_prompt(world: Path) -> str:
    """The caption question the world trained with (its stage-0 records), else a default."""
    records = DataLayout(world).records(STAGE0_RECORDS)
    if records.is_file():
        for _, rec in read_jsonl(records):
            if rec.get("task") == CAPTION and rec.get("conversations"):
                text = str(rec["conversations"][0].get("value", ""))
                return text.replace("<image>\n", "").replace("<image>", "").strip() or DEFAULT_CAPTION_PROMPT
    return DEFAULT_CAPTION_PROMPT


def load_world_general(root: str | Path, split: str | None = "heldout_render", limit: int | None = None,
                       sample: int | None = None, seed: int = 0) -> list[EvalItem]:
    """Multiple-choice (perception) and caption items on the world's renders of `split`."""
    root = Path(root)
    data = uc.load_unsafeconcepts(root)
    rows = uc.subsample(uc.select_rows(data, split), limit=limit, sample=sample, seed=seed)
    items = []
    for it in uc.build_items(data, rows, tasks=(PERCEPTION,)):
        it.task = MULTIPLE_CHOICE
        it.id = f"{MULTIPLE_CHOICE}/" + it.id.split("/", 1)[1]
        items.append(it)
    prompt = caption_prompt(root)
    for row in rows:
        items.append(EvalItem(id=f"{CAPTION}/{row.image}", task=CAPTION, question=prompt,
                              images=(uc.image_path(data, row),),
                              meta={"category": row.category, "concept": row.concept, "is_safe": row.is_safe,
                                    "target": row.concept}))
    return items


def load_general(root: str | Path, split: str | None = "heldout_render", limit: int | None = None,
                 sample: int | None = None, seed: int = 0) -> list[EvalItem]:
    """Whatever general-capability set `root` holds (MME JSONL, MME folders, or a concept world)."""
    root = Path(root)
    if root.is_file() and root.suffix == ".jsonl":
        items = load_mme_jsonl(root)
    elif (root / "mme.jsonl").is_file():
        items = load_mme_jsonl(root / "mme.jsonl")
    elif DataLayout(root).metadata.is_file():
        return load_world_general(root, split=split, limit=limit, sample=sample, seed=seed)
    elif root.is_dir():
        items = load_mme_folders(root)
    else:
        raise DataError(f"{root}: not found")
    if sample is not None or limit is not None:
        items = uc.subsample(items, limit=limit, sample=sample, seed=seed)
    return items


def score(items: Sequence[EvalItem], answers: Mapping[str, str], labelers: Mapping[str, Labeler] | None = None) -> dict:
    """MME accuracy/accuracy+, multiple-choice accuracy (primary labeller) and caption accuracy:
    {"records": [...], "metrics": {task: ...}} for the tasks `items` hold."""
    records: list[dict] = []
    metrics: dict = {}
    for task, scorer in ((MME, _score_mme), (MULTIPLE_CHOICE, _score_multiple_choice), (CAPTION, _score_captions)):
        group = [it for it in items if it.task == task]
        if group:
            recs, metrics[task] = scorer(group, answers, labelers)
            records += recs
    return {"records": records, "metrics": metrics}


def _record(it: EvalItem, answers: Mapping[str, str]) -> dict:
    """The fields every answer record of this benchmark starts with."""
    return {"id": it.id, "task": it.task, "question": it.question, "answer": answers[it.id]}


def _concept_fields(it: EvalItem) -> dict:
    return {"category": it.meta["category"], "concept": it.meta["concept"], "target": it.meta["target"]}


def _score_mme(items: Sequence[EvalItem], answers: Mapping[str, str], _labelers) -> tuple[list[dict], dict]:
    recs = [{**_record(it, answers), **it.meta} for it in items]
    return recs, mme_scores(recs)


def _score_multiple_choice(items: Sequence[EvalItem], answers: Mapping[str, str],
                           labelers: Mapping[str, Labeler] | None) -> tuple[list[dict], dict]:
    if not labelers:
        raise ValueError("multiple-choice items need a labeller (a response classifier or the rules)")
    labels = label_items(items, answers, labelers)
    primary = next(iter(labelers))
    recs = [{**_record(it, answers), **_concept_fields(it), "label": labels[primary][it.id],
             "labels": {n: labels[n][it.id] for n in labels}} for it in items]
    return recs, {"overall": accuracy([r["label"] for r in recs], [r["target"] for r in recs]),
                  "per_category": grouped_accuracy(recs, "category"), "labeler": primary}


def _score_captions(items: Sequence[EvalItem], answers: Mapping[str, str], _labelers) -> tuple[list[dict], dict]:
    """A caption is right when it names the concept."""
    recs = []
    for it in items:
        hit = it.meta["target"].lower() in answers[it.id].lower()
        recs.append({**_record(it, answers), **_concept_fields(it), "correct": hit, "label": "ok" if hit else "miss"})
    return recs, {"accuracy": sum(r["correct"] for r in recs) / len(recs), "n": len(recs)}
