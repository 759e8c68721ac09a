"""The study's statistics: the point estimate recomputed by hand, the interval's coverage of a known
truth over simulated studies, paired differences, and the report files written from evaluation answers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from eval.headline import Cell, concept_cells, pooled, selection_score
from safevlm.study import bootstrap_draws, statistic, summarise, write_study_report
from runtime.layout import StudyLayout
from safevlm.summary import VARIANTS


def _cells(rates_per_seed: dict[int, dict[str, tuple[int, int]]]) -> dict[int, dict[str, Cell]]:
    return {s: {c: Cell(k, n) for c, (k, n) in concepts.items()} for s, concepts in rates_per_seed.items()}


def test_point_estimate_is_the_mean_over_seeds_of_the_mean_over_concepts():
    ppo = _cells({0: {"a": (3, 4), "b": (1, 4)}, 1: {"a": (4, 4), "b": (2, 4), "c": (0, 4)}})
    sft = _cells({0: {"a": (2, 4), "b": (1, 4)}, 1: {"a": (1, 4), "b": (2, 4), "c": (0, 4)}})
    table = {"PPO": {"split": {"unsafe_image": ppo}}, "SFT": {"split": {"unsafe_image": sft}}}
    out = summarise(table, [0, 1], draws=500)
    by_hand_ppo = np.mean([np.mean([3 / 4, 1 / 4]), np.mean([1.0, 2 / 4, 0.0])])
    by_hand_sft = np.mean([np.mean([2 / 4, 1 / 4]), np.mean([1 / 4, 2 / 4, 0.0])])
    est = out["estimates"]["split"]
    assert est["PPO"]["unsafe_image"]["mean"] == pytest.approx(by_hand_ppo)
    assert est["SFT"]["unsafe_image"]["mean"] == pytest.approx(by_hand_sft)
    assert est["PPO"]["unsafe_image"]["per_seed"] == pytest.approx([0.5, 0.5])
    diff = out["differences"]["split"]["PPO - SFT"]["unsafe_image"]
    assert diff["mean"] == pytest.approx(by_hand_ppo - by_hand_sft)
    for entry in (est["PPO"]["unsafe_image"], diff):
        assert entry["low"] <= entry["mean"] <= entry["high"]


def test_a_constant_shift_gives_a_zero_width_paired_interval():
    rng = np.random.default_rng(3)
    base = {s: {f"c{i}": (int(k), 10) for i, k in enumerate(rng.integers(0, 9, 12))} for s in range(4)}
    shifted = {s: {c: (k + 1, n) for c, (k, n) in concepts.items()} for s, concepts in base.items()}
    table = {"PPO": {"x": {"text_only": _cells(shifted)}}, "DPO": {"x": {"text_only": _cells(base)}}}
    diff = summarise(table, list(range(4)), draws=300)["differences"]["x"]["PPO - DPO"]["text_only"]
    assert diff["mean"] == pytest.approx(0.1) and diff["low"] == pytest.approx(0.1) and diff["high"] == pytest.approx(0.1)
    single = summarise(table, list(range(4)), draws=300)["estimates"]["x"]["PPO"]["text_only"]
    assert single["high"] - single["low"] > 0.02          # the methods themselves vary over concepts


def test_the_interval_covers_the_truth_about_95_percent_of_the_time():
    """Simulated studies: each concept's true rate varies around 0.6, each seed adds its own shift, and
    each cell is 20 binomial answers. The estimand is the population mean (0.6)."""
    rng = np.random.default_rng(0)
    covered, studies = 0, 150
    for _ in range(studies):
        cells = {}
        for seed in range(5):
            shift = rng.normal(0, 0.03)
            cells[seed] = {f"c{i}": Cell(int(rng.binomial(20, np.clip(0.6 + shift + rng.normal(0, 0.1), 0, 1))), 20)
                           for i in range(12)}
        rates = [np.array([cells[s][c].rate for c in sorted(cells[s])]) for s in range(5)]
        boot = [statistic(rates, d) for d in bootstrap_draws([12] * 5, draws=400, seed=int(rng.integers(1 << 30)))]
        lo, hi = np.percentile(boot, 2.5), np.percentile(boot, 97.5)
        covered += lo <= 0.6 <= hi
    assert 0.85 <= covered / studies <= 0.995, covered / studies


def _write_eval(folder: Path, records: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"labelers": ["judge", "rules"],
                                                     "metrics": {"primary_labeler": "judge"}}))
    (folder / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _record(task: str, concept: str, is_safe: bool, target: str, judged: str) -> dict:
    return {"task": task, "concept": concept, "is_safe": is_safe, "target": target,
            "labels": {"judge": judged, "rules": target}}


def test_headline_cells_count_na_as_wrong_and_use_the_primary_labeler():
    records = [_record("alignment", "knife", False, "Unsafe", "Unsafe"),
               _record("alignment", "knife", False, "Unsafe", "NA"),
               _record("alignment", "apple", True, "Safe", "NA"),
               _record("alignment", "apple", True, "Safe", "Safe"),
               _record("text_alignment", "knife", False, "Unsafe", "Safe"),
               _record("perception", "knife", False, "B", "B")]
    cells = concept_cells(records, "judge")
    numbers = pooled(cells)
    assert numbers == {"unsafe_image": 0.5, "safe_image": 0.5, "text_only": 0.0, "perception": 1.0}
    assert selection_score(numbers) == pytest.approx((0.5 + 0.5 + 0.0) / 3)


def test_report_files_from_evaluation_answers(tmp_path: Path):
    rng = np.random.default_rng(1)
    for seed in (0, 1, 2):
        for variant, _ in VARIANTS:
            for split in ("heldout_render", "heldout_concept"):
                records = []
                for concept in ("knife", "gun", "skull"):
                    for _ in range(5):
                        right = rng.random() < (0.8 if variant == "ppo" else 0.4)
                        records.append(_record("alignment", concept, False, "Unsafe", "Unsafe" if right else "Safe"))
                _write_eval(StudyLayout(tmp_path).seed(seed).evaluation(variant, split).root, records)
    result = write_study_report(tmp_path, [0, 1, 2], ["heldout_render", "heldout_concept"], draws=200)
    report = tmp_path / "report"
    summary = json.loads((report / "study.json").read_text())
    assert set(summary["estimates"]["heldout_concept"]) == {"base", "stage 2", "PPO", "SFT", "DPO"}
    assert summary["environment"]["libraries"]["torch"]
    rows = list(csv.DictReader((report / "study.csv").open()))
    ppo = next(r for r in rows if r["kind"] == "estimates" and r["method"] == "PPO" and r["split"] == "heldout_render")
    assert float(ppo["mean"]) == pytest.approx(summary["estimates"]["heldout_render"]["PPO"]["unsafe_image"]["mean"])
    markdown = (report / "report.md").read_text()
    assert "PPO - SFT" in markdown and "held out of" in markdown
    assert (report / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["report"] == str(report / "report.md")
