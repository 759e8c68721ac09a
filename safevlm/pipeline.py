"""The end-to-end job behind `safevlm run CONFIG`: a list of stages, each skipped once done.

Why stages with markers: a run on 2 CPU cores (or 8 GPUs) must survive interruption. Each stage
writes its outputs into its own folder of the run directory and, last, a `DONE.json` marker; a
rerun skips every stage with a marker unless `--force`, and a stage that was interrupted resumes
from its last checkpoint, so an interrupted run continues where it stopped.

Order (tiny default): concept world -> response classifiers (reward + independent judge) -> stage 0
-> evaluate the base -> stage 1 -> stage 2 -> evaluate -> PPO / SFT / DPO on top of stage 2, each
evaluated -> one comparison report -> adapters exported. Every evaluation is on renders and whole
concepts held out of all safety training, judged by the judge classifier (never the PPO reward
classifier), with the reward classifier and a rule-based check reported beside it for agreement.

Which stages run depends on the config (`plan`): stage 0 pretrains the *tiny* models only (a real
checkpoint or a `shape:NAME` model is the base itself), and the world stage runs only when no
`data_dir` is given (your records and an UnsafeConcepts-layout folder take its place). Under
`torchrun` every process runs the plan: training and evaluation stages on all ranks (DeepSpeed,
sharded generation), the world, the classifiers, the report and the export on rank 0 while the
others wait; whether a stage is skipped is rank 0's decision, so the ranks never disagree.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import time
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from base_models.loading import SHAPE_PREFIX, TINY_SPECS
from base_models.shapes import SHAPES
from concept_world import WorldConfig
from concept_world.build import build_world
from eval.benchmarks.safe_images import load_safe_images
from eval.benchmarks.unsafeconcepts import load_unsafeconcepts, select_rows
from eval.core.items import DataError
from eval.core.models import GenerationSettings, load_runner
from eval.headline import CRITERION, pooled, concept_cells, read_evaluation, selection_score
from eval.pipeline import EvalConfig, run_unsafeconcepts
from response_classifier.train import ClassifierTrainConfig, build_default
from runtime import runlock
from runtime.distributed import setup, teardown
from runtime.layout import CLASSIFIERS_DIR, EVAL_PREFIX, EXPORT_DIR, REPORT_DIR, WORLD_STAGE, RunLayout
from safety_modules.config import SafetyConfig
from safety_modules.configio import ConfigError, load_config, replace_nested, to_dict
from safety_modules.fileio import read_json, write_json_atomic
from safevlm.selection import SelectionSection, nested, reused_value, select
from safevlm.summary import BASE_VARIANT, write_pipeline_report
from training.checkpoint import latest_checkpoint
from training.config import INIT_FROM_BASE_STAGE, ModelSpec, default_records
from training.recipes.registry import RECIPES, Recipe, exporting_adapters, recipe

logger = logging.getLogger(__name__)


@dataclass
class EvalSection:
    data: str = ""                      # UnsafeConcepts-layout folder; "": the run's data (data_dir or the world)
    splits: list[str] = field(default_factory=lambda: ["heldout_render", "heldout_concept"])
    greedy: bool = True                 # reproducible tables; the protocol's sampling with greedy: false
    max_new_tokens: int = 32            # the world's answers are one sentence
    batch_size: int = 16
    limit: int = 0                      # > 0: only the first N images per split (quick runs)
    protocol: Literal["measurement", "rlhf-test"] = "measurement"   # see eval.benchmarks.protocols
    safe_data: str = ""                 # safe-image folder (metadata.json + images); "": none, false refusal unmeasured


@dataclass
class RunKeys:
    """The keys of a run YAML besides the training methods' sections (PipelineConfig adds one per
    recipe of the registry: `stage0:`, `stage1:`, `stage2:`, `ppo:`, `sft:`, `dpo:`)."""

    run_dir: str = "checkpoints/tiny"
    seed: int = 0
    data_dir: str = ""                  # "": the concept world the world stage builds; else a folder in its
                                        # layout (records/<stage>.jsonl + UnsafeConcepts files), see README
    model: ModelSpec = field(default_factory=ModelSpec)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    classifier: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    selection: SelectionSection = field(default_factory=SelectionSection)

    @property
    def root(self) -> Path:
        return Path(self.run_dir)

    @property
    def layout(self) -> RunLayout:
        """Every path of the run folder."""
        return RunLayout(self.run_dir)

    @property
    def data_root(self) -> Path:
        """Where the stages' records are: `data_dir`, else the concept world."""
        return self.layout.data(self.data_dir).root

    @property
    def eval_data(self) -> Path:
        """The UnsafeConcepts-layout folder every evaluation reads."""
        return Path(self.eval.data) if self.eval.data else self.data_root

    @property
    def pretrains_base(self) -> bool:
        """Stage 0 runs for the tiny models only: they know nothing before it; a real base does."""
        return self.model.path in TINY_SPECS

    @property
    def base_model(self) -> str:
        """The model every adapter of the run sits on (and the one `eval_base` evaluates)."""
        return str(self.layout.base_model) if self.pretrains_base else self.model.path

    def section(self, method: str):
        """The run YAML's section of training method `method`."""
        return getattr(self, method)


