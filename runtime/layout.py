"""Every path of a run folder, named once (as PEFT names its files with constants).

Three folders have a layout of their own:
- `RunLayout`: a `safevlm run` folder: one sub-folder per stage (`<root>/<stage>`), the concept
  world, the response classifiers, the evaluations, the report and the exported adapters;
- `StageLayout`: one training run's folder (a stage of the pipeline, or `safevlm train/sft/dpo/ppo`
  on its own): its config, summary, metrics, adapter or model, checkpoints, sweep and selection;
- `EvalLayout`: one evaluation's output folder (results, responses, report, cache);
- `DataLayout`: a data folder in the UnsafeConcepts layout with the training records beside it
  (`data_dir`, or the concept world the pipeline builds).

Nothing else spells these names: a reader who wants to know where something is written looks here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import overload

# -- one training run ------------------------------------------------------------------------------
CONFIG_FILE = "config.json"            # the resolved config a run was started with
SUMMARY_FILE = "summary.json"          # what a finished training run reports
BEFORE_FILE = "before.json"            # metrics of the untrained model (a resumed run reports the true start)
METRICS_FILE = "metrics.jsonl"         # one line per logged optimizer step
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"        # the engine's resumable checkpoints (training/checkpoint.py names what is inside)
ADAPTER_DIR = "adapter"                # safety modules (+ LoRA) as an adapter folder
MODEL_DIR = "model"                    # a whole model (stage 0 of the tiny default)
VALUE_HEAD_FILE = "value_head.safetensors"   # PPO's critic, kept out of the adapter
SWEEP_DIR = "sweep"                    # one sub-folder per grid point of a baseline's --sweep
SWEEP_FILE = "sweep.json"
SELECTION_FILE = "selection.json"      # the pipeline's choice on the validation split, every trial's score
TRIALS_DIR = "trials"                  # one sub-folder per selection trial
VALIDATION_EVAL_DIR = "eval_validation"   # a trial's evaluation on the validation split
VALIDATION_FILE = "validation.json"    # a trial's validation numbers (the selection criterion's inputs)
REFERENCE_LOGPS_FILE = "reference_logps.safetensors"   # DPO's reference log-probabilities, computed once

# -- a pipeline run --------------------------------------------------------------------------------
DONE_FILE = "DONE.json"                # a finished stage's marker (and its summary)
WORLD_STAGE = "world"
WORLD_DATA_DIR = "data"
CLASSIFIERS_DIR = "classifiers"
REWARD_CLASSIFIER = "reward"           # PPO's reward
JUDGE_CLASSIFIER = "judge"             # the evaluation's judge, trained independently of the reward
REPORT_DIR = "report"
EXPORT_DIR = "adapters"                # every trained adapter, copied for shipping
EVAL_PREFIX = "eval_"                  # eval_<variant>: one evaluation stage per model variant

# -- one evaluation --------------------------------------------------------------------------------
RESULTS_FILE = "results.json"
RESPONSES_FILE = "responses.jsonl"
EVAL_REPORT_FILE = "report.md"
CACHE_FILE = "cache.sqlite"
METRICS_CSV_FILE = "metrics.csv"       # every number of results.json's metrics, one key,value row each
TABLE_CSV_FILE = "table.csv"           # the report's tables
JUDGE_CHECK_FILE = "judge_check.jsonl"   # the labelled answers the labellers were scored on
CATEGORY_PLOT_FILE = "per_category_accuracy.png"
MODALITY_GAP_PLOT_FILE = "modality_gap.png"
RTVLM_PLOT_FILE = "rtvlm_subtasks.png"
MME_PLOT_FILE = "mme.png"
HUB_DATA_DIR = "hub_data"              # the gated hub data set, downloaded as a data folder

# -- a comparison report (a run's `report` stage, a study's report) --------------------------------
REPORT_CSV_FILE = "report.csv"
COMPARISON_FIGURE_PREFIX = "comparison_"   # comparison_<split>.png: one bar chart per split
STUDY_JSON_FILE = "study.json"
STUDY_CSV_FILE = "study.csv"
STUDY_FIGURE_FILE = "study.png"
TIMING_FILE = "timing.json"            # the study's seconds, in total and per seed

# -- a study (`safevlm study`: the whole run once per seed, one report with intervals) -------------
SEED_DIR_PREFIX = "seed-"              # seed-<s>: one run folder per seed
STUDY_DIR = "study"                    # a study's default folder, inside the run folder of its config

# -- several evaluations side by side (`safevlm report --runs ... --out DIR`) -----------------------
COMPARISON_JSON_FILE = "summary.json"
COMPARISON_CSV_FILE = "summary.csv"
COMPARISON_MARKDOWN_FILE = "summary.md"
COMPARISON_FIGURE_FILE = "summary.png"

# -- a data folder ---------------------------------------------------------------------------------
RECORDS_DIR = "records"
DOWNLOAD_FILE = "download.json"                        # a complete hub download (written last)
METADATA_FILE = "metadata.jsonl"                       # UnsafeConcepts rows
PERCEPTION_FILE = "perception_metadata.jsonl"          # perception questions with their options
WORLD_FILE = "world.json"                              # how the concept world was built
IMAGES_DIR = "images"                                  # the concept world's renders


class _Under:
    """A path under a layout's root, named once as a class attribute (`summary = _Under(SUMMARY_FILE)`)."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    @overload
    def __get__(self, layout: None, owner: type) -> _Under: ...
    @overload
    def __get__(self, layout: _Layout, owner: type) -> Path: ...
    def __get__(self, layout: _Layout | None, owner: type) -> _Under | Path:
        return self if layout is None else layout.root.joinpath(*self.parts)


