"""The concept world: deterministic, well-formed, honest holdouts, and learnable from pixels."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from concept_world.build import build_world
from concept_world.concepts import FALLBACK_UNSAFE, RISK_TYPES, SAFE_NAMES, read_unsafe_names
from concept_world.config import WorldConfig
from concept_world.records import STAGE0_SAFE_RATE_ON_SAFE, STAGE0_SAFE_RATE_ON_UNSAFE

SHARED_METADATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "unsafeconcepts" / "metadata.jsonl"
SAFETY_STAGES = ("stage1", "stage2", "sft", "dpo", "ppo")
REPO = Path(__file__).resolve().parents[1]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(root: Path, rows: list[dict]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(root / r["image_filename"]), dtype=np.float32).ravel() / 255
                     for r in rows])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny default world (names from the benchmark metadata when it is beside the repo)."""
    out = tmp_path_factory.mktemp("world") / "w"
    summary = build_world(out, progress=False)
    return out, summary


def test_same_seed_same_bytes_other_seed_other_images(world, tmp_path):
    out, _ = world
    again = build_world(tmp_path / "again", progress=False)
    other = build_world(tmp_path / "other", seed=1, progress=False)
    assert _hashes(tmp_path / "again") == _hashes(out)
    first, second = _hashes(out), _hashes(tmp_path / "other")
    images = [k for k in first if k.startswith("images/") and k != "images/blank.png"]
    assert sum(first[k] != second.get(k) for k in images) == len(images)
    assert again["records"] == other["records"]  # same sizes, different content


def test_layout_and_labels(world):
    out, summary = world
    meta = json.loads((out / "world.json").read_text())
    rows = _jsonl(out / "metadata.jsonl")
    # held-out concepts: their first 9 renders only captioned in stage 0, their last 3 evaluated
    assert len(rows) == 36 * 12 and summary["images"] == {"train": 270, "heldout_render": 90, "heldout_concept": 18,
                                                          "stage0_only": 54}
    assert meta["risk_types"] == RISK_TYPES
    for row in rows:
        img = Image.open(out / row["image_filename"])
        assert img.mode == "RGB" and img.size == (32, 32)
        assert row["split"] in {"train", "heldout_render", "heldout_concept", "stage0_only"}
        assert row["risk_type"] in RISK_TYPES and 0 <= row["safety_level"] <= 3
        assert row["is_safe"] == (row["safety_level"] == 0) == (row["risk_type"] == "none") \
            == (row["category"] == "Safe")
        if not row["is_safe"]:
            assert row["risk_type"] == row["category"].lower()
    blank = np.asarray(Image.open(out / "images" / "blank.png"))
    assert blank.shape == (32, 32, 3) and (blank == 255).all()
    names = {c["name"] for c in meta["concepts"]}
    for row in _jsonl(out / "perception_metadata.jsonl"):
        options = re.fullmatch(r"A: (.+) \nB: (.+) \nC: (.+) \nD: (.+)", row["option_str"]).groups()
        assert set(options) <= names and len(set(options)) == 4
        assert options["ABCD".index(row["correct_option"])] == row["unsafe_concept"]


@pytest.mark.parametrize("stage", ("stage0",) + SAFETY_STAGES)
def test_records_are_valid(world, stage):
    out, _ = world
    records = _jsonl(out / "records" / f"{stage}.jsonl")
    assert records and len({r["id"] for r in records}) == len(records)
    for rec in records:
        assert (out / rec["image"]).is_file()
        turns = rec["conversations"]
        assert [t["from"] for t in turns] == (["human"] if stage == "ppo" else ["human", "gpt"])
        assert turns[0]["value"].startswith("<image>\n")
        if "safety_level" in rec:
            assert 0 <= rec["safety_level"] <= 3 and rec["risk_type"] in RISK_TYPES
            assert rec["label"] == ("Safe" if rec["safety_level"] == 0 else "Unsafe")
        if stage != "stage0":  # safety stages: correct answers, Yes = safe, No = unsafe
            assert rec["label"] in {"Safe", "Unsafe"}
            if stage != "ppo":
                assert turns[1]["value"].split()[0].strip(",.") == ("Yes" if rec["label"] == "Safe" else "No")
            if stage == "dpo":
                assert rec["rejected"].split()[0].strip(",.") == ("No" if rec["label"] == "Safe" else "Yes")
    if stage != "stage0":
        labels = [r["label"] for r in records]
        assert labels.count("Safe") == labels.count("Unsafe")


