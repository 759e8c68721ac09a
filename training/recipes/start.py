"""The starting model of the methods on top of stage 2 (PPO, SFT, DPO): the base stage 2 was
trained on, with the stage-2 adapter (safety modules + LoRA) loaded trainable.

Why all three start here: the methods must differ only in how they use the same prompts and
labels. The LoRA and the LLM-side safety tokens train; the safety head, its tokens and the
projector stay as stage 2 left them (these losses never reach the head).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from runtime.layout import RunLayout, StageLayout
from safety_modules import has_lora, load_adapter
from training.config import ModelSpec, RecipeRun, resolve_base_path


def stage2_adapter_path(cfg) -> Path:
    """`adapter`, else the adapter stage 2 of the same run exported."""
    return Path(cfg.adapter) if cfg.adapter else RunLayout(Path(cfg.run_dir).parent).adapter("stage2")


def baseline_base(cfg) -> ModelSpec:
    """The base (path, tiny-model seed) the stage-2 adapter was trained on.

    `init_from` when given; else the base named in the stage-2 run's config beside the adapter (so
    a run YAML whose stage 2 started from stage 0 needs no extra key, and an adapter is never put
    on a different base of the same shape); else the `model` section.
    """
    if cfg.init_from:
        return dataclasses.replace(cfg.model, path=resolve_base_path(cfg))
    recorded = StageLayout(stage2_adapter_path(cfg).parent).config
    if not recorded.is_file():
        return dataclasses.replace(cfg.model)
    try:
        stage2 = json.loads(recorded.read_text())
        spec = SimpleNamespace(init_from=stage2.get("init_from", ""), run_dir=stage2["run_dir"],
                               model=SimpleNamespace(path=stage2["model"]["path"]))
        seed = int(stage2["model"].get("seed", 0))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{recorded}: cannot read the stage-2 run's base from it ({exc!r}); set init_from") from None
    return dataclasses.replace(cfg.model, path=resolve_base_path(spec), seed=seed)


def build_baseline_model(cfg):
    """Base + stage-2 adapter (safety modules + LoRA), with the trainable set of the methods on top."""
    adapter = stage2_adapter_path(cfg)
    if not adapter.is_dir():
        raise FileNotFoundError(f"adapter: stage-2 adapter folder {adapter} not found (run stage 2 first, or "
                                "set adapter=DIR)")
    base, processor = baseline_base(cfg).load()
    model = load_adapter(base, adapter, processor, trainable=True)
    if not has_lora(model):
        raise ValueError(f"adapter: {adapter} holds no LoRA (a stage-1 adapter?); SFT, DPO and PPO train the "
                         "stage-2 LoRA, so pass the adapter stage 2 exported")
    model.safety.requires_grad_(False)
    model.safety.llm_tokens.requires_grad_(cfg.train_tokens)
    return model


@dataclass
class OnTopRun(RecipeRun):
    """The run-wide keys of a method on top of stage 2: its config is its section plus these."""

    def pinned_inputs(self) -> dict[str, str]:
        """The starting model and adapter as absolute settings, so that a trial trained in another
        folder (a sweep's, a selection's) starts from this run's models."""
        return {"adapter": str(stage2_adapter_path(self)),
                "init_from": baseline_base(self).path if self.init_from else ""}
