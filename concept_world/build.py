"""`build_world`: render the concept world and write its UnsafeConcepts-style folder and records.

Why one function: the images, the evaluation metadata and the training records of every stage must
agree on the same concepts, splits and labels, so they are produced together, deterministically for
a seed (byte-identical files for the same arguments). Layout: see `world.json` and the README of
the world (`DIR/metadata.jsonl`, `DIR/perception_metadata.jsonl`, `DIR/images/`, `DIR/records/`).

Splits, and what each is held out of:
- "train": the renders every training stage may see.
- "heldout_render": the last renders of each training concept, held out of every training stage.
  Their concepts are trained on (stage 0 asks their text-only safety questions), so text-only
  accuracy on this split is not held out.
- "heldout_concept": the last renders of each held-out concept, held out of every training stage;
  the concept itself is held out of all safety training (stage-0 safety questions, stage 1, stage 2,
  SFT, DPO, PPO).
- "stage0_only": the first renders of held-out and validation concepts, which stage 0 captions and
  asks perception questions about (so that the base perceives those concepts, as a real VLM
  perceives concepts it was never aligned on); no safety question is ever asked on them, and they
  are not evaluated.
- "validation": the middle renders of each training concept and the last renders of each
  validation concept, held out like the reported splits; hyperparameters are chosen on it, and it is
  never reported.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from safety_modules.fileio import write_json_atomic
from concept_world import texts
from concept_world.concepts import CATEGORIES, RISK_TYPES, Concept, select_concepts
from concept_world.render import assign_traits, category_traits, render

# LLaVA-1.5-7B on UnsafeConcepts (the paper's measurement): share of image questions answered "safe".
STAGE0_SAFE_RATE_ON_UNSAFE = 0.79
STAGE0_SAFE_RATE_ON_SAFE = 0.95
SAFETY_STAGES = ("stage1", "stage2", "sft", "dpo", "ppo")
HELDOUT_SPLITS = ("heldout_render", "heldout_concept")   # reported evaluation splits, never trained on
VALIDATION_SPLIT = "validation"                          # model selection only, never reported
STAGE0_ONLY = "stage0_only"                              # held-out concepts' renders stage 0 captions
# What each evaluation split is held out of, in the words reports use.
HELD_OUT_OF = {
    "heldout_render": "new renders of the training concepts, held out of every training stage; their concepts' "
                      "text-only questions are asked in stage 0, so text-only accuracy on this split is not held out",
    "heldout_concept": "new renders of concepts held out of all safety training (stage-0 safety questions, stages 1 "
                       "and 2, PPO, SFT, DPO); the renders themselves are held out of every training stage",
    VALIDATION_SPLIT: "renders and concepts held out of every training stage, used only to choose hyperparameters",
}
EVAL_SPLITS = (*HELDOUT_SPLITS, VALIDATION_SPLIT)
WORLD_FILES = ("world.json", "metadata.jsonl", "perception_metadata.jsonl")
BLANK_IMAGE = "images/blank.png"


def _check(name: str, value, low, high=None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name}: must be {bound}, got {value}")


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to write into a non-empty folder, except over an earlier world with `overwrite`."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "world.json").is_file():
            raise ValueError(f"--out {out}: folder is not empty and holds no world (world.json); choose another")
        if not overwrite:
            raise ValueError(f"--out {out}: a world already exists there; pass --overwrite to replace it")
        for sub in ("images", "records"):
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
        for name in WORLD_FILES:
            (out / name).unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "records").mkdir(parents=True, exist_ok=True)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _conv(question: str, answer: str | None, image: bool = True) -> list[dict]:
    turns = [{"from": "human", "value": ("<image>\n" if image else "") + question}]
    if answer is not None:
        turns.append({"from": "gpt", "value": answer})
    return turns


def _labels(c: Concept) -> dict:
    return {"safety_level": c.safety_level, "risk_type": c.risk_type,
            "label": "Safe" if c.is_safe else "Unsafe"}


def _options(rng: random.Random, correct: str, names: list[str]) -> tuple[list[str], str]:
    options = rng.sample([n for n in names if n != correct], 3)
    position = rng.randrange(4)
    options.insert(position, correct)
    return options, texts.OPTION_LETTERS[position]


def _render_split(index: int, n_train: int, n_val: int) -> str:
    """The split of a training concept's render `index`: train, then validation, then held out."""
    if index < n_train:
        return "train"
    return VALIDATION_SPLIT if index < n_train + n_val else "heldout_render"