# A run YAML: the run-wide keys plus one section per training method of the registry.
PipelineConfig = make_dataclass(
    "PipelineConfig", [(r.name, r.section_class, field(default_factory=r.section_class)) for r in RECIPES.values()],
    bases=(RunKeys,), namespace={"__module__": __name__, "__doc__": RunKeys.__doc__})


@dataclass
class Stage:
    name: str
    description: str
    fn: Callable[[PipelineConfig, Path], dict]
    main_only: bool = False             # under torchrun: rank 0 runs it, the other ranks wait
    wanted: Callable[[PipelineConfig], bool] = lambda cfg: True


# -- stage functions -------------------------------------------------------------------------------
def _world(cfg: PipelineConfig, out: Path) -> dict:
    world = cfg.layout.world_data.root
    if world.exists():
        shutil.rmtree(world)                  # a half-written world from an interrupted run
    return build_world(world, cfg.world, cfg.seed)


def _classifiers(cfg: PipelineConfig, out: Path) -> dict:
    reports = build_default(out, dataclasses.replace(cfg.classifier, seed=cfg.classifier.seed + cfg.seed),
                            device="cuda" if torch.cuda.is_available() else "cpu")
    return {name: {k: v for k, v in rep.items() if k != "errors"} for name, rep in reports.items()}


def records_file(cfg: PipelineConfig, stage: str) -> Path:
    """A training stage's records: its `data.train`, else `<data>/records/<stage>.jsonl`."""
    section = cfg.section(stage)
    return Path(section.data.train) if section.data.train else default_records(cfg.root, cfg.data_dir, stage)


def _recipe_config(cfg: PipelineConfig, stage: str):
    """The recipe config of a training stage of the run, writing into `<run_dir>/<stage>`, with its
    records file resolved (see `records_file`)."""
    section = cfg.section(stage)
    section = dataclasses.replace(section, data=dataclasses.replace(section.data, train=str(records_file(cfg, stage))))
    if hasattr(section, "eval_files") and not section.eval_files:
        # the head's accuracy on the evaluation splits, where the data has their records
        held = [default_records(cfg.root, cfg.data_dir, split) for split in cfg.eval.splits]
        section = dataclasses.replace(section, eval_files=[str(p) for p in held if p.is_file()])
    return recipe(stage).config_for_run(section, run_root=cfg.root, seed=cfg.seed, model=cfg.model,
                                        safety=cfg.safety)


def _train(method: Recipe, recipe_cfg, overrides: dict | None = None) -> dict:
    """Run the recipe (resuming an interrupted attempt in its folder)."""
    if overrides:
        recipe_cfg = replace_nested(recipe_cfg, overrides)
    resume = latest_checkpoint(Path(recipe_cfg.run_dir)) is not None      # an interrupted earlier attempt
    return method.run_function(recipe_cfg, resume=resume)


