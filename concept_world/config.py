"""`WorldConfig`: the settings of one concept world (YAML section `world`, `safevlm world build`).

Why a dataclass checked on construction: a wrong value (a render fraction that leaves no training
render, too few concepts for 4-way perception) is reported before anything is written, with the
name of the field at fault.
"""

from __future__ import annotations

from dataclasses import dataclass

from concept_world import texts
from safety_modules.configio import ConfigError
from safety_modules.labels import OPTIONS

MIN_CONCEPTS = len(OPTIONS)   # 4-way perception needs three wrong options besides the right one


@dataclass(frozen=True)
class RenderCounts:
    """How a concept's renders are cut: the first `train`, then `validation`, then `heldout`."""

    train: int
    validation: int
    heldout: int


def _check(name: str, value, low, high=None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConfigError(f"{name}: must be {bound}, got {value}")


@dataclass
class WorldConfig:
    """Settings of `concept_world.build.build_world` (field names and defaults as the pipeline's
    `world` section; the seed is the run's and passed on its own).

    `concepts` unsafe concepts are spread round-robin over the nine categories; `safe_concepts`
    (None: as many) everyday ones. `heldout_unsafe` categories lose one concept each, and
    `heldout_safe` safe concepts are held out, to all safety training (None: 3 each where possible).
    `validation_unsafe` / `validation_safe` concepts and `validation_render_fraction` of each training
    concept's renders form the validation split (see `concept_world.concepts.select_concepts`).
    """

    concepts: int = 18
    images_per_concept: int = 12
    size: int = 32                       # image side in pixels
    heldout_render_fraction: float = 0.25
    heldout_unsafe: int | None = None    # categories that lose one concept to heldout_concept (None: up to 3)
    heldout_safe: int | None = None
    validation_unsafe: int = 0           # categories that lose one concept to the validation split
    validation_safe: int = 0
    validation_render_fraction: float = 0.0
    questions_per_image: int = 2         # safety questions per training image
    perception_per_image: int = 2        # stage-0 multiple-choice records per image
    metadata: str | None = None          # UnsafeConcepts metadata.jsonl for names; None: ../shared if present
    safe_concepts: int | None = None     # None: as many as `concepts`

    def __post_init__(self) -> None:
        _check("images_per_concept", self.images_per_concept, 2)
        _check("size", self.size, 16, 1024)
        _check("heldout_render_fraction", self.heldout_render_fraction, 0.0, 0.9)
        _check("validation_render_fraction", self.validation_render_fraction, 0.0, 0.9)
        _check("questions_per_image", self.questions_per_image, 1, len(texts.ALIGNMENT_PROMPTS))
        _check("perception_per_image", self.perception_per_image, 0)
        if self.concepts + self.num_safe < MIN_CONCEPTS:
            raise ConfigError(f"concepts, safe_concepts: the world needs at least {MIN_CONCEPTS} concepts for "
                             f"{MIN_CONCEPTS}-way perception, got {self.concepts + self.num_safe}")
        self.render_counts()

    @property
    def num_safe(self) -> int:
        """Safe concepts in the world (`safe_concepts`, or as many as unsafe)."""
        return self.concepts if self.safe_concepts is None else self.safe_concepts

    def render_counts(self) -> RenderCounts:
        """Training, validation and held-out renders per concept (at least one held out, one trained)."""
        n_eval = max(1, round(self.images_per_concept * self.heldout_render_fraction))
        n_val = (max(1, round(self.images_per_concept * self.validation_render_fraction))
                 if self.validation_render_fraction else 0)
        n_train = self.images_per_concept - n_eval - n_val
        if n_train < 1:
            raise ConfigError(f"images_per_concept: {self.images_per_concept} leaves no training render after "
                             f"{n_eval} held-out and {n_val} validation render(s)")
        return RenderCounts(train=n_train, validation=n_val, heldout=n_eval)
