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
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from eval.headline import CRITERION, pooled, concept_cells, read_evaluation, selection_score
from safety_modules.config import SafetyConfig
from safety_modules.configio import ConfigError, load_config, merge, to_dict
from safety_modules.fileio import read_json, write_json_atomic
from safevlm.selection import SELECTION_FILE, SelectionSection, nested, reused_value, select
from runtime import runlock
from response_classifier.train import ClassifierTrainConfig
from training.config import (ModelSpec, Stage0Section, Stage1Section, Stage2Section, data_root,
                             default_records, stage_config)
from training.recipes.dpo import DPOConfig, DPOSection
from training.recipes.ppo import PPOConfig, PPOSection
from training.recipes.sft import SFTConfig, SFTSection

# Recipes on top of stage 2, and their full config classes (built from a section by baseline_config).
ON_TOP = {"ppo": PPOConfig, "sft": SFTConfig, "dpo": DPOConfig}


@dataclass
class WorldSection:
    """Arguments of `concept_world.build.build_world` (see `safevlm world build --help`)."""

    concepts: int = 18
    images_per_concept: int = 12
    size: int = 32
    heldout_render_fraction: float = 0.25
    heldout_unsafe: int | None = None  # categories that lose one concept to heldout_concept (None: up to 3)
    heldout_safe: int | None = None
    validation_unsafe: int = 0         # categories that lose one concept to the validation split
    validation_safe: int = 0
    validation_render_fraction: float = 0.0
    questions_per_image: int = 2
    perception_per_image: int = 2
    metadata: str | None = None        # UnsafeConcepts metadata.jsonl for names; None: ../shared if present


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
class PipelineConfig:
    run_dir: str = "checkpoints/tiny"
    seed: int = 0
    data_dir: str = ""                  # "": the concept world the world stage builds; else a folder in its
                                        # layout (records/<stage>.jsonl + UnsafeConcepts files), see README
    model: ModelSpec = field(default_factory=ModelSpec)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    world: WorldSection = field(default_factory=WorldSection)
    classifier: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
    stage0: Stage0Section = field(default_factory=Stage0Section)
    stage1: Stage1Section = field(default_factory=Stage1Section)
    stage2: Stage2Section = field(default_factory=Stage2Section)
    ppo: PPOSection = field(default_factory=PPOSection)
    sft: SFTSection = field(default_factory=SFTSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    eval: EvalSection = field(default_factory=EvalSection)
    selection: SelectionSection = field(default_factory=SelectionSection)

    @property
    def root(self) -> Path:
        return Path(self.run_dir)

    @property
    def data_root(self) -> Path:
        """Where the stages' records are: `data_dir`, else the concept world."""
        return data_root(self.root, self.data_dir)

    @property
    def eval_data(self) -> Path:
        """The UnsafeConcepts-layout folder every evaluation reads."""
        return Path(self.eval.data) if self.eval.data else self.data_root

    @property
    def pretrains_base(self) -> bool:
        """Stage 0 runs for the tiny models only: they know nothing before it; a real base does."""
        from base_models.loading import TINY_SPECS
        return self.model.path in TINY_SPECS

    @property
    def base_model(self) -> str:
        """The model every adapter of the run sits on (and the one `eval_base` evaluates)."""
        return str(self.root / "stage0" / "model") if self.pretrains_base else self.model.path


@dataclass
class Stage:
    name: str
    description: str
    fn: Callable[[PipelineConfig, Path], dict]
    main_only: bool = False             # under torchrun: rank 0 runs it, the other ranks wait
    wanted: Callable[[PipelineConfig], bool] = lambda cfg: True


# -- stage functions -------------------------------------------------------------------------------
def _world(cfg: PipelineConfig, out: Path) -> dict:
    from concept_world import WorldConfig
    from concept_world.build import build_world
    if (out / "data").exists():
        shutil.rmtree(out / "data")           # a half-written world from an interrupted run
    return build_world(out / "data", WorldConfig(**dataclasses.asdict(cfg.world)), cfg.seed)


def _classifiers(cfg: PipelineConfig, out: Path) -> dict:
    import torch
    from response_classifier.train import build_default
    reports = build_default(out, dataclasses.replace(cfg.classifier, seed=cfg.classifier.seed + cfg.seed),
                            device="cuda" if torch.cuda.is_available() else "cpu")
    return {name: {k: v for k, v in rep.items() if k != "errors"} for name, rep in reports.items()}


def records_file(cfg: PipelineConfig, stage: str) -> Path:
    """A training stage's records: its `data.train`, else `<data>/records/<stage>.jsonl`."""
    section = getattr(cfg, stage)
    return Path(section.data.train) if section.data.train else default_records(cfg.root, cfg.data_dir, stage)


def _with_records(section, stage: str, cfg: PipelineConfig):
    """The stage section with its records file resolved (see `records_file`)."""
    data = dataclasses.replace(section.data, train=str(records_file(cfg, stage)))
    return dataclasses.replace(section, data=data)


def _recipe_config(cfg: PipelineConfig, stage: str):
    """The recipe config of a training stage of the run, writing into `<run_dir>/<stage>`."""
    section = _with_records(getattr(cfg, stage), stage, cfg)
    if stage == "stage1" and not section.eval_files:
        # the head's accuracy on the evaluation splits, where the data has their records
        held = [default_records(cfg.root, cfg.data_dir, split) for split in cfg.eval.splits]
        section = dataclasses.replace(section, eval_files=[str(p) for p in held if p.is_file()])
    if stage in ON_TOP:
        from training.recipes.baselines import baseline_config
        return baseline_config(ON_TOP[stage], section, run_dir=cfg.root / stage, seed=cfg.seed, model=cfg.model)
    return stage_config(stage, section, run_dir=cfg.root, seed=cfg.seed, model=cfg.model, safety=cfg.safety)


def _pinned_inputs(stage: str, recipe_cfg) -> dict:
    """The recipe's starting model and adapter as absolute settings, so a trial trained in another
    folder starts from this run's models (their defaults are relative to `run_dir`)."""
    from training.config import resolve_adapter_path, resolve_base_path
    from training.recipes.baselines import baseline_base, stage2_adapter_path
    if stage in ON_TOP:
        pinned = {"adapter": str(stage2_adapter_path(recipe_cfg)),
                  "init_from": baseline_base(recipe_cfg).path if recipe_cfg.init_from else ""}
        if stage == "ppo":
            from training.recipes.ppo import classifier_path
            pinned["classifier"] = str(classifier_path(recipe_cfg))
        return pinned
    return {"adapter": str(resolve_adapter_path(recipe_cfg)), "init_from": resolve_base_path(recipe_cfg)}


def _train(stage: str, recipe_cfg, overrides: dict | None = None) -> dict:
    """Run the recipe of `stage` (resuming an interrupted attempt in its folder)."""
    import importlib
    from training.checkpoint import latest_checkpoint
    from training.recipes import RECIPES
    from training.recipes.baselines import with_overrides
    if overrides:
        recipe_cfg = with_overrides(recipe_cfg, overrides)
    module, fn = RECIPES[stage].split(":")
    resume = latest_checkpoint(Path(recipe_cfg.run_dir)) is not None      # an interrupted earlier attempt
    return getattr(importlib.import_module(module), fn)(recipe_cfg, resume=resume)


def _stage_runner(stage: str) -> Callable[[PipelineConfig, Path], dict]:
    def run(cfg: PipelineConfig, out: Path) -> dict:
        from runtime.distributed import setup
        recipe_cfg = _recipe_config(cfg, stage)
        trials = cfg.selection.trials(stage)
        if trials is None:
            return _train(stage, recipe_cfg)
        ctx = setup()
        if cfg.selection.reuse:
            value = reused_value(cfg.selection.reuse, stage, trials.key)
            summary = _train(stage, recipe_cfg, nested(trials.key, value))
            table = {"stage": stage, "key": trials.key, "chosen": value, "criterion": CRITERION,
                     "reused_from": str(Path(cfg.selection.reuse) / stage / SELECTION_FILE)}
            if ctx.is_main:
                write_json_atomic(out / SELECTION_FILE, table)
            return {**summary, "selection": table}
        pinned = _pinned_inputs(stage, recipe_cfg)

        def train(trial_dir: Path, overrides: dict) -> dict:
            return _train(stage, recipe_cfg, merge(merge(pinned, overrides), {"run_dir": str(trial_dir)}))

        def validate(adapter: Path, eval_dir: Path) -> dict:
            _evaluate_split(cfg, str(adapter), cfg.selection.split, eval_dir, tasks=VALIDATION_TASKS, ctx=ctx)
            ctx.barrier()                                  # rank 0 wrote the answers; every rank reads them
            records, labeler = read_evaluation(eval_dir)
            return pooled(concept_cells(records, labeler))

        return select(stage, trials, out, train, validate, selection_score, CRITERION,
                      main=ctx.is_main, barrier=ctx.barrier)
    return run


# What a validation evaluation asks: the selection criterion's tasks (perception is not in it).
VALIDATION_TASKS = ("alignment", "text_alignment")


def _evaluate_split(cfg: PipelineConfig, adapter: str | None, split: str, out: Path,
                    tasks: tuple[str, ...] | None = None, ctx=None, protocol: str = "measurement",
                    safe_data: str | None = None) -> dict | None:
    """One UnsafeConcepts evaluation of the run's base (+ `adapter`) on `split` into `out`, judged by
    the judge classifier, with the reward classifier and the rule-based check beside it."""
    from runtime.distributed import setup
    from eval.core.models import GenerationSettings, load_runner
    from eval.pipeline import EvalConfig, run_unsafeconcepts
    ctx = ctx or setup()
    runner = load_runner(cfg.base_model, adapter, device=ctx.device(), seed=cfg.model.seed,
                         image_preprocess=cfg.model.image_preprocess, conversation=cfg.model.conversation)
    ecfg = EvalConfig(generation=GenerationSettings(greedy=cfg.eval.greedy, max_new_tokens=cfg.eval.max_new_tokens,
                                                    seed=cfg.seed),
                      batch_size=cfg.eval.batch_size)
    classifiers = cfg.root / "classifiers"
    return run_unsafeconcepts(runner, cfg.eval_data, out, split=split, protocol=protocol, safe_data=safe_data,
                              limit=cfg.eval.limit or None, tasks=tasks, classifier=classifiers / "judge",
                              second_classifier=classifiers / "reward", cfg=ecfg,
                              ctx=ctx if ctx.active else None)


def _evaluate(adapter_of: Callable[[PipelineConfig], str | None]):
    """An evaluation stage of one model variant on every split of `eval.splits` (on the world: the
    held-out renders and concepts); under torchrun each rank answers its share of the items."""
    def run(cfg: PipelineConfig, out: Path) -> dict:
        from runtime.distributed import setup
        adapter = adapter_of(cfg)
        ctx = setup()
        summary = {"model": cfg.base_model, "adapter": adapter}
        for split in cfg.eval.splits:
            results = _evaluate_split(cfg, adapter, split, out / split, ctx=ctx, protocol=cfg.eval.protocol,
                                      safe_data=cfg.eval.safe_data or None)
            summary[split] = str(out / split / "results.json")
            summary[f"{split}_items"] = results["data"]["n_items"] if results else 0
        return summary
    return run


def _report(cfg: PipelineConfig, out: Path) -> dict:
    from safevlm.summary import write_pipeline_report
    data = None if not cfg.data_dir and not cfg.eval.data else str(cfg.eval_data)    # None: the concept world
    return write_pipeline_report(cfg.root, out, cfg.eval.splits, data=data,
                                 base_name="base (stage 0)" if cfg.pretrains_base else "base")


def _export(cfg: PipelineConfig, out: Path) -> dict:
    """Copy every trained adapter into `<run_dir>/adapters/<stage>` (safetensors + configs only)."""
    exported = {}
    for stage in ("stage1", "stage2", "ppo", "sft", "dpo"):
        src = cfg.root / stage / "adapter"
        if src.is_dir():
            dst = out / stage
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst)
            exported[stage] = str(dst)
    return {"adapters": exported}