def _safety_records(stage: str, images: list[tuple[str, Concept]], per_image: int, seed: int) -> list[dict]:
    """Image + protocol safety question with the correct answer (DPO: + the opposite; PPO: no answer)."""
    rng = random.Random(f"{stage}-{seed}")
    records = []
    for image, c in images:
        for question in rng.sample(texts.ALIGNMENT_PROMPTS, per_image):
            if stage == "dpo":      # rejected = the chosen answer with the opposite verdict
                answer, rejected = texts.verdict_pair(rng, c.name, c.is_safe)
            else:
                answer = texts.alignment_answer(rng, c.name, c.risk_type, says_safe=c.is_safe)
            rec = {"id": "", "image": image,
                   "conversations": _conv(question, None if stage == "ppo" else answer),
                   **_labels(c), "task": "alignment", "concept": c.name}
            if stage == "dpo":
                rec["rejected"] = rejected
            records.append(rec)
    rng.shuffle(records)
    for i, rec in enumerate(records):
        rec["id"] = f"{stage}-{i:06d}"
    return records


def _stage0_records(stage0_images: list[tuple[str, Concept]], train_images: list[tuple[str, Concept]],
                    train_concepts: list[Concept], all_names: list[str], per_image: int,
                    perception_per_image: int, seed: int) -> tuple[list[dict], dict]:
    """Captions, perception, correct text-only safety answers, and LLaVA-1.5-like image safety answers."""
    rng = random.Random(f"stage0-{seed}")
    records: list[dict] = []
    for image, c in stage0_images:
        records.append({"id": "", "image": image,
                        "conversations": _conv(rng.choice(texts.CAPTION_PROMPTS), texts.caption_answer(c.name)),
                        "task": "caption", "concept": c.name})
        for _ in range(perception_per_image):
            options, letter = _options(rng, c.name, all_names)
            records.append({"id": "", "image": image,
                            "conversations": _conv(texts.perception_question(options),
                                                   texts.perception_answer(c.name)),
                            "label": letter, "task": "perception", "concept": c.name})
    for c in train_concepts:
        for template in texts.TEXT_ALIGNMENT_PROMPTS:
            answer = texts.alignment_answer(rng, c.name, c.risk_type, says_safe=c.is_safe, text_only=True)
            records.append({"id": "", "image": BLANK_IMAGE,
                            "conversations": _conv(texts.text_question(template, c.name), answer),
                            **_labels(c), "task": "text_alignment", "concept": c.name})
    # Image safety questions: an exact share answered "safe" per class, like LLaVA-1.5-7B.
    asks = [(image, c, q) for image, c in train_images for q in rng.sample(texts.ALIGNMENT_PROMPTS, per_image)]
    rates = {}
    for is_safe, rate in ((False, STAGE0_SAFE_RATE_ON_UNSAFE), (True, STAGE0_SAFE_RATE_ON_SAFE)):
        idx = [i for i, (_, c, _) in enumerate(asks) if c.is_safe == is_safe]
        says_safe = set(rng.sample(idx, round(rate * len(idx))))
        for i in idx:
            image, c, question = asks[i]
            safe_answer = i in says_safe
            answer = texts.alignment_answer(rng, c.name, c.risk_type, says_safe=safe_answer,
                                            correct=safe_answer == c.is_safe)
            records.append({"id": "", "image": image, "conversations": _conv(question, answer),
                            **_labels(c), "task": "alignment", "concept": c.name})
        rates["safe" if is_safe else "unsafe"] = len(says_safe) / len(idx) if idx else 0.0
    rng.shuffle(records)
    for i, rec in enumerate(records):
        rec["id"] = f"stage0-{i:06d}"
    return records, rates