@dataclass(frozen=True)
class _Layout:
    """A folder whose paths are named under `root` (given as a str or a Path, kept as a Path)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))


@dataclass(frozen=True)
class StageLayout(_Layout):
    """The folder of one training run."""

    config = _Under(CONFIG_FILE)
    summary = _Under(SUMMARY_FILE)
    before = _Under(BEFORE_FILE)
    metrics = _Under(METRICS_FILE)
    tensorboard = _Under(TENSORBOARD_DIR)
    checkpoints = _Under(CHECKPOINTS_DIR)
    adapter = _Under(ADAPTER_DIR)
    model = _Under(MODEL_DIR)
    value_head = _Under(VALUE_HEAD_FILE)
    sweep = _Under(SWEEP_FILE)
    selection = _Under(SELECTION_FILE)
    validation_eval = _Under(VALIDATION_EVAL_DIR)
    validation = _Under(VALIDATION_FILE)
    reference_logps = _Under(REFERENCE_LOGPS_FILE)
    done = _Under(DONE_FILE)

    def sweep_trial(self, name: str) -> Path:
        return self.root / SWEEP_DIR / name

    def trial(self, name: str) -> StageLayout:
        return StageLayout(self.root / TRIALS_DIR / name)


@dataclass(frozen=True)
class DataLayout(_Layout):
    """A data folder: UnsafeConcepts-layout files plus `records/<stage>.jsonl`."""

    records_dir = _Under(RECORDS_DIR)
    download = _Under(DOWNLOAD_FILE)
    metadata = _Under(METADATA_FILE)
    perception = _Under(PERCEPTION_FILE)
    world = _Under(WORLD_FILE)
    images = _Under(IMAGES_DIR)

    def records(self, name: str) -> Path:
        """The records file of a stage or split (`records/<name>.jsonl`)."""
        return self.root / RECORDS_DIR / f"{name}.jsonl"


@dataclass(frozen=True)
class EvalLayout(_Layout):
    """The output folder of one evaluation."""

    results = _Under(RESULTS_FILE)
    responses = _Under(RESPONSES_FILE)
    report = _Under(EVAL_REPORT_FILE)
    cache = _Under(CACHE_FILE)
    metrics_csv = _Under(METRICS_CSV_FILE)
    table_csv = _Under(TABLE_CSV_FILE)
    judge_check = _Under(JUDGE_CHECK_FILE)
    hub_data = _Under(HUB_DATA_DIR)


@dataclass(frozen=True)
class RunLayout(_Layout):
    """A `safevlm run` folder (`run_dir` of a run YAML)."""

    config = _Under(CONFIG_FILE)
    classifiers = _Under(CLASSIFIERS_DIR)
    reward_classifier = _Under(CLASSIFIERS_DIR, REWARD_CLASSIFIER)
    judge_classifier = _Under(CLASSIFIERS_DIR, JUDGE_CLASSIFIER)
    report = _Under(REPORT_DIR)
    export = _Under(EXPORT_DIR)
    study = _Under(STUDY_DIR)

    def stage(self, name: str) -> StageLayout:
        """The folder of stage `name` (a training stage, an evaluation, the world, ...)."""
        return StageLayout(self.root / name)

    def adapter(self, stage: str) -> Path:
        return self.stage(stage).adapter

    @property
    def world_data(self) -> DataLayout:
        """The concept world the world stage builds."""
        return DataLayout(self.root / WORLD_STAGE / WORLD_DATA_DIR)

    def data(self, data_dir: str | Path = "") -> DataLayout:
        """The run's data: `data_dir` when given, else the concept world."""
        return DataLayout(Path(data_dir)) if data_dir else self.world_data

    @property
    def base_model(self) -> Path:
        """The tiny base that stage 0 pretrains (the base of every adapter of a tiny run)."""
        return self.stage("stage0").model

    @staticmethod
    def eval_stage(variant: str) -> str:
        """The name of the evaluation stage of a model variant (`eval_<variant>`)."""
        return f"{EVAL_PREFIX}{variant}"

    def evaluation(self, variant: str, split: str) -> EvalLayout:
        """The evaluation of `variant` (base, stage2, ppo, ...) on `split`."""
        return EvalLayout(self.root / self.eval_stage(variant) / split)


@dataclass(frozen=True)
class ReportLayout(_Layout):
    """A comparison report's folder: a run's `report` stage, or a study's report."""

    results = _Under(RESULTS_FILE)
    markdown = _Under(EVAL_REPORT_FILE)
    csv = _Under(REPORT_CSV_FILE)
    study_json = _Under(STUDY_JSON_FILE)
    study_csv = _Under(STUDY_CSV_FILE)
    study_figure = _Under(STUDY_FIGURE_FILE)
    timing = _Under(TIMING_FILE)

    @staticmethod
    def figure_name(split: str) -> str:
        """The file name of a split's bar chart (the Markdown links it by name)."""
        return f"{COMPARISON_FIGURE_PREFIX}{split}.png"

    def figure(self, split: str) -> Path:
        return self.root / self.figure_name(split)


@dataclass(frozen=True)
class StudyLayout(_Layout):
    """A `safevlm study` folder: one run folder per seed and the study's report."""

    @property
    def report(self) -> ReportLayout:
        return ReportLayout(self.root / REPORT_DIR)

    def seed(self, seed: int) -> RunLayout:
        """The run folder of one seed (`seed-<s>`)."""
        return RunLayout(self.root / f"{SEED_DIR_PREFIX}{seed}")
