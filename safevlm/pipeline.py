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
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from safety_modules.config import SafetyConfig
from safety_modules.configio import ConfigError, load_config, to_dict
from training.classifier.train import ClassifierTrainConfig
from training.config import ModelSpec, Stage0Section, Stage1Section, Stage2Section, stage_config, world_records
from training.recipes.dpo import DPOConfig, DPOSection
from training.recipes.ppo import PPOConfig, PPOSection
from training.recipes.sft import SFTConfig, SFTSection

# Recipes on top of stage 2, and their full config classes (built from a section by baseline_config).
ON_TOP = {"ppo": PPOConfig, "sft": SFTConfig, "dpo": DPOConfig}


@dataclass
class WorldSection:
    """Arguments of `training.world.build.build_world` (see `safevlm world build --help`)."""

    concepts: int = 18
    images_per_concept: int = 12
    size: int = 32
    heldout_render_fraction: float = 0.25
    questions_per_image: int = 2
    perception_per_image: int = 2
    metadata: str | None = None        # UnsafeConcepts metadata.jsonl for names; None: ../shared if present


@dataclass
class EvalSection:
    splits: list[str] = field(default_factory=lambda: ["heldout_render", "heldout_concept"])
    greedy: bool = True                 # reproducible tables; the protocol's sampling with greedy: false
    max_new_tokens: int = 32            # the world's answers are one sentence
    batch_size: int = 16
    limit: int = 0                      # > 0: only the first N images per split (quick runs)


@dataclass
class PipelineConfig:
    run_dir: str = "checkpoints/tiny"
    seed: int = 0
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

    @property
    def root(self) -> Path:
        return Path(self.run_dir)

    @property
    def world_dir(self) -> Path:
        return self.root / "world" / "data"


@dataclass
class Stage:
    name: str
    description: str
    fn: Callable[[PipelineConfig, Path], dict]


# -- stage functions -------------------------------------------------------------------------------
def _world(cfg: PipelineConfig, out: Path) -> dict:
    from training.world.build import build_world
    if (out / "data").exists():
        shutil.rmtree(out / "data")           # a half-written world from an interrupted run
    w = cfg.world
    return build_world(out / "data", concepts=w.concepts, images_per_concept=w.images_per_concept, seed=cfg.seed,
                       size=w.size, heldout_render_fraction=w.heldout_render_fraction,
                       questions_per_image=w.questions_per_image, perception_per_image=w.perception_per_image,
                       metadata=w.metadata)


def _classifiers(cfg: PipelineConfig, out: Path) -> dict:
    from training.classifier.train import build_default
    reports = build_default(out, dataclasses.replace(cfg.classifier, seed=cfg.classifier.seed + cfg.seed))
    return {name: {k: v for k, v in rep.items() if k != "errors"} for name, rep in reports.items()}


def _with_records(section, stage: str, cfg: PipelineConfig):
    """The stage section with its records file defaulting to the world's `records/<stage>.jsonl`."""
    if section.data.train:
        return section
    data = dataclasses.replace(section.data, train=str(world_records(cfg.root, stage)))
    return dataclasses.replace(section, data=data)


def _stage_runner(stage: str) -> Callable[[PipelineConfig, Path], dict]:
    def run(cfg: PipelineConfig, out: Path) -> dict:
        from training.recipes import RECIPES
        import importlib
        section = _with_records(getattr(cfg, stage), stage, cfg)
        if stage == "stage1" and not section.eval_files:
            held = [str(cfg.world_dir / "records" / f"{s}.jsonl") for s in ("heldout_render", "heldout_concept")]
            section = dataclasses.replace(section, eval_files=held)
        if stage in ON_TOP:
            from training.recipes.baselines import baseline_config
            recipe_cfg = baseline_config(ON_TOP[stage], section, run_dir=cfg.root / stage, seed=cfg.seed,
                                         model=cfg.model)
        else:
            recipe_cfg = stage_config(stage, section, run_dir=cfg.root, seed=cfg.seed, model=cfg.model,
                                      safety=cfg.safety)
        module, fn = RECIPES[stage].split(":")
        from training.checkpoint import latest_checkpoint
        resume = latest_checkpoint(out) is not None      # an interrupted earlier attempt
        return getattr(importlib.import_module(module), fn)(recipe_cfg, resume=resume)
    return run