def _builds_world(cfg: PipelineConfig) -> bool:
    return not cfg.data_dir


def _adapter(stage: str) -> Callable[[PipelineConfig], str]:
    return lambda cfg: str(cfg.root / stage / "adapter")


STAGES: list[Stage] = [
    Stage("world", "build the concept world (images, metadata, records)", _world, main_only=True,
          wanted=_builds_world),
    Stage("classifiers", "train the reward and judge response classifiers", _classifiers, main_only=True),
    Stage("stage0", "pretrain the tiny LLaVA on the world (perception, text-only safety)", _stage_runner("stage0"),
          wanted=lambda cfg: cfg.pretrains_base),
    Stage("eval_base", "evaluate the base", _evaluate(lambda cfg: None)),
    Stage("stage1", "train the safety modules on the frozen base", _stage_runner("stage1")),
    Stage("stage2", "LoRA + safety tokens on LM + classification loss", _stage_runner("stage2")),
    Stage("eval_stage2", "evaluate stage 2", _evaluate(_adapter("stage2"))),
    Stage("ppo", "PPO with the reward classifier on top of stage 2", _stage_runner("ppo")),
    Stage("eval_ppo", "evaluate PPO", _evaluate(_adapter("ppo"))),
    Stage("sft", "SFT baseline on the same prompts and labels", _stage_runner("sft")),
    Stage("eval_sft", "evaluate SFT", _evaluate(_adapter("sft"))),
    Stage("dpo", "DPO baseline on the same prompts and labels", _stage_runner("dpo")),
    Stage("eval_dpo", "evaluate DPO", _evaluate(_adapter("dpo"))),
    Stage("report", "comparison report (Markdown, CSV, JSON, PNG)", _report, main_only=True),
    Stage("adapters", "export the adapters", _export, main_only=True),
]
TRAINING_STAGES = ("stage0", "stage1", "stage2", "ppo", "sft", "dpo")