def build_world(
    out: str | Path,
    concepts: int = 18,
    images_per_concept: int = 12,
    seed: int = 0,
    size: int = 32,
    safe_concepts: int | None = None,
    heldout_unsafe: int | None = None,
    heldout_safe: int | None = None,
    heldout_render_fraction: float = 0.25,
    validation_unsafe: int = 0,
    validation_safe: int = 0,
    validation_render_fraction: float = 0.0,
    questions_per_image: int = 2,
    perception_per_image: int = 2,
    metadata: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Render and write the concept world into `out`; return a summary (counts per split, category, file).

    `concepts` unsafe concepts are spread round-robin over the nine categories; `safe_concepts`
    (default: as many) everyday ones. `heldout_unsafe` categories lose one concept each, and
    `heldout_safe` safe concepts are held out, to all safety training (None: 3 each where possible).
    `validation_unsafe` / `validation_safe` concepts and `validation_render_fraction` of each training
    concept's renders form the validation split (see `select_concepts` and the module docstring).
    """
    start = time.perf_counter()
    out = Path(out)
    safe_concepts = concepts if safe_concepts is None else safe_concepts
    _check("images_per_concept", images_per_concept, 2)
    _check("size", size, 16, 1024)
    _check("heldout_render_fraction", heldout_render_fraction, 0.0, 0.9)
    _check("validation_render_fraction", validation_render_fraction, 0.0, 0.9)
    _check("questions_per_image", questions_per_image, 1, len(texts.ALIGNMENT_PROMPTS))
    _check("perception_per_image", perception_per_image, 0)
    n_eval = max(1, round(images_per_concept * heldout_render_fraction))
    n_val = max(1, round(images_per_concept * validation_render_fraction)) if validation_render_fraction else 0
    n_train = images_per_concept - n_eval - n_val
    if n_train < 1:
        raise ValueError(f"images_per_concept: {images_per_concept} leaves no training render after "
                         f"{n_eval} held-out and {n_val} validation render(s)")
    world, source = select_concepts(concepts, safe_concepts, heldout_unsafe, heldout_safe, seed, metadata,
                                    validation_unsafe=validation_unsafe, validation_safe=validation_safe)
    if len(world) < 4:
        raise ValueError(f"the world needs at least 4 concepts for 4-way perception, got {len(world)}")
    cat_traits = category_traits(list(CATEGORIES))
    groups: dict[str, list[str]] = {}
    for c in world:
        groups.setdefault(c.category, []).append(c.name)
    shape_traits = assign_traits(list(groups.items()), seed)
    for c in world:
        c.traits = {**shape_traits[c.name], **({} if c.is_safe else cat_traits[c.category])}

    _prepare_out(out, overwrite)
    Image.new("RGB", (size, size), (255, 255, 255)).save(out / BLANK_IMAGE, format="PNG")
    rows, concept_images, stage0_images = [], {}, {}
    bar = tqdm(total=len(world) * images_per_concept, desc="rendering world", unit="img", disable=not progress)
    n = 0
    for ci, c in enumerate(world):
        concept_images[c.name], stage0_images[c.name] = [], []
        for ri in range(images_per_concept):
            rel = f"images/{n}.png"
            render(c.traits, size, [seed, ci, ri]).save(out / rel, format="PNG")
            in_train_part = ri < n_train
            if c.split == "train":
                split = _render_split(ri, n_train, n_val)
            else:
                split = STAGE0_ONLY if in_train_part else c.split
            rows.append({"image_filename": rel, "category": c.category, "unsafe_concept": c.name,
                         "is_safe": c.is_safe, "safety_level": c.safety_level, "risk_type": c.risk_type,
                         "split": split})
            concept_images[c.name].append(rel)
            if in_train_part:
                stage0_images[c.name].append(rel)
            n += 1
            bar.update(1)
    bar.close()

    by_name = {c.name: c for c in world}
    all_names = [c.name for c in world]
    prng = random.Random(f"perception-{seed}")
    perception_rows = []
    for row in rows:
        options, letter = _options(prng, row["unsafe_concept"], all_names)
        perception_rows.append({**row, "option_str": texts.option_str(options), "correct_option": letter})

    train_images = [(r["image_filename"], by_name[r["unsafe_concept"]]) for r in rows if r["split"] == "train"]
    unsafe = [t for t in train_images if not t[1].is_safe]
    safe = [t for t in train_images if t[1].is_safe]
    brng = random.Random(f"balance-{seed}")
    k = min(len(unsafe), len(safe))
    if k == 0:
        raise ValueError("the world has no safe or no unsafe training concept left after the holdout")
    keep = {rel for rel, _ in brng.sample(unsafe, k) + brng.sample(safe, k)}
    balanced = [t for t in train_images if t[0] in keep]

    train_concepts = [c for c in world if c.split == "train"]
    s0_images = [(rel, c) for c in world for rel in stage0_images[c.name]]
    records: dict[str, list[dict]] = {}
    records["stage0"], s0_rates = _stage0_records(s0_images, train_images, train_concepts, all_names,
                                                  questions_per_image, perception_per_image, seed)
    for stage in SAFETY_STAGES:
        records[stage] = _safety_records(stage, balanced, questions_per_image, seed)
    # Labelled safety questions on the held-out images: what stage 1's head accuracy is measured on.
    for split in EVAL_SPLITS:
        held = [(row["image_filename"], by_name[row["unsafe_concept"]]) for row in rows if row["split"] == split]
        records[split] = _safety_records(split, held, 1, seed)

    _write_jsonl(out / "metadata.jsonl", rows)
    _write_jsonl(out / "perception_metadata.jsonl", perception_rows)
    for stage in ("stage0", *SAFETY_STAGES, *EVAL_SPLITS):
        _write_jsonl(out / "records" / f"{stage}.jsonl", records[stage])

    counts = _counts(rows, records, s0_rates, world)
    params = {"concepts": concepts, "safe_concepts": safe_concepts, "images_per_concept": images_per_concept,
              "seed": seed, "size": size,
              "heldout_unsafe": sum(c.split == "heldout_concept" and not c.is_safe for c in world),
              "heldout_safe": sum(c.split == "heldout_concept" and c.is_safe for c in world),
              "validation_unsafe": sum(c.split == VALIDATION_SPLIT and not c.is_safe for c in world),
              "validation_safe": sum(c.split == VALIDATION_SPLIT and c.is_safe for c in world),
              "heldout_render_fraction": heldout_render_fraction,
              "validation_render_fraction": validation_render_fraction, "questions_per_image": questions_per_image,
              "perception_per_image": perception_per_image}
    meta = {"format": "safevlm-concept-world/1", "params": params, "source": source,
            "risk_types": RISK_TYPES, "safety_levels": {"Safe": 0, **CATEGORIES},
            "category_traits": cat_traits, "blank_image": BLANK_IMAGE,
            "stage0_safe_rates": {"unsafe": STAGE0_SAFE_RATE_ON_UNSAFE, "safe": STAGE0_SAFE_RATE_ON_SAFE},
            "counts": counts,
            "concepts": [{**c.to_dict(), "images": concept_images[c.name], "stage0_images": stage0_images[c.name]}
                         for c in world]}
    write_json_atomic(out / "world.json", meta, indent=1, ensure_ascii=False)
    return {"out": str(out), "source": source, "params": params, **counts,
            "seconds": round(time.perf_counter() - start, 2)}


def _counts(rows: list[dict], records: dict[str, list[dict]], s0_rates: dict, world: list[Concept]) -> dict:
    images: dict[str, int] = {}
    by_category: dict[str, dict[str, int]] = {}
    for row in rows:
        images[row["split"]] = images.get(row["split"], 0) + 1
        cat = by_category.setdefault(row["category"], {})
        cat[row["split"]] = cat.get(row["split"], 0) + 1
    stage0_tasks: dict[str, int] = {}
    for rec in records["stage0"]:
        stage0_tasks[rec["task"]] = stage0_tasks.get(rec["task"], 0) + 1
    return {
        "concepts": {"unsafe": sum(not c.is_safe for c in world), "safe": sum(c.is_safe for c in world),
                     "heldout_concept": [c.name for c in world if c.split == "heldout_concept"],
                     "validation": [c.name for c in world if c.split == VALIDATION_SPLIT]},
        "images": images,
        "images_by_category": by_category,
        "records": {stage: len(recs) for stage, recs in records.items()},
        "stage0_tasks": stage0_tasks,
        "stage0_image_answers_safe": s0_rates,
    }


def format_summary(summary: dict) -> str:
    """A readable table of a `build_world` summary (what the CLI prints)."""
    lines = [f"concept world in {summary['out']} (names: {summary['source']}, seed {summary['params']['seed']}, "
             f"{summary['params']['size']}px, {summary.get('seconds', 0):.1f}s)",
             f"concepts: {summary['concepts']['unsafe']} unsafe, {summary['concepts']['safe']} safe; held out: "
             + ", ".join(summary["concepts"]["heldout_concept"])
             + (("; validation: " + ", ".join(summary["concepts"]["validation"]))
                if summary["concepts"].get("validation") else ""),
             "images per split: " + ", ".join(f"{k} {v}" for k, v in summary["images"].items()),
             f"{'category':<28}{'train':>7}{'heldout_render':>16}{'heldout_concept':>17}{'validation':>12}"]
    for cat, counts in summary["images_by_category"].items():
        lines.append(f"{cat:<28}{counts.get('train', 0):>7}{counts.get('heldout_render', 0):>16}"
                     f"{counts.get('heldout_concept', 0):>17}{counts.get('validation', 0):>12}")
    lines.append("records: " + ", ".join(f"{k} {v}" for k, v in summary["records"].items()))
    lines.append("stage0 tasks: " + ", ".join(f"{k} {v}" for k, v in summary["stage0_tasks"].items()))
    rates = summary["stage0_image_answers_safe"]
    lines.append(f"stage0 image questions answered 'safe': {rates['unsafe']:.1%} on unsafe, "
                 f"{rates['safe']:.1%} on safe images")
    return "\n".join(lines)
