"""The concept catalogue of the concept world: which concepts exist, their category and labels.

Why: the tiny default must stand in for UnsafeConcepts on a CPU, so its unsafe concepts carry the
names and categories of the real benchmark (read from its public metadata when it is beside the
repository) and its safe concepts are everyday things. Without the metadata the world still builds,
from our own invented names per category, so the project never depends on `../shared/`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safety_modules.fileio import iter_jsonl, read_json

logger = logging.getLogger(__name__)

# The nine UnsafeConcepts categories (protocol facts), each with the risk type the tiny default's
# SafetyConfig uses (the category name lower-cased) and a severity level chosen for this world:
# 3 = serious (physical or sexual harm, hate symbols), 2 = harmful, 1 = misleading or risky.
CATEGORIES: dict[str, int] = {
    "Hate": 3,
    "Harassment": 2,
    "Violence": 3,
    "Self-harm": 3,
    "Sexual": 3,
    "Shocking": 2,
    "Illegal activity": 2,
    "Deception": 1,
    "Public and personal health": 1,
}
SAFE_CATEGORY = "Safe"
RISK_TYPES: list[str] = ["none"] + [name.lower() for name in CATEGORIES]
NUM_SAFETY_LEVELS = 4
DEFAULT_HELDOUT = 3  # held-out concepts of each kind (unsafe, safe) when not given
VALIDATION_DRAW = "validation-concepts"  # the fixed generator of the validation concepts (seed-independent)
CONCEPT_SPLITS = ("train", "validation", "heldout_concept")

# The name catalogue (data, kept out of the code): our own invented unsafe names per category, used
# only when the benchmark metadata is absent, and the everyday safe names, in the order they are taken.
_CATALOGUE = read_json(Path(__file__).with_name("catalogue.json"), "concept catalogue")
FALLBACK_UNSAFE: dict[str, list[str]] = _CATALOGUE["fallback_unsafe"]
SAFE_NAMES: list[str] = _CATALOGUE["safe"]


@dataclass
class Concept:
    """One concept of the world and its labels (`split` says whether safety training may see it)."""

    name: str
    category: str                 # an UnsafeConcepts category, or "Safe"
    is_safe: bool
    safety_level: int             # 0 = safe, 1..3 by the category's severity
    risk_type: str                # "none" for safe concepts, else the category lower-cased
    split: str = "train"          # one of CONCEPT_SPLITS
    traits: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def default_metadata_path() -> Path:
    """`<repo>/../shared/data/unsafeconcepts/metadata.jsonl` (CI clones the repo with shared/ beside it)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "unsafeconcepts" / "metadata.jsonl"