def plan(cfg: PipelineConfig) -> list[Stage]:
    """The stages this config runs, in order (see the module docstring)."""
    return [s for s in STAGES if s.wanted(cfg)]


def check_config(cfg: PipelineConfig, stages: list[Stage]) -> None:
    """Every mistake that can be seen before a stage runs, as a ConfigError naming the key: a model
    that cannot be loaded, `init_from: stage0` without stage 0, records or evaluation data that are
    missing (when no world stage will write them), an evaluation split the data does not have."""
    from base_models.loading import SHAPE_PREFIX, TINY_SPECS
    from base_models.shapes import SHAPES

    path = cfg.model.path
    if path.startswith(SHAPE_PREFIX):
        if path[len(SHAPE_PREFIX):] not in SHAPES:
            raise ConfigError(f"model.path: unknown shape {path!r}; known: {[SHAPE_PREFIX + k for k in sorted(SHAPES)]}")
    elif path not in TINY_SPECS and not Path(path).is_dir():
        raise ConfigError(f"model.path: {path!r} is not a local folder (save_pretrained layout), one of "
                          f"{sorted(TINY_SPECS)} or shape:NAME; nothing is downloaded, fetch checkpoints first")
    names = {s.name for s in stages}
    for stage in TRAINING_STAGES:
        if stage not in names:
            continue
        section = getattr(cfg, stage)
        if getattr(section, "init_from", "") == "stage0" and "stage0" not in names:
            raise ConfigError(f"{stage}.init_from: 'stage0' names the tiny model's pretraining, which does not run "
                              f"for model.path={path!r}; leave init_from empty (the base is model.path)")
        records = records_file(cfg, stage)
        if "world" not in names and not records.is_file():
            key = f"{stage}.data.train" if section.data.train else "data_dir"
            raise ConfigError(f"{key}: {stage} records {str(records)!r} not found (format: README, 'Data formats'; "
                              "records/<stage>.jsonl under data_dir, or the stage's data.train)")
    _check_selection(cfg, names)
    if "world" not in names and cfg.eval.splits and any(s.name.startswith("eval_") for s in stages):
        from eval.core.items import DataError
        from eval.benchmarks.unsafeconcepts import load_unsafeconcepts, select_rows
        key = "eval.data" if cfg.eval.data else "data_dir"
        try:
            data = load_unsafeconcepts(cfg.eval_data)
            for split in cfg.eval.splits:
                select_rows(data, split)
        except (DataError, FileNotFoundError) as exc:
            raise ConfigError(f"{key}: evaluation data {str(cfg.eval_data)!r}: {exc}") from None
    if any(s.name.startswith("eval_") for s in stages):
        if cfg.eval.protocol == "rlhf-test" and not cfg.eval.safe_data:
            raise ConfigError("eval.safe_data: the rlhf-test protocol needs the safe-image folder (metadata.json + images)")
        if cfg.eval.safe_data:
            from eval.core.items import DataError
            from eval.benchmarks.safe_images import load_safe_images
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
    if "world" in names:
        w = cfg.world
        if sel.split != "validation" or not (w.validation_unsafe or w.validation_safe or w.validation_render_fraction):
            raise ConfigError(f"selection.split: the concept world has no {sel.split!r} split to choose "
                              f"{sorted(selected)} on; set world.validation_unsafe / validation_safe / "
                              "validation_render_fraction, or selection.split='' to train each stage once")
        return
    from eval.core.items import DataError
    from eval.benchmarks.unsafeconcepts import load_unsafeconcepts, select_rows
    try:
        select_rows(load_unsafeconcepts(cfg.eval_data), sel.split)
    except (DataError, FileNotFoundError) as exc:
        raise ConfigError(f"selection.split: {exc}") from None


