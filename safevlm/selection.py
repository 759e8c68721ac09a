"""Hyperparameter selection on the validation split, with one criterion fixed before any trial.

Why here and not in a recipe: choosing stage 2's length or a method's learning rate needs a full
evaluation of each trial on data held out of training, and the pipeline is the layer that owns
both the recipes and the evaluations. Every selectable stage is treated alike: the trials of its
`selection.<stage>` grid are trained into `<stage>/trials/<key>=<value>/`, each is evaluated on the
validation split, the best by `eval.headline.selection_score` (ties: the earlier value in the
list) becomes the stage's result, and `<stage>/selection.json` records the table. The reported
splits are never read while choosing. PPO, SFT and DPO must be given the same number of trials.
With `reuse`, the values chosen in another run folder are trained once instead (a study chooses on
its first seed's validation split, whose concepts no seed reports).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Callable

from runtime.layout import (ADAPTER_DIR, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, SWEEP_FILE, RunLayout,
                            StageLayout)
from safety_modules.configio import ConfigError
from safety_modules.fileio import read_json, write_json_atomic
from training.recipes.registry import names

EQUAL_BUDGET = names(on_top=True)          # the methods compared: the same number of trials each
SELECTABLE = names(selectable=True)
KEPT = (ADAPTER_DIR, SUMMARY_FILE, CONFIG_FILE, METRICS_FILE, SWEEP_FILE)   # copied from the best trial


@dataclass
class Trials:
    """The values one key of a stage's section is tried with (e.g. key train.lr, three rates)."""

    key: str = ""
    values: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if bool(self.key) != bool(self.values):
            raise ConfigError("key/values: give both (a dotted key of the stage's section and the values to try) "
                              "or neither")
        if len(set(map(str, self.values))) != len(self.values):
            raise ConfigError(f"values: {self.values} repeats a value")


@dataclass
class SelectionKeys:
    """`selection:` of a run YAML, besides one `Trials` per selectable recipe (SelectionSection).
    `split: ""` turns selection off (each stage trains once)."""

    split: str = "validation"
    reuse: str = ""                     # a run folder whose <stage>/selection.json choices are reused

    def __post_init__(self) -> None:
        budgets = {name: len(getattr(self, name).values) for name in EQUAL_BUDGET}
        if len(set(budgets.values())) > 1:
            raise ConfigError(f"selection: {', '.join(EQUAL_BUDGET)} must each get the same number of trials (a "
                              f"fair comparison), got {budgets}")

    def trials(self, stage: str) -> Trials | None:
        """The grid of `stage`, None when it is trained once with its own settings."""
        grid = getattr(self, stage, None) if stage in SELECTABLE else None
        return grid if self.split and grid is not None and grid.values else None


# One grid per selectable recipe of the registry (`selection.stage2`, `selection.ppo`, ...).
SelectionSection = make_dataclass("SelectionSection", [(name, Trials, field(default_factory=Trials)) for name in SELECTABLE],
                                  bases=(SelectionKeys,), namespace={"__module__": __name__})


def trial_name(key: str, value: Any) -> str:
    return f"{key}={value}"


def nested(key: str, value: Any) -> dict[str, Any]:
    """"train.lr", 1e-4 -> {"train": {"lr": 1e-4}} (an override of a config section)."""
    out: dict[str, Any] = {}
    node = out
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


def _keep(src: Path, dst: Path) -> None:
    """Copy the kept outputs of the chosen trial into the stage folder (replacing earlier ones)."""
    for name in KEPT:
        source, target = src / name, dst / name
        if not source.exists():
            continue
        if target.is_dir():
            shutil.rmtree(target)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)


def reused_value(run_dir: str | Path, stage: str, key: str) -> Any:
    """The value chosen for `stage` in an earlier run folder (a ConfigError naming `selection.reuse`)."""
    path = RunLayout(run_dir).stage(stage).selection
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
        chosen = table["chosen"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"selection.reuse: cannot read the choice of {stage} from {path} ({exc})") from None
    if table.get("key") != key:
        raise ConfigError(f"selection.reuse: {path} chose {table.get('key')!r}, this config tries {key!r}")
    return chosen


def read_tables(run_dir: str | Path) -> dict[str, dict]:
    """stage -> its `selection.json` table, for the stages of a run folder that chose a value."""
    paths = {stage: RunLayout(run_dir).stage(stage).selection for stage in SELECTABLE}
    return {stage: read_json(path, "selection table") for stage, path in paths.items() if path.is_file()}


def select(stage: str, trials: Trials, out: Path,
           train: Callable[[Path, dict[str, Any]], dict],
           validate: Callable[[Path, Path], dict[str, float | None]],
           score: Callable[[dict[str, float | None]], float], criterion: str,
           main: bool = True, barrier: Callable[[], None] = lambda: None) -> dict:
    """Train and validate every trial of `trials`, keep the best in `out`; returns the stage summary.

    `train(trial_dir, overrides)` trains into `trial_dir` with the nested section overrides of the trial (its adapter in `trial_dir/adapter`);
    `validate(adapter_dir, eval_dir)` returns the validation numbers of that adapter; `score`
    turns them into the criterion (higher is better), which `criterion` describes. A finished trial (summary.json and validation
    numbers present) is read back, so an interrupted selection continues. Under torchrun every
    rank trains and validates (sharded); only the `main` one writes, and `barrier` syncs the others.
    """
    layout = StageLayout(out)
    rows = []
    for value in trials.values:
        trial = layout.trial(trial_name(trials.key, value))
        if trial.validation.is_file() and trial.summary.is_file():
            numbers = json.loads(trial.validation.read_text(encoding="utf-8"))
        else:
            train(trial.root, nested(trials.key, value))
            numbers = validate(trial.adapter, trial.validation_eval)
            if main:
                write_json_atomic(trial.validation, numbers)
        rows.append({"value": value, "run_dir": str(trial.root), "validation": numbers, "score": score(numbers)})
    best = max(rows, key=lambda row: (row["score"], -rows.index(row)))
    table = {"stage": stage, "key": trials.key, "chosen": best["value"], "criterion": criterion,
             "trials": rows}
    if main:
        _keep(Path(best["run_dir"]), out)
        write_json_atomic(layout.selection, table)
    barrier()
    summary = json.loads(layout.summary.read_text(encoding="utf-8"))
    summary["selection"] = {"key": trials.key, "chosen": best["value"], "file": str(layout.selection)}
    return summary
