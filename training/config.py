"""The config pieces every recipe shares (model, data, optimisation, LoRA) and how a recipe's config
is read from YAML: dataclasses through `safety_modules.configio`.

Why sections: one YAML file (e.g. `configs/tiny.yaml`) describes a whole run. Keys shared by every
method (`run_dir`, `seed`, `model`, `safety`) sit at the top; each method adds a section (`stage1:`,
`ppo:`, ...) holding only what is its own (`data`, `train`, ...), defined beside its recipe in
`training/recipes/<name>.py`. A recipe config is the shared keys plus one section, and each method
writes into `<run_dir>/<name>/`.

Chaining stages without hard-coded paths: `init_from: stage0` starts a stage from the model that
stage 0 of the same run exported (`<run_dir>/stage0/model`); stage 2's `adapter: ""` means the
adapter stage 1 of the same run exported (`<run_dir>/stage1/adapter`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from safety_modules.config import SafetyConfig
from safety_modules.configio import ConfigError, from_dict, merge, parse_overrides, read_yaml, replace_nested
from safety_modules.images import MAX_IMAGE_PIXELS
from safety_modules.input_format import CONVERSATION_NAMES, IMAGE_PREPROCESS, PROCESSOR_PREPROCESS
from base_models.loading import load_base
from runtime.layout import RunLayout

LR_SCHEDULES = ("cosine", "linear", "constant")
INIT_FROM_BASE_STAGE = "stage0"          # `init_from: stage0`: the model stage 0 of the same run exported
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class ModelSpec:
    """Which base model to start from: 'tiny', 'tiny-next' or a local save_pretrained folder."""

    path: str = "tiny"
    seed: int = 0                        # weight seed of the tiny models (ignored for folders)
    # How its inputs are formatted, in training and evaluation alike (safety_modules/input_format.py):
    image_preprocess: Literal[IMAGE_PREPROCESS] = PROCESSOR_PREPROCESS   # pad_to_square: LLaVA-1.5's own
    conversation: Literal[CONVERSATION_NAMES] = ""   # "": the processor's chat template; llava_v1: the original's

    def load(self, path: str | None = None, **kwargs):
        """(model, processor) of this spec (or of `path` with this spec's seed and input settings)."""
        return load_base(path or self.path, seed=self.seed, image_preprocess=self.image_preprocess,
                         conversation=self.conversation, **kwargs)


@dataclass
class DataConfig:
    """Where the training records are and how strictly they are checked (see training/records.py)."""

    train: str = ""                      # records file, JSONL (one record a line) or a JSON array
    image_root: str = ""                 # "": the folder above `records/` if the file is in one, else its folder
    skip_bad_records: bool = False       # true: log and count bad records instead of stopping
    verify_images: bool = True           # decode every image once before training starts
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_records: int = 0                 # > 0: use only the first N valid records (quick runs)
    max_length: int = 0                  # > 0: truncate responses so sequences fit (prompts never cut)
    num_workers: int = 0                 # DataLoader worker processes

    def __post_init__(self) -> None:
        for key in ("max_image_pixels", "max_records", "max_length", "num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")


@dataclass
class TrainConfig:
    """How to optimise; the same keys for every recipe.

    Batch: `global_batch_size` (the effective batch, e.g. the paper's 128) = micro_batch_size x
    processes x gradient accumulation; with `global_batch_size: 0` the accumulation is
    `gradient_accumulation_steps`. Values written "auto" in the DeepSpeed JSON are filled from here.
    """

    deepspeed: str = "configs/deepspeed/zero2.json"   # ZeRO-2 or ZeRO-3 JSON (relative: to the cwd)
    epochs: int = 1
    max_steps: int = 0                   # > 0: stop after this many optimizer steps (overrides epochs)
    micro_batch_size: int = 4            # samples per process per forward pass
    global_batch_size: int = 0           # effective batch; 0 = micro x processes x gradient_accumulation_steps
    gradient_accumulation_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    lr_schedule: str = "cosine"          # after warm-up: cosine | linear | constant
    warmup_ratio: float = 0.03           # fraction of all steps spent warming up linearly
    warmup_steps: int = 0                # > 0: overrides warmup_ratio
    min_lr_ratio: float = 0.0            # the decay ends at lr x min_lr_ratio
    grad_clip: float = 1.0               # global gradient-norm clipping; 0 = off
    gradient_checkpointing: bool = False
    precision: str = "auto"              # auto: bf16 on GPU, fp32 on CPU
    save_every: int = 0                  # checkpoint every N optimizer steps; 0 = never
    keep_checkpoints: int = 2            # newest checkpoints kept on disk (0 = all)
    log_every: int = 1                   # metrics.jsonl / TensorBoard every N steps
    progress: bool = True                # tqdm bar on rank 0
    torch_threads: int = 0               # > 0: torch.set_num_threads (tiny models on a busy CPU: 1)

    def __post_init__(self) -> None:
        positive = ("epochs", "micro_batch_size", "gradient_accumulation_steps", "log_every")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("max_steps", "global_batch_size", "warmup_steps", "save_every", "torch_threads",
                    "weight_decay", "grad_clip", "keep_checkpoints"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule: must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"adam_betas: expected two numbers, got {self.adam_betas}")

    def accumulation(self, world_size: int) -> int:
        """Gradient-accumulation steps for `world_size` processes."""
        if not self.global_batch_size:
            return self.gradient_accumulation_steps
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(f"global_batch_size: {self.global_batch_size} is not a multiple of "
                              f"micro_batch_size x processes = {self.micro_batch_size} x {world_size}")
        return self.global_batch_size // per_step


@dataclass
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for key in ("r", "alpha"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")


@dataclass
class MethodSection:
    """What every method's run-YAML section holds: its records and how it optimises; each method's
    section adds its own keys."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class RecipeRun:
    """The run-wide keys a recipe config adds to its section: where it writes, its seed, its base."""

    run_dir: str = "checkpoints/run"
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)

    def pinned_inputs(self) -> dict[str, str]:
        """What it starts from, as settings that still hold when it trains in another folder (a
        selection trial's); the recipes whose defaults are relative to `run_dir` say them here."""
        return {}

    def for_trial(self, overrides: dict[str, Any], run_dir: str | Path):
        """A copy that trains into `run_dir` with the nested `overrides` (a sweep's or a selection's
        trial), starting from the same models as this config (`pinned_inputs`)."""
        return replace_nested(self, merge(merge(self.pinned_inputs(), overrides), {"run_dir": str(run_dir)}))


SHARED_KEYS = ("seed", "model", "safety")


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def as_model_spec(model: Any) -> ModelSpec:
    """A ModelSpec from a spec, or from anything with `.path` and `.seed` (input settings default)."""
    if isinstance(model, ModelSpec):
        return dataclasses.replace(model)
    return ModelSpec(path=model.path, seed=model.seed)


def recipe_config(cls: type, name: str, section: Any, *, run_root: str | Path, seed: int = 0, model: Any = None,
                  safety: SafetyConfig | None = None):
    """The recipe config `cls` of method `name` from a parsed run-YAML section and the run's shared
    settings (what the pipeline does for each training stage); it writes into `<run_root>/<name>`.
    `model` only needs `.path` and `.seed`; `safety` is used where `cls` has the key."""
    values = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    values.update(run_dir=str(RunLayout(run_root).stage(name).root), seed=seed)
    if model is not None:
        values["model"] = as_model_spec(model)
    if safety is not None and "safety" in _field_names(cls):
        values["safety"] = safety
    return cls(**values)


def run_section(path: str | Path, data: dict[str, Any], name: str, cls: type) -> dict[str, Any]:
    """Recipe config `cls` of the `name:` section of run YAML `data` (read from `path`), as a flat dict.

    The section's keys are checked against `cls` (less the run-wide keys); the run-wide `seed`,
    `model` and `safety` that `cls` has are copied in; the run writes into `<run_dir>/<name>`; and a
    section naming no records reads `<data root>/records/<name>.jsonl` (see `default_records`).
    """
    section = data.get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: {name}: expected a mapping")
    fields = _field_names(cls)
    own = fields - {"run_dir", *SHARED_KEYS}
    unknown = sorted(set(section) - own)
    if unknown:
        raise ConfigError(f"{path}: {name}.{unknown[0]}: unknown key (known keys: {', '.join(sorted(own))})")
    shared = {k: data[k] for k in SHARED_KEYS if k in data and k in fields}
    root = Path(data.get("run_dir", "checkpoints/run"))
    flat = {**shared, **section, "run_dir": str(RunLayout(root).stage(name).root)}
    if not (flat.get("data") or {}).get("train"):
        flat["data"] = {**(flat.get("data") or {}), "train": str(default_records(root, data.get("data_dir") or "", name))}
    return flat


def load_recipe_config(name: str, cls: type, path: str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """The config `cls` of method `name` from a YAML file plus `key=value` overrides.

    A run YAML (e.g. configs/tiny.yaml) gives the shared `seed`/`model`/`safety` keys and its
    `name:` block (the section's defaults when there is none); the run writes into
    `<run_dir>/<name>`. A flat YAML holding only keys of `cls` is read as the config itself.
    Overrides use the config's keys: `train.lr=1e-3`, `data.train=DIR/records/stage1.jsonl`.
    """
    data = read_yaml(path)
    flat = run_section(path, data, name, cls) if name in data or not set(data) <= _field_names(cls) else data
    try:
        return from_dict(cls, merge(flat, parse_overrides(list(overrides))))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {name}: {exc}") from None


def data_root(run_root: str | Path, data_dir: str = "") -> Path:
    """A run YAML's data folder: its `data_dir`, else the concept world `safevlm run` builds
    (`RunLayout.world_data`). Both hold `records/<stage>.jsonl` and the UnsafeConcepts-layout files."""
    return RunLayout(run_root).data(data_dir).root


def default_records(run_root: str | Path, data_dir: str, stage: str) -> Path:
    """A stage's records when its section names none: `<data root>/records/<stage>.jsonl`."""
    return RunLayout(run_root).data(data_dir).records(stage)


def resolve_base_path(cfg) -> str:
    """The model spec a stage starts from (`init_from`, else the `model` section); `init_from:
    stage0` is the model stage 0 of the same run exported."""
    init_from = getattr(cfg, "init_from", "")
    if not init_from:
        return cfg.model.path
    if init_from == INIT_FROM_BASE_STAGE:
        return str(RunLayout(Path(cfg.run_dir).parent).base_model)
    return init_from