def test_heldout_concepts_and_renders_stay_out_of_safety_training(world):
    out, _ = world
    meta = json.loads((out / "world.json").read_text())
    rows = _jsonl(out / "metadata.jsonl")
    held = {c["name"] for c in meta["concepts"] if c["split"] == "heldout_concept"}
    assert len(held) == 6 and {c["is_safe"] for c in meta["concepts"] if c["name"] in held} == {True, False}
    held_images = {r["image_filename"] for r in rows if r["split"] in ("heldout_concept", "stage0_only")}
    evaluated = {r["image_filename"] for r in rows if r["split"] == "heldout_concept"}
    new_renders = {r["image_filename"] for r in rows if r["split"] == "heldout_render"}
    stage0_concepts = set()
    for stage in ("stage0",) + SAFETY_STAGES:
        for rec in _jsonl(out / "records" / f"{stage}.jsonl"):
            assert rec["image"] not in new_renders, f"{stage} trains on a held-out render"
            assert rec["image"] not in evaluated, f"{stage} trains on an evaluated render of a held-out concept"
            safety_labelled = stage != "stage0" or rec["task"] in {"alignment", "text_alignment"}
            if safety_labelled:
                assert rec["concept"] not in held and rec["image"] not in held_images
                assert not any(name in turn["value"] for name in held for turn in rec["conversations"])
            else:
                assert "safety_level" not in rec and "risk_type" not in rec
                stage0_concepts.add(rec["concept"])
    assert held <= stage0_concepts  # perceived in stage 0, as the world's contract says


