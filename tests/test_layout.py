"""The run-folder layouts: each named path is the root joined with its documented constant, a str root
is taken as a Path, and a layout cannot be re-rooted after it is made."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from runtime.layout import (ADAPTER_DIR, BEFORE_FILE, CACHE_FILE, CLASSIFIERS_DIR, CONFIG_FILE, DONE_FILE,
                            DOWNLOAD_FILE, EVAL_REPORT_FILE, EXPORT_DIR, HUB_DATA_DIR, IMAGES_DIR, JUDGE_CHECK_FILE,
                            JUDGE_CLASSIFIER, METADATA_FILE, METRICS_CSV_FILE, METRICS_FILE, MODEL_DIR,
                            PERCEPTION_FILE, RECORDS_DIR, REPORT_DIR, RESPONSES_FILE, RESULTS_FILE, REWARD_CLASSIFIER,
                            SELECTION_FILE, SUMMARY_FILE, SWEEP_DIR, SWEEP_FILE, TABLE_CSV_FILE, TENSORBOARD_DIR,
                            TRIALS_DIR, VALIDATION_EVAL_DIR, VALUE_HEAD_FILE, WORLD_FILE, DataLayout, EvalLayout,
                            RunLayout, StageLayout, REFERENCE_LOGPS_FILE, VALIDATION_FILE, REPORT_CSV_FILE,
                            STUDY_CSV_FILE, STUDY_FIGURE_FILE, STUDY_JSON_FILE, TIMING_FILE, ReportLayout,
                            StudyLayout)

ROOT = Path("r")
LAYOUTS = (StageLayout, DataLayout, EvalLayout, RunLayout, ReportLayout, StudyLayout)
# Every path attribute of each layout -> where it lies under the root.
NAMED = {
    StageLayout: {"config": CONFIG_FILE, "summary": SUMMARY_FILE, "before": BEFORE_FILE, "metrics": METRICS_FILE,
                  "tensorboard": TENSORBOARD_DIR, "checkpoints": "checkpoints", "adapter": ADAPTER_DIR, "model": MODEL_DIR,
                  "value_head": VALUE_HEAD_FILE, "sweep": SWEEP_FILE, "selection": SELECTION_FILE,
                  "validation_eval": VALIDATION_EVAL_DIR, "done": DONE_FILE, "validation": VALIDATION_FILE,
                  "reference_logps": REFERENCE_LOGPS_FILE},
    DataLayout: {"records_dir": RECORDS_DIR, "download": DOWNLOAD_FILE, "metadata": METADATA_FILE,
                 "perception": PERCEPTION_FILE, "world": WORLD_FILE, "images": IMAGES_DIR},
    EvalLayout: {"results": RESULTS_FILE, "responses": RESPONSES_FILE, "report": EVAL_REPORT_FILE,
                 "cache": CACHE_FILE, "metrics_csv": METRICS_CSV_FILE, "table_csv": TABLE_CSV_FILE,
                 "judge_check": JUDGE_CHECK_FILE, "hub_data": HUB_DATA_DIR},
    RunLayout: {"config": CONFIG_FILE, "classifiers": CLASSIFIERS_DIR, "report": REPORT_DIR, "export": EXPORT_DIR,
                "study": "study",
                "reward_classifier": Path(CLASSIFIERS_DIR, REWARD_CLASSIFIER),
                "judge_classifier": Path(CLASSIFIERS_DIR, JUDGE_CLASSIFIER), "base_model": Path("stage0", MODEL_DIR)},
    ReportLayout: {"results": RESULTS_FILE, "markdown": EVAL_REPORT_FILE, "csv": REPORT_CSV_FILE,
                   "study_json": STUDY_JSON_FILE, "study_csv": STUDY_CSV_FILE, "study_figure": STUDY_FIGURE_FILE,
                   "timing": TIMING_FILE},
    StudyLayout: {},
}


CASES = [(layout, attribute, under) for layout, named in NAMED.items() for attribute, under in named.items()]


@pytest.mark.parametrize("layout, attribute, under", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_each_named_path_is_the_root_joined_with_its_constant(layout, attribute, under):
    path = getattr(layout("r"), attribute)
    assert type(path) is type(ROOT) and path == ROOT / under


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda c: c.__name__)
def test_the_table_above_names_every_path_of_a_layout(layout):
    made = layout("r")
    paths = {name for name in dir(layout) if not name.startswith("_") and name != "root"
             and isinstance(getattr(made, name), Path)}
    assert paths == set(NAMED[layout])


def test_the_layouts_paths_with_arguments():
    run = RunLayout("r")
    assert StageLayout("r").sweep_trial("lr=1") == ROOT / SWEEP_DIR / "lr=1"
    assert StageLayout("r").trial("t0") == StageLayout(ROOT / TRIALS_DIR / "t0")
    assert StageLayout("r").trial("t0").summary == Path("r/trials/t0/summary.json")
    assert DataLayout("d").records("stage1") == Path("d") / RECORDS_DIR / "stage1.jsonl"
    assert StudyLayout("s").seed(3).evaluation("ppo", "x").results == Path("s/seed-3/eval_ppo/x/results.json")
    assert StudyLayout("s").report.timing == Path("s") / REPORT_DIR / TIMING_FILE
    assert ReportLayout("o").figure("heldout_concept") == Path("o/comparison_heldout_concept.png")
    assert run.stage("stage1") == StageLayout(ROOT / "stage1")
    assert run.adapter("stage2") == ROOT / "stage2" / ADAPTER_DIR
    assert RunLayout.eval_stage("ppo") == "eval_ppo"
    assert run.evaluation("ppo", "heldout_render") == EvalLayout(ROOT / "eval_ppo" / "heldout_render")
    assert run.evaluation("ppo", "heldout_render").results == Path("r/eval_ppo/heldout_render/results.json")
    assert isinstance(run.world_data, DataLayout)
    assert run.world_data.records("stage1") == Path("r/world/data/records/stage1.jsonl")
    assert run.data() == run.world_data
    assert run.data("elsewhere") == DataLayout(Path("elsewhere"))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda c: c.__name__)
def test_a_str_root_is_a_path_and_a_layout_is_frozen(layout):
    made = layout("some/root")
    assert isinstance(made.root, Path) and made.root == Path("some/root")
    assert made == layout(Path("some/root")) and hash(made) == hash(layout(Path("some/root")))
    assert repr(made) == f"{layout.__name__}(root={Path('some/root')!r})"
    assert [f.name for f in dataclasses.fields(made)] == ["root"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.root = Path("other")


def test_layouts_of_different_kinds_are_not_equal():
    assert StageLayout("r") != EvalLayout("r") and DataLayout("r") != RunLayout("r")
