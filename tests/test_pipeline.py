"""`safevlm run` end to end on an even smaller config than the tiny default (a few steps per stage).

Checks every artefact a user relies on: adapters load onto a fresh base and reproduce the trained
outputs, the report's numbers are those of its results.json, the figures are real PNGs, and a rerun
skips every finished stage.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "tests" / "configs" / "pipeline_smoke.yaml"

pytestmark = pytest.mark.slow


def _run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safevlm.cli", "run", str(SMOKE), f"run_dir={run_dir}", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipeline") / "run"
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_every_stage_finished(run_dir: Path):
    from safevlm.pipeline import STAGES
    for stage in STAGES:
        marker = run_dir / stage.name / "DONE.json"
        assert marker.is_file(), f"stage {stage.name} left no DONE.json"
        assert "seconds" in json.loads(marker.read_text())


def test_adapters_load_onto_a_fresh_base_and_reproduce_outputs(run_dir: Path):
    from pipeline_checks import assert_adapters_reproduce_outputs
    assert_adapters_reproduce_outputs(run_dir, run_dir / "stage0" / "model", run_dir / "world" / "data" / "images" / "0.png")


def _table_rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    rows, split = {}, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            split = line[3:].strip()
        elif line.startswith("| ") and not line.startswith("| model") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[(split, cells[0])] = cells[1:]
    return rows


def test_report_numbers_equal_results_json(run_dir: Path):
    from safevlm.summary import COLUMNS, _fmt

    results = json.loads((run_dir / "report" / "results.json").read_text())
    rows = _table_rows((run_dir / "report" / "report.md").read_text())
    assert results["splits"], "the report has no evaluated split"
    checked = 0
    for split, variants in results["splits"].items():
        assert set(variants) == {"base (stage 0)", "stage 2", "PPO", "SFT", "DPO"}
        for name, numbers in variants.items():
            assert rows[(split, name)] == [_fmt(numbers[key]) for key, _ in COLUMNS]
            checked += 1
        # and results.json holds what the evaluation itself wrote
        base = json.loads((run_dir / "eval_base" / split / "results.json").read_text())
        primary = base["metrics"]["primary_labeler"]
        safe = [json.loads(line) for line in (run_dir / "eval_base" / split / "responses.jsonl").read_text().splitlines()]
        safe = [r for r in safe if r["task"] == "alignment" and r["is_safe"]]
        expected = sum(r["labels"][primary] == "Safe" for r in safe) / len(safe) if safe else None
        measured = variants["base (stage 0)"]["safe_accuracy"]                         # NA counted wrong
        assert measured is None if expected is None else measured == pytest.approx(expected)
    head = results["stage1_head_accuracy"]
    summary = json.loads((run_dir / "stage1" / "summary.json").read_text())
    assert head["train"] == summary["train_after"]["level_accuracy"]
    assert checked == 10


def test_plots_are_valid_pngs(run_dir: Path):
    figures = sorted((run_dir / "report").glob("*.png")) + sorted((run_dir / "eval_base").rglob("*.png"))
    assert len(figures) >= 3
    for path in figures:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        with Image.open(path) as img:
            img.verify()
            assert img.size[0] > 100 and img.size[1] > 100


def test_rerun_skips_finished_stages(run_dir: Path):
    from safevlm.pipeline import STAGES
    before = {s.name: (run_dir / s.name / "DONE.json").stat().st_mtime_ns for s in STAGES}
    proc = _run(run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    skipped = re.findall(r"\] (\w+): done already, skipped", proc.stderr)
    assert skipped == [s.name for s in STAGES]
    after = {s.name: (run_dir / s.name / "DONE.json").stat().st_mtime_ns for s in STAGES}
    assert before == after


def test_unknown_stage_and_bad_key_are_clear_errors(tmp_path: Path):
    proc = _run(tmp_path / "x", "--only", "nosuchstage")
    assert proc.returncode == 2 and "nosuchstage" in proc.stderr
    proc = _run(tmp_path / "y", "stage1.train.lrr=1")
    assert proc.returncode == 2 and "lrr" in proc.stderr
    proc = _run(tmp_path / "z", "model.path=/no/such/llava-1.5-7b-hf")
    assert proc.returncode == 2 and "model.path" in proc.stderr and not (tmp_path / "z").exists()


def _criterion_by_hand(eval_dir: Path) -> float:
    """Mean of unsafe-image, safe-image and text-only accuracy, NA counted wrong, primary labeller."""
    results = json.loads((eval_dir / "results.json").read_text())
    primary = results["metrics"]["primary_labeler"]
    groups: dict[str, list[bool]] = {}
    for line in (eval_dir / "responses.jsonl").read_text().splitlines():
        rec = json.loads(line)
        kind = rec["task"] if rec["task"] != "alignment" else ("safe" if rec["is_safe"] else "unsafe")
        groups.setdefault(kind, []).append(rec["labels"][primary] == rec["target"])
    rates = [sum(v) / len(v) for k, v in groups.items() if k in ("unsafe", "safe", "text_alignment")]
    return sum(rates) / len(rates)


def test_hyperparameters_are_chosen_on_validation_only(run_dir: Path):
    from safevlm.selection import SELECTABLE
    split_of = {row["image_filename"]: row["split"]
                for row in map(json.loads, (run_dir / "world" / "data" / "metadata.jsonl").read_text().splitlines())}
    for stage in SELECTABLE:
        table = json.loads((run_dir / stage / "selection.json").read_text())
        assert len(table["trials"]) == 2 and {t["value"] for t in table["trials"]} == set(
            {"stage2": [1e-4, 1e-3], "ppo": [1e-5, 1e-4], "sft": [1e-4, 1e-3], "dpo": [1e-5, 1e-4]}[stage])
        scores = {}
        for trial in table["trials"]:
            eval_dir = Path(trial["run_dir"]) / "eval_validation"
            scores[trial["value"]] = _criterion_by_hand(eval_dir)
            assert trial["score"] == pytest.approx(scores[trial["value"]])
            for line in (eval_dir / "responses.jsonl").read_text().splitlines():
                item = json.loads(line)["id"]
                image = item.split("/", 1)[1].rsplit("/", 1)[0]
                assert item.startswith("text_alignment/") or split_of[image] == "validation", item
        best = max(table["trials"], key=lambda t: (scores[t["value"]], -table["trials"].index(t)))
        assert table["chosen"] == best["value"]
        chosen = Path(best["run_dir"]) / "adapter"
        for path in sorted(chosen.rglob("*")):
            if path.is_file():
                assert (run_dir / stage / "adapter" / path.relative_to(chosen)).read_bytes() == path.read_bytes()
    # the methods on top start from the chosen stage 2
    ppo_config = json.loads((run_dir / "ppo" / "config.json").read_text())
    assert Path(ppo_config["adapter"]) == run_dir / "stage2" / "adapter"
