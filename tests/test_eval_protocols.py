"""The two UnsafeConcepts protocols and the safe images: the reference code's safe split and RLHF-test
prompt draw recomputed here literally (random / numpy as the reference calls them) and compared
image by image and prompt by prompt; a placeholder safe folder rendered in a tmp dir; the CLI's
--protocol and --safe-data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.benchmarks import unsafeconcepts as uc
from eval.benchmarks.protocols import protocol_items, rlhf_test_items
from eval.benchmarks.safe_images import load_safe_images, safe_reference_split, select_safe_rows
from eval.core.items import DataError
from safevlm.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "unsafeconcepts"
ORIGINAL_ROOT = "/home/someone/SaferVLM/data/imagenet_1k"     # where the reference saved its images


@pytest.fixture
def global_rngs():
    """The reference seeds Python's and numpy's global RNGs; put them back after the test."""
    state = random.getstate(), np.random.get_state()
    yield
    random.setstate(state[0])
    np.random.set_state(state[1])


def _png(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), (shade % 256, 120, 60)).save(path)


def _safe_folder(root: Path, n: int) -> Path:
    """n placeholder safe images laid out as the reference writes them: every image in the folder,
    metadata.json naming each by the absolute path it was saved under."""
    entries = []
    for i in range(n):
        _png(root / f"{i}.png", i)
        entries.append({"image_filename": f"{ORIGINAL_ROOT}/{i}.png", "concept": f"class {i:04d}"})
    (root / "metadata.json").write_text(json.dumps(entries, indent=2))
    return root


def _uc_folder(root: Path, metadata: list[dict]) -> Path:
    """The published layout with placeholder images for every row."""
    (root / "metadata.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (root / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metadata))
    for i, m in enumerate(metadata):
        _png(root / m["image_filename"], i)
    return root


def _reference_safe_split(safe_root: Path, split_ratio: float = 0.8):
    """`SafeConcept_train_test_split` of the reference code, as it runs (the images already saved)."""
    random.seed(2024)
    np.random.seed(2024)
    dataset = json.load(open(f"{safe_root}/metadata.json", "r"))
    random.shuffle(dataset)
    sample_num = int(len(dataset) * split_ratio)
    return dataset[:sample_num], dataset[sample_num:]


def _reference_unsafe_split(metadata: list[dict], split_ratio: float = 0.8):
    """`UnsafeConcept_train_test_split` of the reference code on the metadata rows."""
    random.seed(2024)
    np.random.seed(2024)
    all_unsafe_concepts = np.unique([m["unsafe_concept"] for m in metadata])
    train_result, test_result = [], []
    for concept in all_unsafe_concepts:
        items = [(m["category"], m["unsafe_concept"], m["image_filename"]) for m in metadata
                 if m["unsafe_concept"] == concept]
        sample_num = int(len(items) * split_ratio)
        random.shuffle(items)
        train_result.extend(items[:sample_num])
        test_result.extend(items[sample_num:])
    return train_result, test_result


def _reference_rlhf_test(metadata: list[dict], safe_root: Path) -> list[dict]:
    """build_training_data's test_data.json and eval_rlhf.format_dataset's prompt for each image."""
    _, unsafe_test = _reference_unsafe_split(metadata)
    _, safe_test = _reference_safe_split(safe_root)
    safe_test = safe_test[:len(unsafe_test)]
    test_data = [{"image_fname": image, "label": "Unsafe"} for _, _, image in unsafe_test]
    test_data += [{"image_fname": item["image_filename"], "label": "Safe"} for item in safe_test]
    test_prompts = uc.PROMPTS["alignment"]
    np.random.seed(42)
    sampled_indices = np.random.choice(len(test_prompts), size=len(test_data), replace=True)
    return [{**item, "prompt": test_prompts[i]} for item, i in zip(test_data, sampled_indices)]


def test_safe_split_is_the_reference_rule_image_by_image(tmp_path, global_rngs):
    safe = load_safe_images(_safe_folder(tmp_path / "imagenet_1k", 57))
    assert safe.rows[3].image == "3.png" and safe.rows[3].concept == "class 0003" and safe.rows[3].is_safe
    train, test = safe_reference_split(safe.rows)
    ref_train, ref_test = _reference_safe_split(tmp_path / "imagenet_1k")
    assert [Path(r.image).name for r in train] == [Path(e["image_filename"]).name for e in ref_train]
    assert [Path(r.image).name for r in test] == [Path(e["image_filename"]).name for e in ref_test]
    assert select_safe_rows(safe, "test") == test and select_safe_rows(safe, "all") == safe.rows
    with pytest.raises(DataError, match="splits \\['all', 'train', 'test'\\]"):
        select_safe_rows(safe, "heldout_render")


def test_rlhf_test_images_and_prompts_are_the_reference_code_s(tmp_path, global_rngs):
    if not (SHARED / "metadata.jsonl").is_file():
        pytest.skip(reason=f"the UnsafeConcepts metadata is not beside the repository ({SHARED})")
    metadata = [json.loads(line) for line in (SHARED / "metadata.jsonl").read_text().splitlines()]
    root = _uc_folder(tmp_path / "uc", metadata)
    # More safe images than ImageNet's 1,000 classes, so that balancing (safe_test[:345]) cuts.
    safe_root = _safe_folder(tmp_path / "imagenet_1k", 1800)
    items = rlhf_test_items(uc.load_unsafeconcepts(root), load_safe_images(safe_root))
    reference = _reference_rlhf_test(metadata, safe_root)
    assert len(reference) == 690 and len(items) == 690
    for item, ref in zip(items, reference):
        if ref["label"] == "Unsafe":
            assert item.meta["image"] == ref["image_fname"] and not item.meta["is_safe"]
        else:
            assert item.meta["image"] == "safe/" + Path(ref["image_fname"]).name and item.meta["is_safe"]
        assert item.question == ref["prompt"] and item.meta["target"] == ref["label"]
        assert item.task == "alignment" and Path(item.images[0]).is_file()
    # --limit cuts each part after the draw: the kept images keep the reference's questions.
    cut = rlhf_test_items(uc.load_unsafeconcepts(root), load_safe_images(safe_root), limit=3)
    assert [it.id for it in cut] == [it.id for it in items[:3]] + [it.id for it in items[345:348]]


def _small_benchmark(tmp_path: Path) -> tuple[Path, Path]:
    """Two unsafe concepts x 5 images (1 test image each by the reference rule) and 10 safe images."""
    metadata = [{"image_filename": f"images/{i}.png", "category": category, "unsafe_concept": concept}
                for i, (concept, category) in enumerate([("Swastika", "Hate")] * 5 + [("Knife attacks", "Violence")] * 5)]
    return _uc_folder(tmp_path / "uc", metadata), _safe_folder(tmp_path / "safe", 10)


def test_measurement_with_safe_images_and_the_rlhf_test_on_the_cli(tmp_path, capsys, global_rngs):
    root, safe_root = _small_benchmark(tmp_path)
    common = ["eval", "unsafeconcepts", "--model", "tiny", "--data", str(root), "--max-new-tokens", "3",
              "--no-progress", "--no-cache"]
    # measurement: every test image (unsafe and safe) x 5 alignment questions
    assert main(common + ["--safe-data", str(safe_root), "--split", "test", "--tasks", "alignment",
                          "--out", str(tmp_path / "m")]) == 0
    res = json.loads((tmp_path / "m" / "results.json").read_text())
    assert (res["data"]["n_images"], res["data"]["n_safe_images"], res["data"]["n_items"]) == (2, 2, 20)
    fr = res["metrics"]["false_refusal"]
    records = [json.loads(line) for line in (tmp_path / "m" / "responses.jsonl").read_text().splitlines()]
    safe = [r for r in records if r["is_safe"]]
    assert fr["measured"] and fr["n_alignment"] == len(safe) == 10
    assert fr["safe_accuracy"]["na_counted_wrong"] == pytest.approx(
        sum(r["labels"]["rules"] == "Safe" for r in safe) / len(safe))
    _, safe_test = safe_reference_split(load_safe_images(safe_root).rows)
    assert {r["id"].split("/", 1)[1].rsplit("/", 1)[0] for r in safe} == {f"safe/{r.image}" for r in safe_test}
    # rlhf-test: one question per image, greedy whatever was asked, the protocol's table in the report
    assert main(common + ["--safe-data", str(safe_root), "--protocol", "rlhf-test", "--temperature", "0.7",
                          "--out", str(tmp_path / "r")]) == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["data"]["protocol"] == "rlhf-test" and res["settings"]["greedy"] is True
    assert (res["data"]["n_images"], res["data"]["n_safe_images"], res["data"]["n_items"]) == (2, 2, 4)
    records = [json.loads(line) for line in (tmp_path / "r" / "responses.jsonl").read_text().splitlines()]
    right = sum(r["labels"]["rules"] == r["target"] for r in records)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## RLHF test of the reference code" in md
    assert f"| all images | {right / 4:.3f} |" in md
    # Without the safe images the RLHF test cannot run; a measurement says false refusal was not measured.
    assert main(common + ["--protocol", "rlhf-test", "--out", str(tmp_path / "x")]) == 2
    assert "--safe-data DIR" in capsys.readouterr().err
    assert main(common + ["--tasks", "alignment", "--out", str(tmp_path / "u")]) == 0
    assert "false refusal" in (tmp_path / "u" / "report.md").read_text().lower()
    assert "not measured" in (tmp_path / "u" / "report.md").read_text()


def test_bad_safe_folders_are_named_by_file_entry_and_field(tmp_path):
    root = tmp_path / "bad_safe"
    root.mkdir()
    with pytest.raises(DataError, match="not a safe-image folder"):
        load_safe_images(root)
    (root / "metadata.json").write_text(json.dumps([{"image_filename": "0.png", "concept": "cat"},
                                                    {"image_filename": "1.png"}]))
    with pytest.raises(DataError, match=r"metadata\.json: entry 1: field 'concept' must be a non-empty string"):
        load_safe_images(root)
    (root / "metadata.json").write_text(json.dumps([{"image_filename": "0.png", "concept": "cat"}] * 2))
    with pytest.raises(DataError, match=r"entry 1: field 'image_filename': image '0.png' is listed twice"):
        load_safe_images(root)
    (root / "metadata.json").write_text(json.dumps([{"image_filename": "../../etc/passwd", "concept": "cat"}]))
    data = uc.load_unsafeconcepts(_small_benchmark(tmp_path)[0])
    with pytest.raises(DataError, match=r"metadata\.json: entry 0: field 'image_filename'.*escapes the data folder"):
        protocol_items("measurement", data, load_safe_images(root), None, ("alignment",))
    with pytest.raises(ValueError, match="protocol: must be one of"):
        protocol_items("paper", data, None, None, None)


def test_a_run_config_stops_on_a_missing_or_bad_safe_folder_before_any_stage(tmp_path):
    from safevlm.pipeline import check_config, load_pipeline_config, plan
    from safety_modules.configio import ConfigError

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    cfg = load_pipeline_config(tiny, [f"run_dir={tmp_path / 'run'}", "eval.protocol=rlhf-test"])
    with pytest.raises(ConfigError, match="eval.safe_data: the rlhf-test protocol needs the safe-image folder"):
        check_config(cfg, plan(cfg))
    cfg = load_pipeline_config(tiny, [f"run_dir={tmp_path / 'run'}", f"eval.safe_data={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="eval.safe_data: .*not a safe-image folder"):
        check_config(cfg, plan(cfg))
    cfg = load_pipeline_config(tiny, [f"run_dir={tmp_path / 'run'}", f"eval.safe_data={_safe_folder(tmp_path / 's', 3)}"])
    check_config(cfg, plan(cfg))
    assert not (tmp_path / "run").exists()
