"""`build_world`: render the concept world and write its UnsafeConcepts-style folder and records.

Why one build: the images, the evaluation metadata and the training records of every stage must
agree on the same concepts, splits and labels, so they are produced together, deterministically for
a seed (byte-identical files for the same config and seed). Its steps: select the concepts, render
them, draw the perception options, balance the training images, make the records, write. Layout:
`runtime.layout.DataLayout` (`DIR/metadata.jsonl`, `DIR/perception_metadata.jsonl`, `DIR/images/`,
`DIR/records/`, `DIR/world.json`).

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
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from concept_world import texts
from concept_world.concepts import CATEGORIES, RISK_TYPES, SAFE_CATEGORY, Concept, select_concepts
from concept_world.config import WorldConfig
from concept_world.records import (BLANK_IMAGE, STAGE0_SAFE_RATE_ON_SAFE, STAGE0_SAFE_RATE_ON_UNSAFE,
                                   draw_options, safety_records, stage0_records)
from concept_world.render import assign_traits, category_traits, render
from runtime.layout import IMAGES_DIR, METADATA_FILE, PERCEPTION_FILE, RECORDS_DIR, WORLD_FILE, DataLayout
from safety_modules.fileio import write_json_atomic

FORMAT = "safevlm-concept-world/1"
TRAIN_SPLIT = "train"
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
WORLD_FILES = (WORLD_FILE, METADATA_FILE, PERCEPTION_FILE)
WORLD_DIRS = (IMAGES_DIR, RECORDS_DIR)


@dataclass
class Renders:
    """What rendering wrote: one metadata row per image, and each concept's image paths (all of them,
    and those stage 0 may see)."""

    rows: list[dict]
    concept_images: dict[str, list[str]]
    stage0_images: dict[str, list[str]]


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to write into a non-empty folder, except over an earlier world with `overwrite`."""
    layout = DataLayout(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not layout.world.is_file():
            raise ValueError(f"--out {out}: folder is not empty and holds no world ({WORLD_FILE}); choose another")
        if not overwrite:
            raise ValueError(f"--out {out}: a world already exists there; pass --overwrite to replace it")
        for sub in WORLD_DIRS:
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
        for name in WORLD_FILES:
            (out / name).unlink(missing_ok=True)
    layout.images.mkdir(parents=True, exist_ok=True)
    layout.records_dir.mkdir(parents=True, exist_ok=True)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _render_split(index: int, n_train: int, n_val: int) -> str:
    """The split of a training concept's render `index`: train, then validation, then held out."""
    if index < n_train:
        return TRAIN_SPLIT
    return VALIDATION_SPLIT if index < n_train + n_val else "heldout_render"


def _select(config: WorldConfig, seed: int) -> tuple[list[Concept], str, dict[str, dict]]:
    """The world's concepts with their traits, the source of their names, and the category traits."""
    world, source = select_concepts(config.concepts, config.num_safe, config.heldout_unsafe, config.heldout_safe,
                                    seed, config.metadata, validation_unsafe=config.validation_unsafe,
                                    validation_safe=config.validation_safe)
    cat_traits = category_traits(list(CATEGORIES))
    groups: dict[str, list[str]] = {}
    for c in world:
        groups.setdefault(c.category, []).append(c.name)
    shape_traits = assign_traits(list(groups.items()), seed)
    for c in world:
        c.traits = {**shape_traits[c.name], **({} if c.is_safe else cat_traits[c.category])}
    return world, source, cat_traits


def _render_all(out: Path, world: list[Concept], config: WorldConfig, seed: int, progress: bool) -> Renders:
    """Write the blank image and every concept's renders (`images/<n>.png`), each with its split."""
    counts = config.render_counts()
    Image.new("RGB", (config.size, config.size), (255, 255, 255)).save(out / BLANK_IMAGE, format="PNG")
    renders = Renders(rows=[], concept_images={}, stage0_images={})
    bar = tqdm(total=len(world) * config.images_per_concept, desc="rendering world", unit="img",
               disable=not progress)
    n = 0
    for ci, c in enumerate(world):
        renders.concept_images[c.name], renders.stage0_images[c.name] = [], []
        for ri in range(config.images_per_concept):
            rel = f"{IMAGES_DIR}/{n}.png"
            render(c.traits, config.size, [seed, ci, ri]).save(out / rel, format="PNG")
            in_train_part = ri < counts.train
            if c.split == TRAIN_SPLIT:
                split = _render_split(ri, counts.train, counts.validation)
            else:
                split = STAGE0_ONLY if in_train_part else c.split
            renders.rows.append({"image_filename": rel, "category": c.category, "unsafe_concept": c.name,
                                 "is_safe": c.is_safe, "safety_level": c.safety_level, "risk_type": c.risk_type,
                                 "split": split})
            renders.concept_images[c.name].append(rel)
            if in_train_part:
                renders.stage0_images[c.name].append(rel)
            n += 1
            bar.update(1)
    bar.close()
    return renders


def _perception_rows(rows: list[dict], all_names: list[str], seed: int) -> list[dict]:
    """The metadata rows with the multiple-choice options of each image's perception question."""
    rng = random.Random(f"perception-{seed}")
    out = []
    for row in rows:
        options, letter = draw_options(rng, row["unsafe_concept"], all_names)
        out.append({**row, "option_str": texts.option_str(options), "correct_option": letter})
    return out


def _balance(train_images: list[tuple[str, Concept]], seed: int) -> list[tuple[str, Concept]]:
    """As many unsafe as safe training images (a seeded sample of the larger class), in their order."""
    unsafe = [t for t in train_images if not t[1].is_safe]
    safe = [t for t in train_images if t[1].is_safe]
    rng = random.Random(f"balance-{seed}")
    k = min(len(unsafe), len(safe))
    if k == 0:
        raise ValueError("the world has no safe or no unsafe training concept left after the holdout")
    keep = {rel for rel, _ in rng.sample(unsafe, k) + rng.sample(safe, k)}
    return [t for t in train_images if t[0] in keep]


def _make_records(world: list[Concept], renders: Renders, config: WorldConfig,
                  seed: int) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """Every stage's and evaluation split's records (stage 0 first), and stage 0's "safe" shares."""
    by_name = {c.name: c for c in world}

    def images_of(split: str) -> list[tuple[str, Concept]]:
        return [(r["image_filename"], by_name[r["unsafe_concept"]]) for r in renders.rows if r["split"] == split]

    train_images = images_of(TRAIN_SPLIT)
    balanced = _balance(train_images, seed)
    train_concepts = [c for c in world if c.split == TRAIN_SPLIT]
    s0_images = [(rel, c) for c in world for rel in renders.stage0_images[c.name]]
    records: dict[str, list[dict]] = {}
    records["stage0"], s0_rates = stage0_records(s0_images, train_images, train_concepts, list(by_name),
                                                 config.questions_per_image, config.perception_per_image, seed)
    for stage in SAFETY_STAGES:
        records[stage] = safety_records(stage, balanced, config.questions_per_image, seed)
    # Labelled safety questions on the held-out images: what stage 1's head accuracy is measured on.
    for split in EVAL_SPLITS:
        records[split] = safety_records(split, images_of(split), 1, seed)
    return records, s0_rates


def _params(config: WorldConfig, seed: int, world: list[Concept]) -> dict:
    """The settings the world was built with, held-out and validation concepts as drawn."""
    def count(split: str, is_safe: bool) -> int:
        return sum(c.split == split and c.is_safe == is_safe for c in world)

    return {"concepts": config.concepts, "safe_concepts": config.num_safe,
            "images_per_concept": config.images_per_concept, "seed": seed, "size": config.size,
            "heldout_unsafe": count("heldout_concept", False), "heldout_safe": count("heldout_concept", True),
            "validation_unsafe": count(VALIDATION_SPLIT, False), "validation_safe": count(VALIDATION_SPLIT, True),
            "heldout_render_fraction": config.heldout_render_fraction,
            "validation_render_fraction": config.validation_render_fraction,
            "questions_per_image": config.questions_per_image, "perception_per_image": config.perception_per_image}


def _write(layout: DataLayout, renders: Renders, perception_rows: list[dict],
           records: dict[str, list[dict]], meta: dict) -> None:
    """The metadata files, one records file per stage and split, and `world.json` last (it marks a
    complete world)."""
    _write_jsonl(layout.metadata, renders.rows)
    _write_jsonl(layout.perception, perception_rows)
    for stage, recs in records.items():
        _write_jsonl(layout.records(stage), recs)
    write_json_atomic(layout.world, meta, indent=1, ensure_ascii=False)


def build_world(out: str | Path, config: WorldConfig | None = None, seed: int = 0, *, overwrite: bool = False,
                progress: bool = True) -> dict:
    """Render and write the concept world of `config` (default: `WorldConfig()`) for `seed` into `out`;
    return a summary (counts per split, category, file). `overwrite` replaces an earlier world there."""
    start = time.perf_counter()
    out, config = Path(out), config or WorldConfig()
    world, source, cat_traits = _select(config, seed)
    _prepare_out(out, overwrite)
    renders = _render_all(out, world, config, seed, progress)
    perception_rows = _perception_rows(renders.rows, [c.name for c in world], seed)
    records, s0_rates = _make_records(world, renders, config, seed)
    counts = _counts(renders.rows, records, s0_rates, world)
    params = _params(config, seed, world)
    meta = {"format": FORMAT, "params": params, "source": source,
            "risk_types": RISK_TYPES, "safety_levels": {SAFE_CATEGORY: 0, **CATEGORIES},
            "category_traits": cat_traits, "blank_image": BLANK_IMAGE,
            "stage0_safe_rates": {"unsafe": STAGE0_SAFE_RATE_ON_UNSAFE, "safe": STAGE0_SAFE_RATE_ON_SAFE},
            "counts": counts,
            "concepts": [{**c.to_dict(), "images": renders.concept_images[c.name],
                          "stage0_images": renders.stage0_images[c.name]} for c in world]}
    _write(DataLayout(out), renders, perception_rows, records, meta)
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
