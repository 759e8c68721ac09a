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

# -- one training run ------------------------------------------------------------------------------
CONFIG_FILE = "config.json"            # the resolved config a run was started with
SUMMARY_FILE = "summary.json"          # what a finished training run reports
BEFORE_FILE = "before.json"            # metrics of the untrained model (a resumed run reports the true start)
METRICS_FILE = "metrics.jsonl"         # one line per logged optimizer step
TENSORBOARD_DIR = "tensorboard"
ADAPTER_DIR = "adapter"                # safety modules (+ LoRA) as an adapter folder
MODEL_DIR = "model"                    # a whole model (stage 0 of the tiny default)
VALUE_HEAD_FILE = "value_head.safetensors"   # PPO's critic, kept out of the adapter
SWEEP_DIR = "sweep"                    # one sub-folder per grid point of a baseline's --sweep
SWEEP_FILE = "sweep.json"
SELECTION_FILE = "selection.json"      # the pipeline's choice on the validation split, every trial's score
TRIALS_DIR = "trials"                  # one sub-folder per selection trial
VALIDATION_EVAL_DIR = "eval_validation"   # a trial's evaluation on the validation split

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


@dataclass(frozen=True)
class StageLayout:
    """The folder of one training run."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def before(self) -> Path:
        return self.root / BEFORE_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER_DIR

    @property
    def model(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def value_head(self) -> Path:
        return self.root / VALUE_HEAD_FILE

    @property
    def sweep(self) -> Path:
        return self.root / SWEEP_FILE

    def sweep_trial(self, name: str) -> Path:
        return self.root / SWEEP_DIR / name

    @property
    def selection(self) -> Path:
        return self.root / SELECTION_FILE

    def trial(self, name: str) -> "StageLayout":
        return StageLayout(self.root / TRIALS_DIR / name)

    @property
    def validation_eval(self) -> Path:
        return self.root / VALIDATION_EVAL_DIR

    @property
    def done(self) -> Path:
        return self.root / DONE_FILE


@dataclass(frozen=True)
class DataLayout:
    """A data folder: UnsafeConcepts-layout files plus `records/<stage>.jsonl`."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def records(self, name: str) -> Path:
        """The records file of a stage or split (`records/<name>.jsonl`)."""
        return self.root / RECORDS_DIR / f"{name}.jsonl"

    @property
    def records_dir(self) -> Path:
        return self.root / RECORDS_DIR

    @property
    def download(self) -> Path:
        return self.root / DOWNLOAD_FILE

    @property
    def metadata(self) -> Path:
        return self.root / METADATA_FILE

    @property
    def perception(self) -> Path:
        return self.root / PERCEPTION_FILE

    @property
    def world(self) -> Path:
        return self.root / WORLD_FILE

    @property
    def images(self) -> Path:
        return self.root / IMAGES_DIR


@dataclass(frozen=True)
class EvalLayout:
    """The output folder of one evaluation."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def results(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def responses(self) -> Path:
        return self.root / RESPONSES_FILE

    @property
    def report(self) -> Path:
        return self.root / EVAL_REPORT_FILE

    @property
    def cache(self) -> Path:
        return self.root / CACHE_FILE

    @property
    def metrics_csv(self) -> Path:
        return self.root / METRICS_CSV_FILE

    @property
    def table_csv(self) -> Path:
        return self.root / TABLE_CSV_FILE

    @property
    def judge_check(self) -> Path:
        return self.root / JUDGE_CHECK_FILE

    @property
    def hub_data(self) -> Path:
        return self.root / HUB_DATA_DIR


@dataclass(frozen=True)
class RunLayout:
    """A `safevlm run` folder (`run_dir` of a run YAML)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

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
    def classifiers(self) -> Path:
        return self.root / CLASSIFIERS_DIR

    @property
    def reward_classifier(self) -> Path:
        return self.classifiers / REWARD_CLASSIFIER

    @property
    def judge_classifier(self) -> Path:
        return self.classifiers / JUDGE_CLASSIFIER

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

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIR

    @property
    def export(self) -> Path:
        return self.root / EXPORT_DIR