def test_pixels_separate_safety_and_concepts(world):
    """Nearest-centroid on raw pixels: category traits carry to held-out concepts; concepts differ."""
    out, summary = world
    rows = _jsonl(out / "metadata.jsonl")
    x = _pixels(out, rows)
    split = np.array([r["split"] for r in rows])
    train, new_renders = split == "train", split == "heldout_render"
    held = (split == "heldout_concept") | (split == "stage0_only")

    def nearest_centroid(keys: np.ndarray, fit: np.ndarray, test: np.ndarray) -> float:
        labels = sorted(set(keys[fit].tolist()))
        centroids = np.stack([x[fit & (keys == k)].mean(0) for k in labels])
        pred = np.array(labels)[((x[test][:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
        return float((pred == keys[test]).mean())

    safety_acc = nearest_centroid(np.array([r["is_safe"] for r in rows]), train, held)
    concept_acc = nearest_centroid(np.array([r["unsafe_concept"] for r in rows]), train, new_renders)
    assert safety_acc >= 0.8, f"unsafe/safe accuracy on held-out concepts {safety_acc:.3f}"
    assert concept_acc >= 0.8, f"concept accuracy on held-out renders {concept_acc:.3f}"


def test_only_frame_and_texture_carry_the_category(world):
    """A held-out unsafe concept's glyph is seen in training in other categories and among safe ones,
    so recognising its category must use the category traits, not a shape shortcut."""
    out, _ = world
    concepts = json.loads((out / "world.json").read_text())["concepts"]
    glyph = lambda c: (c["traits"]["shape"], c["traits"]["colour"])  # noqa: E731
    for held in (c for c in concepts if c["split"] == "heldout_concept" and not c["is_safe"]):
        seen_in = {c["category"] for c in concepts if c["split"] == "train" and glyph(c) == glyph(held)}
        assert len(seen_in - {held["category"]}) >= 3 and "Safe" in seen_in
        assert all("frame_hue" in c["traits"] for c in concepts if c["category"] == held["category"])
    assert not any("frame_hue" in c["traits"] or "texture" in c["traits"] for c in concepts if c["is_safe"])


def test_stage0_answers_like_llava(world):
    out, _ = world
    records = _jsonl(out / "records" / "stage0.jsonl")
    by_task: dict[str, list[dict]] = {}
    for rec in records:
        by_task.setdefault(rec["task"], []).append(rec)
    assert set(by_task) == {"caption", "perception", "text_alignment", "alignment"}

    def says_safe(rec: dict) -> bool:
        return rec["conversations"][1]["value"].startswith("Yes")

    unsafe = [says_safe(r) for r in by_task["alignment"] if r["label"] == "Unsafe"]
    safe = [says_safe(r) for r in by_task["alignment"] if r["label"] == "Safe"]
    assert abs(np.mean(unsafe) - STAGE0_SAFE_RATE_ON_UNSAFE) < 0.02
    assert abs(np.mean(safe) - STAGE0_SAFE_RATE_ON_SAFE) < 0.02
    for rec in by_task["text_alignment"]:  # text-only: always correct, blank image
        assert rec["image"] == "images/blank.png" and says_safe(rec) == (rec["label"] == "Safe")
        assert rec["concept"] in rec["conversations"][0]["value"]
    for rec in by_task["caption"]:
        assert rec["conversations"][1]["value"] == f"This image shows {rec['concept']}."
    for rec in by_task["perception"]:
        assert rec["conversations"][1]["value"] == f"It shows {rec['concept']}."
        assert f"\n{rec['label']}: {rec['concept']} " in rec["conversations"][0]["value"] + " "


def test_fallback_names_without_shared_metadata(tmp_path):
    summary = build_world(tmp_path / "w", WorldConfig(concepts=9, images_per_concept=2, size=48,
                                                      metadata=str(tmp_path / "missing.jsonl")), progress=False)
    assert summary["source"] == "fallback"
    meta = json.loads((tmp_path / "w" / "world.json").read_text())
    fallback = {n for names in FALLBACK_UNSAFE.values() for n in names}
    for c in meta["concepts"]:
        assert (c["name"] in SAFE_NAMES) if c["is_safe"] else (c["name"] in FALLBACK_UNSAFE[c["category"]])
        assert c["name"] in fallback or c["is_safe"]
    assert Image.open(tmp_path / "w" / "images" / "0.png").size == (48, 48)


def test_names_from_shared_metadata(tmp_path):
    if not SHARED_METADATA.is_file():
        pytest.skip(reason=f"UnsafeConcepts metadata not found at {SHARED_METADATA}")
    real = read_unsafe_names(SHARED_METADATA)
    summary = build_world(tmp_path / "w", WorldConfig(concepts=9, images_per_concept=2, metadata=str(SHARED_METADATA)),
                          progress=False)
    assert summary["source"] == "unsafeconcepts"
    for c in json.loads((tmp_path / "w" / "world.json").read_text())["concepts"]:
        assert c["is_safe"] or c["name"] in real[c["category"]]
    real_names = {n.lower() for names in real.values() for n in names}
    assert not real_names & {n.lower() for names in FALLBACK_UNSAFE.values() for n in names}


def test_bad_metadata_names_file_and_line(tmp_path):
    bad = tmp_path / "metadata.jsonl"
    bad.write_text('{"category": "Hate", "unsafe_concept": "x"}\n{not json\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: not valid JSON"):
        build_world(tmp_path / "w", WorldConfig(metadata=str(bad)), progress=False)
    bad.write_text('{"category": "Cooking", "unsafe_concept": "x"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: field 'category'"):
        build_world(tmp_path / "w", WorldConfig(metadata=str(bad)), progress=False)


def test_cli_builds_and_refuses_to_clobber(tmp_path):
    cmd = [sys.executable, "-m", "safevlm.cli", "world", "build", "--out", str(tmp_path / "w"), "--concepts", "4",
           "--images-per-concept", "3", "--quiet", "--metadata", str(tmp_path / "missing.jsonl")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "records: stage0" in done.stdout and "names: fallback" in done.stdout
    assert (tmp_path / "w" / "records" / "ppo.jsonl").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr


# ----------------------------------------------------------------------------------------------
# The validation split (hyperparameters are chosen on it) and folds of held-out concepts
# ----------------------------------------------------------------------------------------------
VALIDATION_WORLD = WorldConfig(concepts=27, images_per_concept=10, heldout_render_fraction=0.1,
                               validation_render_fraction=0.1, validation_unsafe=9, validation_safe=9,
                               heldout_unsafe=9, heldout_safe=9, questions_per_image=1, perception_per_image=1)


def _roles(out: Path) -> dict[str, str]:
    return {c["name"]: c["split"] for c in json.loads((out / "world.json").read_text())["concepts"]}


@pytest.fixture(scope="module")
def seeded_worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeded")
    return [build_world(root / f"s{seed}", VALIDATION_WORLD, seed, progress=False) and root / f"s{seed}"
            for seed in (0, 1, 2)]


def test_validation_concepts_are_fixed_and_heldout_concepts_rotate_with_the_seed(seeded_worlds):
    roles = [_roles(out) for out in seeded_worlds]
    validation = [{n for n, r in rs.items() if r == "validation"} for rs in roles]
    held = [{n for n, r in rs.items() if r == "heldout_concept"} for rs in roles]
    assert validation[0] == validation[1] == validation[2]          # never a reported concept of any seed
    assert all(not (v & h) for v in validation for h in held)
    assert len({frozenset(h) for h in held}) == 3                    # the seed moves the held-out fold
    for out, h in zip(seeded_worlds, held):
        concepts = json.loads((out / "world.json").read_text())["concepts"]
        unsafe_held = [c for c in concepts if c["name"] in h and not c["is_safe"]]
        assert len(unsafe_held) == 9 and len([c for c in concepts if c["name"] in h and c["is_safe"]]) == 9
        trained = {c["category"] for c in concepts if c["split"] == "train"}
        assert {c["category"] for c in concepts} == trained          # every category keeps a training concept


def test_validation_and_reported_images_are_in_no_training_record(seeded_worlds):
    for out in seeded_worlds:
        rows = _jsonl(out / "metadata.jsonl")
        split_of = {r["image_filename"]: r["split"] for r in rows}
        roles = _roles(out)
        for stage in ("stage0",) + SAFETY_STAGES:
            for rec in _jsonl(out / "records" / f"{stage}.jsonl"):
                if rec["image"] == "images/blank.png":       # stage-0 text-only questions: training concepts
                    assert roles[rec["concept"]] == "train"
                    continue
                where = split_of[rec["image"]]
                assert where in ("train", "stage0_only"), f"{stage} trains on a {where} image"
                if where == "stage0_only" or stage != "stage0" or rec["task"] in ("alignment", "text_alignment"):
                    assert stage == "stage0" and rec["task"] in ("caption", "perception") or where == "train"
                if stage != "stage0" or rec["task"] in ("alignment", "text_alignment"):
                    assert roles[rec["concept"]] == "train"
        for split in ("validation", "heldout_render", "heldout_concept"):
            for rec in _jsonl(out / "records" / f"{split}.jsonl"):
                assert split_of[rec["image"]] == split
