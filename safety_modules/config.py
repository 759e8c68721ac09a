"""`SafetyConfig`: what the safety modules look like, independent of any base model.

Why no widths here: every width (vision features, LLM hidden size, attention heads) is read from the
base model's config when the modules are attached, so one config serves a tiny model and a 7B one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from safety_modules.configio import ConfigError, load_config

DEFAULT_RISK_TYPES: tuple[str, ...] = (
    "none",
    "violence",
    "hate",
    "sexual",
    "self-harm",
    "illegal activity",
    "deception",
)
PROJECTOR_KINDS = ("c-abstractor", "mlp")


@dataclass
class SafetyConfig:
    """Shape and loss settings of the safety projector, safety tokens and safety head."""

    num_safety_tokens: int = 64          # per set: one set enters the LLM, one prefixes the head
    projector: str = "c-abstractor"      # "c-abstractor" (Honeybee) or "mlp" (ablation)
    projector_depth: int = 3             # ResNet bottleneck blocks before and after pooling
    projector_mlp_depth: int = 2         # layers of the read-out MLP
    num_queries: int = 576               # safety features per image (a square for c-abstractor)
    vision_feature_layer: int = -2       # which vision-tower hidden state the projector reads
    num_safety_levels: int = 4           # 0 = safe ... 3 = serious
    risk_types: list[str] = field(default_factory=lambda: list(DEFAULT_RISK_TYPES))
    loss_weight: float = 10.0            # total loss = LM loss + loss_weight * (CE(level) + CE(type))
    head_num_heads: int = 0              # 0: use the LLM's number of attention heads

    def __post_init__(self) -> None:
        if self.num_safety_tokens < 1:
            raise ConfigError(f"num_safety_tokens: must be >= 1, got {self.num_safety_tokens}")
        if self.projector not in PROJECTOR_KINDS:
            raise ConfigError(f"projector: must be one of {list(PROJECTOR_KINDS)}, got {self.projector!r}")
        if self.projector_depth < 0:
            raise ConfigError(f"projector_depth: must be >= 0, got {self.projector_depth}")
        if self.projector_mlp_depth < 1:
            raise ConfigError(f"projector_mlp_depth: must be >= 1, got {self.projector_mlp_depth}")
        if self.num_queries < 1:
            raise ConfigError(f"num_queries: must be >= 1, got {self.num_queries}")
        if self.projector == "c-abstractor" and math.isqrt(self.num_queries) ** 2 != self.num_queries:
            raise ConfigError(f"num_queries: the c-abstractor pools to a square grid, {self.num_queries} is not a square")
        if self.num_safety_levels < 2:
            raise ConfigError(f"num_safety_levels: must be >= 2 (0 = safe), got {self.num_safety_levels}")
        if len(self.risk_types) < 1 or len(set(self.risk_types)) != len(self.risk_types):
            raise ConfigError(f"risk_types: must be a non-empty list of distinct names, got {self.risk_types}")
        if self.loss_weight < 0:
            raise ConfigError(f"loss_weight: must be >= 0, got {self.loss_weight}")
        if self.head_num_heads < 0:
            raise ConfigError(f"head_num_heads: must be >= 0, got {self.head_num_heads}")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = (), section: str | None = None) -> "SafetyConfig":
        """Load from YAML (optionally a `section` such as `safety`), with `key=value` overrides."""
        return load_config(cls, path, overrides, section=section)

    def risk_index(self, name: str) -> int:
        try:
            return self.risk_types.index(name)
        except ValueError:
            raise ConfigError(f"risk type {name!r} is not one of {self.risk_types}") from None
