"""The end-to-end job behind `safevlm run CONFIG`: a list of stages, each skipped once done.

Why stages with markers: a run on 2 CPU cores (or 8 GPUs) must survive interruption. Each stage
writes its outputs into its own folder of the run directory and, last, a `DONE.json` marker; a
rerun skips every stage with a marker unless `--force`, so an interrupted run continues where it
stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from safety_modules.config import SafetyConfig
from safety_modules.configio import load_config, to_dict


@dataclass
class ModelSection:
    path: str = "tiny"          # 'tiny', 'tiny-next' or a local save_pretrained folder
    seed: int = 0


@dataclass
class PipelineConfig:
    run_dir: str = "checkpoints/tiny"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    safety: SafetyConfig = field(default_factory=SafetyConfig)


@dataclass
class Stage:
    name: str
    description: str
    fn: Callable[["PipelineConfig", Path], dict]


def _stage_base(cfg: PipelineConfig, out: Path) -> dict:
    from safety_modules.loading import load_base
    model, processor = load_base(cfg.model.path, seed=cfg.model.seed)
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    return {"model": str(out / "model"), "parameters": sum(p.numel() for p in model.parameters())}


def _stage_modules(cfg: PipelineConfig, out: Path) -> dict:
    import torch
    from safety_modules import attach, save_adapter
    from safety_modules.loading import load_base
    model, processor = load_base(str(Path(cfg.run_dir) / "base" / "model"))
    torch.manual_seed(cfg.seed)
    safe_model = attach(model, cfg.safety, processor)
    save_adapter(safe_model, out / "adapter")
    return {"adapter": str(out / "adapter"),
            "trainable_parameters": sum(p.numel() for p in safe_model.safety.parameters())}


def _stage_guard(cfg: PipelineConfig, out: Path) -> dict:
    import numpy as np
    from PIL import Image
    from safety_modules import SafetyGuard, load_adapter
    from safety_modules.loading import load_base
    model, processor = load_base(str(Path(cfg.run_dir) / "base" / "model"))
    safe_model = load_adapter(model, Path(cfg.run_dir) / "modules" / "adapter", processor)
    rng = np.random.default_rng(cfg.seed)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
    verdicts = [v.to_dict() for v in SafetyGuard(safe_model).verdict(images)]
    (out / "verdicts.json").write_text(json.dumps(verdicts, indent=2))
    return {"verdicts": str(out / "verdicts.json"), "levels": [v["level"] for v in verdicts]}


STAGES: list[Stage] = [
    Stage("base", "load or build the base model and save it into the run", _stage_base),
    Stage("modules", "attach the safety modules and export the adapter", _stage_modules),
    Stage("guard", "guard verdicts on generated images (no text generation)", _stage_guard),
]


def load_pipeline_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)


def run_pipeline(cfg: PipelineConfig, force: bool = False, only: list[str] | None = None,
                 log: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every stage not yet done (all with `force`); returns each stage's summary."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    summaries: dict[str, dict] = {}
    stages = [s for s in STAGES if only is None or s.name in only]
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
        marker.write_text(json.dumps(summary, indent=2))
        summaries[stage.name] = summary
        log(f"{prefix}: finished in {summary['seconds']} s")
    return summaries