def _stage_runner(method: Recipe) -> Callable[[PipelineConfig, Path], dict]:
    """A training stage: the recipe once, or one trial per value of its selection grid, the best
    kept by its validation numbers (safevlm/selection.py)."""
    def run(cfg: PipelineConfig, out: Path) -> dict:
        recipe_cfg = _recipe_config(cfg, method.name)
        trials = cfg.selection.trials(method.name)
        if trials is None:
            return _train(method, recipe_cfg)
        ctx = setup()
        if cfg.selection.reuse:
            value = reused_value(cfg.selection.reuse, method.name, trials.key)
            summary = _train(method, recipe_cfg, nested(trials.key, value))
            table = {"stage": method.name, "key": trials.key, "chosen": value, "criterion": CRITERION,
                     "reused_from": str(RunLayout(cfg.selection.reuse).stage(method.name).selection)}
            if ctx.is_main:
                write_json_atomic(cfg.layout.stage(method.name).selection, table)
            return {**summary, "selection": table}
        def train(trial_dir: Path, overrides: dict) -> dict:
            return _train(method, recipe_cfg.for_trial(overrides, trial_dir))   # starts from this run's models

        def validate(adapter: Path, eval_dir: Path) -> dict:
            _evaluate_split(cfg, str(adapter), cfg.selection.split, eval_dir, tasks=VALIDATION_TASKS, ctx=ctx)
            ctx.barrier()                                  # rank 0 wrote the answers; every rank reads them
            records, labeler = read_evaluation(eval_dir)
            return pooled(concept_cells(records, labeler))

        return select(method.name, trials, out, train, validate, selection_score, CRITERION,
                      main=ctx.is_main, barrier=ctx.barrier)
    return run


# What a validation evaluation asks: the selection criterion's tasks (perception is not in it).
VALIDATION_TASKS = ("alignment", "text_alignment")


def _evaluate_split(cfg: PipelineConfig, adapter: str | None, split: str, out: Path,
                    tasks: tuple[str, ...] | None = None, ctx=None, protocol: str = "measurement",
                    safe_data: str | None = None) -> dict | None:
    """One UnsafeConcepts evaluation of the run's base (+ `adapter`) on `split` into `out`, judged by
    the judge classifier, with the reward classifier and the rule-based check beside it."""
    ctx = ctx or setup()
    runner = load_runner(cfg.base_model, adapter, device=ctx.device(), seed=cfg.model.seed,
                         image_preprocess=cfg.model.image_preprocess, conversation=cfg.model.conversation)
    ecfg = EvalConfig(generation=GenerationSettings(greedy=cfg.eval.greedy, max_new_tokens=cfg.eval.max_new_tokens,
                                                    seed=cfg.seed),
                      batch_size=cfg.eval.batch_size)
    return run_unsafeconcepts(runner, cfg.eval_data, out, split=split, protocol=protocol, safe_data=safe_data,
                              limit=cfg.eval.limit or None, tasks=tasks, classifier=cfg.layout.judge_classifier,
                              second_classifier=cfg.layout.reward_classifier, cfg=ecfg,
                              ctx=ctx if ctx.active else None)


def _evaluate(variant: str | None):
    """An evaluation stage of one model variant (None: the base; else a recipe's adapter) on every
    split of `eval.splits` (on the world: the held-out renders and concepts); under torchrun each
    rank answers its share of the items."""
    def run(cfg: PipelineConfig, out: Path) -> dict:
        adapter = None if variant is None else str(cfg.layout.adapter(variant))
        ctx = setup()
        summary = {"model": cfg.base_model, "adapter": adapter}
        for split in cfg.eval.splits:
            results = _evaluate_split(cfg, adapter, split, out / split, ctx=ctx, protocol=cfg.eval.protocol,
                                      safe_data=cfg.eval.safe_data or None)
            summary[split] = str(cfg.layout.evaluation(variant or BASE_VARIANT, split).results)
            summary[f"{split}_items"] = results["data"]["n_items"] if results else 0
        return summary
    return run


def _report(cfg: PipelineConfig, out: Path) -> dict:
    data = None if not cfg.data_dir and not cfg.eval.data else str(cfg.eval_data)    # None: the concept world
    return write_pipeline_report(cfg.root, out, cfg.eval.splits, data=data,
                                 base_name="base (stage 0)" if cfg.pretrains_base else "base")