def load_pipeline_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)


def _join_ranks():
    """The ranks' context: under torchrun the process group (DeepSpeed's, which the training stages
    share), else a context of one process (the training stages make their own group of one)."""
    from runtime.distributed import setup
    return setup()


def _release_memory() -> None:
    """Free a finished stage's model and optimizer before the next one loads its own (on GPU a
    7B model per stage would not fit twice)."""
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_pipeline(cfg: PipelineConfig, force: bool = False, only: list[str] | None = None,
                 log: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every stage of the plan not yet done (all with `force`); returns each stage's summary
    (on rank 0; the other ranks of a torchrun get only what they ran)."""
    planned = plan(cfg)
    known = [s.name for s in planned]
    if only and not set(only) <= set(known):
        raise ConfigError(f"--only: unknown stage(s) {sorted(set(only) - set(known))}; stages of this config: {known}")
    check_config(cfg, planned)
    ctx = _join_ranks()
    say = log if ctx.is_main else (lambda message: None)
    run_dir = cfg.root
    lock = runlock.acquire(run_dir) if ctx.is_main else None    # one run per run folder
    if ctx.is_main:
        write_json_atomic(run_dir / "config.json", to_dict(cfg))
    summaries: dict[str, dict] = {}
    stages = [s for s in planned if only is None or s.name in only]
    started = time.time()
    for index, stage in enumerate(stages, 1):
        out = run_dir / stage.name
        marker = out / "DONE.json"
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
    from runtime.distributed import teardown
    teardown()
    if lock is not None:
        lock.release()
    return summaries
