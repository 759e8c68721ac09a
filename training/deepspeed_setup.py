"""What DeepSpeed is given: the config with its "auto" values filled, the LR schedule, ZeRO-3 hooks.

DeepSpeed JSON (`configs/deepspeed/zero2.json`, `zero3.json`): values written "auto" are filled from
TrainConfig (batch sizes, lr, betas, eps, weight decay, clipping, bf16). The optimizer is AdamW with
`torch_adam: true` (torch's own, nothing compiled); the LR schedule is ours (linear warm-up, then
cosine / linear / constant), stepped by DeepSpeed at each optimizer step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runtime.distributed import import_deepspeed
from training.config import TrainConfig

NO_DEEPSPEED_PRINTS = 10**9      # steps_per_print: our own progress bar and metrics do the reporting


def use_bf16(cfg: TrainConfig) -> bool:
    """bf16 when asked for, or on "auto" when a GPU is there (CPU runs stay fp32)."""
    if cfg.precision == "bf16":
        return True
    return cfg.precision == "auto" and torch.cuda.is_available()


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON with every "auto" filled from `cfg`; an unknown "auto" is an error."""
    path = Path(cfg.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except OSError as exc:
        raise FileNotFoundError(f"train.deepspeed: cannot read {path} ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    accumulation = cfg.accumulation(world_size)
    values = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": cfg.micro_batch_size * accumulation * world_size,
        "gradient_clipping": cfg.grad_clip,
        "bf16.enabled": use_bf16(cfg),
        "optimizer.params.lr": cfg.lr,
        "optimizer.params.betas": list(cfg.adam_betas),
        "optimizer.params.eps": cfg.adam_eps,
        "optimizer.params.weight_decay": cfg.weight_decay,
    }

    def fill(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            return {k: fill(v, f"{prefix}{k}.") for k, v in node.items()}
        if node == "auto":
            key = prefix.rstrip(".")
            if key not in values:
                raise ValueError(f"{path}: {key}: 'auto' is not a value the trainer can fill "
                                 f"(it fills {sorted(values)})")
            return values[key]
        return node

    ds = fill(ds, "")
    ds.setdefault("steps_per_print", NO_DEEPSPEED_PRINTS)
    if ds.get("optimizer", {}).get("params", {}).get("torch_adam") is not True:
        raise ValueError(f"{path}: optimizer.params.torch_adam must be true (no JIT-compiled optimizers)")
    return ds


def zero_stage(ds_config: dict[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has no zero_optimization section)."""
    return ds_config.get("zero_optimization", {}).get("stage", 0)


@dataclass
class WarmupDecay:
    """LR multiplier: linear warm-up to 1, then cosine / linear decay to min_ratio (or constant).

    A class rather than a lambda so the scheduler's state_dict holds plain numbers.
    """

    warmup: int
    total: int
    kind: str = "cosine"
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.min_ratio + (1 - self.min_ratio) * decay


def lr_schedule(cfg: TrainConfig, total_steps: int) -> WarmupDecay:
    """The schedule of `cfg` over `total_steps` optimizer steps (warm-up capped at the run's length)."""
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    return WarmupDecay(warmup=min(warmup, total_steps), total=total_steps, kind=cfg.lr_schedule,
                       min_ratio=cfg.min_lr_ratio)


def register_zero3_external_parameters(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters when its forward runs; the safety tokens are read
    directly by the wrapper's forward (not through a module call), so they are registered with it."""
    deepspeed = import_deepspeed()
    safety = getattr(model, "safety", None)
    if safety is not None:
        for param in safety.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(model, param)