def _export(cfg: PipelineConfig, out: Path) -> dict:
    """Copy every trained adapter into `<run_dir>/adapters/<stage>` (safetensors + configs only)."""
    exported = {}
    for stage in exporting_adapters():
        src = cfg.layout.adapter(stage)
        if src.is_dir():
            dst = out / stage
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst)
            exported[stage] = str(dst)
    return {"adapters": exported}


def _builds_world(cfg: PipelineConfig) -> bool:
    return not cfg.data_dir


def _pretrains_base(cfg: PipelineConfig) -> bool:
    return cfg.pretrains_base


def _stages() -> list[Stage]:
    """The whole plan, from the registry: the world and the classifiers; the recipes that pretrain
    the base, the base's evaluation; every other recipe, each followed by its evaluation when it has
    a row in the report; the report and the export."""
    methods = list(RECIPES.values())
    stages = [Stage(WORLD_STAGE, "build the concept world (images, metadata, records)", _world, main_only=True,
                    wanted=_builds_world),
              Stage(CLASSIFIERS_DIR, "train the reward and judge response classifiers", _classifiers, main_only=True)]
    stages += [Stage(m.name, m.help, _stage_runner(m), wanted=_pretrains_base) for m in methods if m.pretrains_base]
    stages.append(Stage(RunLayout.eval_stage(BASE_VARIANT), "evaluate the base", _evaluate(None)))
    for m in methods:
        if m.pretrains_base:
            continue
        stages.append(Stage(m.name, m.help, _stage_runner(m)))
        if m.report_name:
            stages.append(Stage(RunLayout.eval_stage(m.name), f"evaluate {m.report_name}", _evaluate(m.name)))
    return stages + [Stage(REPORT_DIR, "comparison report (Markdown, CSV, JSON, PNG)", _report, main_only=True),
                     Stage(EXPORT_DIR, "export the adapters", _export, main_only=True)]


STAGES: list[Stage] = _stages()


def plan(cfg: PipelineConfig) -> list[Stage]:
    """The stages this config runs, in order (see the module docstring)."""
    return [s for s in STAGES if s.wanted(cfg)]


def check_config(cfg: PipelineConfig, stages: list[Stage]) -> None:
    """Every mistake that can be seen before a stage runs, as a ConfigError naming the key: a model
    that cannot be loaded, `init_from: stage0` without stage 0, records or evaluation data that are
    missing (when no world stage will write them), an evaluation split the data does not have."""
    path = cfg.model.path
    if path.startswith(SHAPE_PREFIX):
        if path[len(SHAPE_PREFIX):] not in SHAPES:
            raise ConfigError(f"model.path: unknown shape {path!r}; known: {[SHAPE_PREFIX + k for k in sorted(SHAPES)]}")
    elif path not in TINY_SPECS and not Path(path).is_dir():
        raise ConfigError(f"model.path: {path!r} is not a local folder (save_pretrained layout), one of "
                          f"{sorted(TINY_SPECS)} or shape:NAME; nothing is downloaded, fetch checkpoints first")
    names = {s.name for s in stages}
    evaluates = any(s.name.startswith(EVAL_PREFIX) for s in stages)
    for stage in RECIPES:
        if stage not in names:
            continue
        section = cfg.section(stage)
        if getattr(section, "init_from", "") == INIT_FROM_BASE_STAGE and INIT_FROM_BASE_STAGE not in names:
            raise ConfigError(f"{stage}.init_from: {INIT_FROM_BASE_STAGE!r} names the tiny model's pretraining, which "
                              f"does not run for model.path={path!r}; leave init_from empty (the base is model.path)")
        records = records_file(cfg, stage)
        if WORLD_STAGE not in names and not records.is_file():
            key = f"{stage}.data.train" if section.data.train else "data_dir"
            raise ConfigError(f"{key}: {stage} records {str(records)!r} not found (format: README, 'Data formats'; "
                              "records/<stage>.jsonl under data_dir, or the stage's data.train)")
    _check_selection(cfg, names)
    if WORLD_STAGE not in names and cfg.eval.splits and evaluates:
        key = "eval.data" if cfg.eval.data else "data_dir"
        try:
            data = load_unsafeconcepts(cfg.eval_data)
            for split in cfg.eval.splits:
                select_rows(data, split)
        except (DataError, FileNotFoundError) as exc:
            raise ConfigError(f"{key}: evaluation data {str(cfg.eval_data)!r}: {exc}") from None
    if evaluates:
        if cfg.eval.protocol == "rlhf-test" and not cfg.eval.safe_data:
            raise ConfigError("eval.safe_data: the rlhf-test protocol needs the safe-image folder (metadata.json + images)")
        if cfg.eval.safe_data:
            try:
                load_safe_images(cfg.eval.safe_data)
            except DataError as exc:
                raise ConfigError(f"eval.safe_data: {exc}") from None