def read_unsafe_names(path: str | Path) -> dict[str, list[str]]:
    """Concept names per category from an UnsafeConcepts `metadata.jsonl`, in order of first appearance.

    Errors name the file, line and field: a silently half-read catalogue would change the world.
    """
    path = Path(path)
    names: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        for key in ("category", "unsafe_concept"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{path}:{lineno}: field {key!r} missing or not a non-empty string")
        category, concept = row["category"], row["unsafe_concept"].strip()
        if category not in names:
            raise ValueError(f"{path}:{lineno}: field 'category': unknown category {category!r}; "
                             f"known: {list(CATEGORIES)}")
        if concept not in names[category]:
            names[category].append(concept)
    return names


def unsafe_catalogue(metadata: str | Path | None = None) -> tuple[dict[str, list[str]], str]:
    """(names per category, source): the benchmark's names if its metadata is found, else the fallback.

    `metadata=None` looks beside the repository; a path that does not exist selects the fallback
    (logged), which is how tests force it.
    """
    path = Path(metadata) if metadata is not None else default_metadata_path()
    if path.is_file():
        return read_unsafe_names(path), "unsafeconcepts"
    logger.info("UnsafeConcepts metadata not found at %s: using the built-in concept names", path)
    return {c: list(v) for c, v in FALLBACK_UNSAFE.items()}, "fallback"


def _spread(names: dict[str, list[str]], n: int) -> dict[str, list[str]]:
    """Take `n` names round-robin over the categories (a category that runs out is skipped)."""
    available = sum(len(v) for v in names.values())
    if not 1 <= n <= available:
        raise ValueError(f"concepts: must be between 1 and {available} (unsafe concepts available), got {n}")
    taken: dict[str, list[str]] = {c: [] for c in names}
    depth = 0
    while sum(len(v) for v in taken.values()) < n:
        for category, pool in names.items():
            if depth < len(pool) and sum(len(v) for v in taken.values()) < n:
                taken[category].append(pool[depth])
        depth += 1
    return taken


def _draw_keeping_one(rng: random.Random, pools: dict[str, list[str]], n: int, key: str) -> list[str]:
    """`n` names drawn one per category per round (categories in a shuffled order each round), never
    the last name of a category, so every category keeps a training concept."""
    left = {c: list(v) for c, v in pools.items()}
    available = sum(max(len(v) - 1, 0) for v in left.values())
    if n < 0 or n > available:
        raise ValueError(f"{key}: must be between 0 and {available} (every category keeps one training concept), "
                         f"got {n}")
    drawn: list[str] = []
    while len(drawn) < n:
        order = [c for c, v in left.items() if len(v) >= 2]
        rng.shuffle(order)
        for category in order[:n - len(drawn)]:
            name = rng.choice(left[category])
            left[category].remove(name)
            drawn.append(name)
    return drawn


def select_concepts(
    n_unsafe: int,
    n_safe: int,
    heldout_unsafe: int | None,
    heldout_safe: int | None,
    seed: int,
    metadata: str | Path | None = None,
    validation_unsafe: int = 0,
    validation_safe: int = 0,
) -> tuple[list[Concept], str]:
    """The world's concepts (unsafe first, in category order, then safe) and the name source.

    Three roles: "train" (safety training sees them), "validation" (held out of every training stage's
    safety records; hyperparameters are chosen on them) and "heldout_concept" (held out of all
    safety training; what results are reported on).

    Validation concepts are drawn with a fixed generator, independent of `seed`, so that a study over
    seeds chooses hyperparameters on one set of concepts that is never a reported split of any seed.
    Unsafe ones are drawn one per category per round (`_draw_keeping_one`); held-out unsafe concepts
    are then drawn the same way with the seed among the rest. Every category keeps a training
    concept, so every held-out concept belongs to a category the safety training has seen. `None`
    holds out up to 3 (of each kind).
    """
    if n_safe < 1 or n_safe > len(SAFE_NAMES):
        raise ValueError(f"safe_concepts: must be between 1 and {len(SAFE_NAMES)}, got {n_safe}")
    if validation_safe < 0 or validation_safe >= n_safe:
        raise ValueError(f"validation_safe: must be >= 0 and below safe_concepts ({n_safe}), got {validation_safe}")
    if heldout_safe is None:
        heldout_safe = min(DEFAULT_HELDOUT, n_safe - 1 - validation_safe)
    if heldout_safe < 0 or heldout_safe + validation_safe >= n_safe:
        raise ValueError(f"heldout_safe: must be >= 0 and leave a training concept of the {n_safe} safe ones "
                         f"after {validation_safe} validation concept(s), got {heldout_safe}")
    names, source = unsafe_catalogue(metadata)
    taken = _spread(names, n_unsafe)
    roles: dict[str, str] = {}

    fixed = random.Random(VALIDATION_DRAW)
    for name in _draw_keeping_one(fixed, taken, validation_unsafe, "validation_unsafe"):
        roles[name] = "validation"
    rng = random.Random(f"heldout-{seed}")
    remaining = {c: [n for n in v if n not in roles] for c, v in taken.items()}
    if heldout_unsafe is None:
        heldout_unsafe = min(DEFAULT_HELDOUT, sum(len(v) >= 2 for v in remaining.values()))
    for name in _draw_keeping_one(rng, remaining, heldout_unsafe, "heldout_unsafe"):
        roles[name] = "heldout_concept"

    concepts: list[Concept] = []
    for category, chosen in taken.items():
        for name in chosen:
            concepts.append(Concept(name=name, category=category, is_safe=False,
                                    safety_level=CATEGORIES[category], risk_type=category.lower(),
                                    split=roles.get(name, "train")))
    safe_names = SAFE_NAMES[:n_safe]
    for name in fixed.sample(safe_names, validation_safe):
        roles[name] = "validation"
    for name in rng.sample([n for n in safe_names if n not in roles], heldout_safe):
        roles[name] = "heldout_concept"
    for name in safe_names:
        concepts.append(Concept(name=name, category=SAFE_CATEGORY, is_safe=True, safety_level=0,
                                risk_type="none", split=roles.get(name, "train")))
    clash = {c.name for c in concepts if not c.is_safe} & set(safe_names)
    if clash:
        raise ValueError(f"concept names used as both safe and unsafe: {sorted(clash)}")
    return concepts, source