def _evaluate(model_of: Callable[[PipelineConfig], tuple[str, str | None]]):
    """An evaluation stage of one model variant on every held-out split of the world."""
    def run(cfg: PipelineConfig, out: Path) -> dict:
        from eval.models import GenerationSettings, load_runner
        from eval.pipeline import EvalConfig, run_unsafeconcepts
        model_path, adapter = model_of(cfg)
        runner = load_runner(model_path, adapter)
        ecfg = EvalConfig(generation=GenerationSettings(greedy=cfg.eval.greedy, max_new_tokens=cfg.eval.max_new_tokens,
                                                        seed=cfg.seed),
                          batch_size=cfg.eval.batch_size)
        summary = {"model": model_path, "adapter": adapter}
        classifiers = cfg.root / "classifiers"
        for split in cfg.eval.splits:
            results = run_unsafeconcepts(runner, cfg.world_dir, out / split, split=split,
                                         limit=cfg.eval.limit or None, classifier=classifiers / "judge",
                                         second_classifier=classifiers / "reward", cfg=ecfg)
            summary[split] = str(out / split / "results.json")
            summary[f"{split}_items"] = results["data"]["n_items"] if results else 0
        return summary
    return run


def _base_model(cfg: PipelineConfig) -> str:
    return str(cfg.root / "stage0" / "model")


def _report(cfg: PipelineConfig, out: Path) -> dict:
    from safevlm.summary import write_pipeline_report
    return write_pipeline_report(cfg.root, out, cfg.eval.splits, [s.name for s in STAGES])


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


STAGES: list[Stage] = [
    Stage("world", "build the concept world (images, metadata, records)", _world),
    Stage("classifiers", "train the reward and judge response classifiers", _classifiers),
    Stage("stage0", "pretrain the tiny LLaVA on the world (perception, text-only safety)", _stage_runner("stage0")),
    Stage("eval_base", "evaluate the stage-0 base", _evaluate(lambda c: (_base_model(c), None))),
    Stage("stage1", "train the safety modules on the frozen base", _stage_runner("stage1")),
    Stage("stage2", "LoRA + safety tokens on LM + classification loss", _stage_runner("stage2")),
    Stage("eval_stage2", "evaluate stage 2", _evaluate(lambda c: (_base_model(c), str(c.root / "stage2" / "adapter")))),
    Stage("ppo", "PPO with the reward classifier on top of stage 2", _stage_runner("ppo")),
    Stage("eval_ppo", "evaluate PPO", _evaluate(lambda c: (_base_model(c), str(c.root / "ppo" / "adapter")))),
    Stage("sft", "SFT baseline on the same prompts and labels", _stage_runner("sft")),
    Stage("eval_sft", "evaluate SFT", _evaluate(lambda c: (_base_model(c), str(c.root / "sft" / "adapter")))),
    Stage("dpo", "DPO baseline on the same prompts and labels", _stage_runner("dpo")),
    Stage("eval_dpo", "evaluate DPO", _evaluate(lambda c: (_base_model(c), str(c.root / "dpo" / "adapter")))),
    Stage("report", "comparison report (Markdown, CSV, JSON, PNG)", _report),
    Stage("adapters", "export the adapters", _export),
]


def load_pipeline_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)


def run_pipeline(cfg: PipelineConfig, force: bool = False, only: list[str] | None = None,
                 log: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every stage not yet done (all with `force`); returns each stage's summary."""
    known = [s.name for s in STAGES]
    from safety_modules.loading import TINY_SPECS
    if cfg.model.path not in TINY_SPECS:
        # Stage 0 pretrains a tiny model on the concept world; a real checkpoint needs real data and
        # a GPU path that has not been proven yet. Fail before anything runs, naming what to do.
        raise ConfigError(f"model.path: `safevlm run` drives the tiny models ({sorted(TINY_SPECS)}) end to end; for "
                          f"{cfg.model.path!r} run the stages one by one (safevlm train stage1/stage2, safevlm ppo, "
                          "safevlm sft/dpo, safevlm eval) with your data; see README, 'Plugging in real data'")
    if only and not set(only) <= set(known):
        raise ConfigError(f"--only: unknown stage(s) {sorted(set(only) - set(known))}; stages: {known}")
    run_dir = cfg.root
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    summaries: dict[str, dict] = {}
    stages = [s for s in STAGES if only is None or s.name in only]
    started = time.time()
    for index, stage in enumerate(stages, 1):
        out = run_dir / stage.name
        marker = out / "DONE.json"
        prefix = f"[{index}/{len(stages)}] {stage.name}"
        if marker.is_file() and not force:
            summaries[stage.name] = json.loads(marker.read_text())
            log(f"{prefix}: done already, skipped ({marker})")
            continue
        log(f"{prefix}: {stage.description} ...")
        out.mkdir(parents=True, exist_ok=True)
        start = time.time()
        summary = stage.fn(cfg, out)
        summary["seconds"] = round(time.time() - start, 2)
        marker.write_text(json.dumps(summary, indent=2, default=str))
        summaries[stage.name] = summary
        log(f"{prefix}: finished in {summary['seconds']} s (run so far {time.time() - started:.0f} s)")
    return summaries