def _check_selection(cfg: PipelineConfig, names: set[str]) -> None:
    """Selection needs a validation split that no reported split overlaps, and a readable `reuse`."""
    sel = cfg.selection
    selected = [stage for stage in names if sel.trials(stage) is not None]
    if not selected:
        return
    if sel.split in cfg.eval.splits:
        raise ConfigError(f"selection.split: {sel.split!r} is also in eval.splits; hyperparameters must be chosen "
                          "on a split that is never reported")
    if sel.reuse:
        if not Path(sel.reuse).is_dir():
            raise ConfigError(f"selection.reuse: {sel.reuse!r} is not a run folder")
        return
    if WORLD_STAGE in names:
        w = cfg.world
        if sel.split != "validation" or not (w.validation_unsafe or w.validation_safe or w.validation_render_fraction):
            raise ConfigError(f"selection.split: the concept world has no {sel.split!r} split to choose "
                              f"{sorted(selected)} on; set world.validation_unsafe / validation_safe / "
                              "validation_render_fraction, or selection.split='' to train each stage once")
        return
    try:
        select_rows(load_unsafeconcepts(cfg.eval_data), sel.split)
    except (DataError, FileNotFoundError) as exc:
        raise ConfigError(f"selection.split: {exc}") from None


def load_pipeline_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)


def _release_memory() -> None:
    """Free a finished stage's model and optimizer before the next one loads its own (on GPU a
    7B model per stage would not fit twice)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_pipeline(cfg: PipelineConfig, force: bool = False, only: list[str] | None = None,
                 log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Run every stage of the plan not yet done (all with `force`); returns each stage's summary
    (on rank 0; the other ranks of a torchrun get only what they ran). Progress goes to `log`
    (default: this module's logger at INFO)."""
    planned = plan(cfg)
    known = [s.name for s in planned]
    if only and not set(only) <= set(known):
        raise ConfigError(f"--only: unknown stage(s) {sorted(set(only) - set(known))}; stages of this config: {known}")
    check_config(cfg, planned)
    # Under torchrun the process group (DeepSpeed's, which the training stages share), else a
    # context of one process (the training stages make their own group of one).
    ctx = setup()
    say = (log or logger.info) if ctx.is_main else (lambda message: None)
    run_dir = cfg.root
    lock = runlock.acquire(run_dir) if ctx.is_main else None    # one run per run folder
    if ctx.is_main:
        write_json_atomic(cfg.layout.config, to_dict(cfg))
    summaries: dict[str, dict] = {}
    stages = [s for s in planned if only is None or s.name in only]
    started = time.time()
    for index, stage in enumerate(stages, 1):
        out = cfg.layout.stage(stage.name).root
        marker = cfg.layout.stage(stage.name).done
        prefix = f"[{index}/{len(stages)}] {stage.name}"
        done = ctx.gather(marker.is_file() and not force)[0]     # rank 0 decides for everyone
        if done:
            summaries[stage.name] = read_json(marker, "stage marker (delete it to rerun the stage)")
            say(f"{prefix}: done already, skipped ({marker})")
            continue
        say(f"{prefix}: {stage.description} ...")
        out.mkdir(parents=True, exist_ok=True)
        start = time.time()
        summary = stage.fn(cfg, out) if ctx.is_main or not stage.main_only else {}
        _release_memory()
        if ctx.is_main:
            summary["seconds"] = round(time.time() - start, 2)
            write_json_atomic(marker, summary, default=str)
            summaries[stage.name] = summary
        ctx.barrier()
        say(f"{prefix}: finished in {round(time.time() - start, 2)} s (run so far {time.time() - started:.0f} s)")
    teardown()
    if lock is not None:
        lock.release()
    return summaries
