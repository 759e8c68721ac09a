"""What the SFT and DPO baselines share: their config keys, the stage-2 starting model, the held-out
slice of the training records, config loading and the learning-rate sweep.

Why the baselines start from the stage-2 model: PPO does, and the three methods must differ only in
how they use the same prompts and labels. The stage-2 adapter (safety modules + LoRA) is loaded
trainable; the LoRA and the LLM-side safety tokens are trained, the safety head, its tokens and the
projector stay as stage 2 left them (these losses never reach the head).

Why a held-out slice: each baseline must be tuned fairly without reading an evaluation split (the
reference DPO's lr 2e-6 barely moved its model). `heldout_fraction` of the training records
(seeded) is kept out of training; before/after metrics are reported on it and `sweep()` picks the
setting that does best there: most greedy answers judged right by the rule-based check
(`answer_accuracy`), ties broken by the method's own held-out loss. Nothing from the evaluation
splits is ever read. (A run with a validation split chooses in the pipeline instead, on that split,
with the same criterion and budget for every method: `safevlm/selection.py`.)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.distributed as dist

from safety_modules import has_lora, load_adapter
from safety_modules.configio import ConfigError, from_dict, merge, parse_overrides, read_yaml, to_dict
from safety_modules.prompting import encode_batch
from training.config import DataConfig, ModelSpec, TrainConfig, as_model_spec, resolve_base_path, run_section
from runtime.distributed import all_reduce, is_main
from training.engine import TrainingDiverged
from training.recipes import write_json
from training.records import RecordSet

log = logging.getLogger(__name__)



def baseline_train_defaults(lr: float) -> Callable[[], TrainConfig]:
    """TrainConfig defaults of the tiny baselines: stage 2's settings (configs/tiny.yaml) but 2 epochs
    (stage 2 already trained on the same kind of records) and each method's swept rate."""
    return lambda: TrainConfig(epochs=2, micro_batch_size=16, lr=lr, warmup_ratio=0.05, save_every=50,
                               torch_threads=1)


@dataclass
class BaselineSection:
    """Keys both baselines share (a `sft:` / `dpo:` block of a run YAML)."""

    init_from: str = ""          # base of the stage-2 adapter; "": the base recorded beside it, else `model`
    adapter: str = ""            # stage-2 adapter (safety modules + LoRA); "": <run_dir>/../stage2/adapter
    train_tokens: bool = True    # train the LLM-side safety tokens with the LoRA (head, projector: frozen)
    heldout_fraction: float = 0.1    # seeded share of the training records kept out of training
    eval_records: int = 256      # before/after metrics on at most this many records per split (0: all)
    answer_tokens: int = 32      # greedy answers of this many new tokens scored by the rule-based check (0: off)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=baseline_train_defaults(1e-4))

    def __post_init__(self) -> None:
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError(f"heldout_fraction: must be in [0, 1), got {self.heldout_fraction}")
        for key in ("eval_records", "answer_tokens"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")


# -- config loading ------------------------------------------------------------------------------
def load_baseline_config(name: str, cls: type, path: str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """The `cls` config of baseline `name` ("sft" / "dpo") from a YAML file plus key=value overrides.

    A run YAML (e.g. configs/tiny.yaml) gives the shared `seed`/`model` keys and its `name:` block
    (defaults when there is none); the run writes into `<run_dir>/<name>`. A flat YAML holding only
    keys of `cls` is read as the recipe config itself.
    """
    data = read_yaml(path)
    fields = {f.name for f in dataclasses.fields(cls)}
    if name in data or not set(data) <= fields:
        flat = run_section(path, data, name, cls)
    else:
        flat = data
    # On top of the class defaults, so that `train: {lr: ...}` keeps the other baseline train defaults
    # (from_dict would build a nested section from TrainConfig's own defaults).
    flat = merge(merge(to_dict(cls()), flat), parse_overrides(list(overrides)))
    try:
        return from_dict(cls, flat)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {name}: {exc}") from None


def baseline_config(cls: type, section: Any, *, run_dir: str | Path, seed: int = 0, model: Any = None):
    """The recipe config `cls` (SFTConfig / DPOConfig) from a parsed section (SFTSection / DPOSection)
    and a run's shared settings; the run writes into `run_dir` (e.g. `<root>/sft`). For the pipeline,
    like training.config.stage_config; `model` needs `.path` and `.seed`."""
    values = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    values.update(run_dir=str(run_dir), seed=seed)
    if model is not None:
        values["model"] = as_model_spec(model)
    return cls(**values)


def with_overrides(cfg: Any, overrides: dict[str, Any]):
    """A copy of dataclass config `cfg` with nested `overrides` applied (validated like a YAML)."""
    return from_dict(type(cfg), merge(to_dict(cfg), overrides))


# -- the starting model --------------------------------------------------------------------------
def stage2_adapter_path(cfg) -> Path:
    """`adapter`, else `<run_dir>/../stage2/adapter` (stage 2 of the same run)."""
    return Path(cfg.adapter) if cfg.adapter else Path(cfg.run_dir).parent / "stage2" / "adapter"


def baseline_base(cfg) -> ModelSpec:
    """The base (path, tiny-model seed) the stage-2 adapter was trained on.

    `init_from` when given; else the base named in the stage-2 run's `config.json` beside the
    adapter (so a run YAML whose stage 2 started from stage 0 needs no extra key, and an adapter is
    never put on a different base of the same shape); else the `model` section.
    """
    if cfg.init_from:
        return dataclasses.replace(cfg.model, path=resolve_base_path(cfg))
    recorded = stage2_adapter_path(cfg).parent / "config.json"
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


def baseline_base_path(cfg) -> str:
    """The path of `baseline_base(cfg)` (its tiny-model seed: `baseline_base(cfg).seed`)."""
    return baseline_base(cfg).path


def build_baseline_model(cfg):
    """Base + stage-2 adapter (safety modules + LoRA), with the baselines' trainable set."""
    adapter = stage2_adapter_path(cfg)
    if not adapter.is_dir():
        raise FileNotFoundError(f"adapter: stage-2 adapter folder {adapter} not found (run stage 2 first, or "
                                "set adapter=DIR)")
    spec = baseline_base(cfg)
    base, processor = spec.load()
    model = load_adapter(base, adapter, processor, trainable=True)
    if not has_lora(model):
        raise ValueError(f"adapter: {adapter} holds no LoRA (a stage-1 adapter?); SFT, DPO and PPO train the "
                         "stage-2 LoRA, so pass the adapter stage 2 exported")
    model.safety.requires_grad_(False)
    model.safety.llm_tokens.requires_grad_(cfg.train_tokens)
    return model


def trainable_parameters(model) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


# -- the held-out slice --------------------------------------------------------------------------
def split_heldout(records: RecordSet, fraction: float, seed: int):
    """(training rows, held-out rows or None): a seeded `fraction` of the records held out."""
    n = len(records)
    if not fraction:
        return records.dataset, None
    k = max(1, round(n * fraction))
    if k >= n:
        raise ValueError(f"heldout_fraction={fraction} leaves no training record of {n} in {records.path}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return records.dataset.select(sorted(order[k:])), records.dataset.select(sorted(order[:k]))


def limited(dataset, limit: int):
    """The first `limit` rows (all with 0): the slice before/after metrics are measured on."""
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


# -- answers, judged without a learned model ----------------------------------------------------------
def _rule_task(label: str) -> str | None:
    """The rule-based check's task for a record label; None for records it cannot judge."""
    if label in ("Safe", "Unsafe"):
        return "alignment"
    if label in ("A", "B", "C", "D"):
        return "perception"
    return None


@torch.no_grad()
def answer_accuracy(model, rows, batch_size: int, max_new_tokens: int, *, device: torch.device,
                    dtype: torch.dtype, synced_gpus: bool = False) -> dict[str, float]:
    """Share of labelled records whose greedy answer the rule-based check labels correctly (NA = wrong).

    Why: likelihood metrics alone reward degenerate models -- DPO's held-out loss keeps falling as
    the learning rate grows while the answers turn to noise (measured on the concept world) -- so
    the sweep ranks runs on what they answer. The judge is `response_classifier.rules`, neither the
    PPO reward classifier nor the evaluation's judge. Rows are sharded over the processes (every
    process generates the same number of batches; `synced_gpus` for ZeRO-3).
    """
    from safety_modules.images import load_image
    from safety_modules.prompting import build_prompt
    from response_classifier.rules import rule_based_label

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n = len(rows)
    mine = list(range(rank, n, world))
    valid = len(mine)
    per_rank = math.ceil(n / world)
    mine += [0] * (per_rank - valid)
    processor, tokenizer = model.processor, model.processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    totals = torch.zeros(3)                  # correct, NA, judged
    was_training = model.training
    model.eval()
    for start in range(0, per_rank, batch_size):
        batch_rows = [rows[j] for j in mine[start:start + batch_size]]
        enc = encode_batch(processor, [load_image(r["image"]) for r in batch_rows],
                           [build_prompt(processor, r["question"]) for r in batch_rows],
                           return_tensors="pt", padding="longest", padding_side="left")
        inputs = {k: v.to(device, dtype) if k == "pixel_values" else v.to(device) for k, v in enc.items()}
        new = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                             temperature=None, top_p=None, top_k=None, synced_gpus=synced_gpus)
        answers = tokenizer.batch_decode(new, skip_special_tokens=True)
        for k, (row, answer) in enumerate(zip(batch_rows, answers)):
            task = _rule_task(row.get("label") or "")
            if start + k >= valid or task is None:
                continue
            label = rule_based_label(row["question"], answer.strip(), task)
            totals += torch.tensor([float(label == row["label"]), float(label == "NA"), 1.0])
    model.train(was_training)
    totals = all_reduce(totals)
    if not totals[2]:
        return {}
    return {"answer_accuracy": (totals[0] / totals[2]).item(), "answer_na_rate": (totals[1] / totals[2]).item()}


def scored_answers(cfg, trainer, model, rows) -> dict[str, float]:
    """answer_accuracy with the run's settings ({} when `answer_tokens` is 0)."""
    if not cfg.answer_tokens:
        return {}
    return answer_accuracy(model, rows, cfg.train.micro_batch_size, cfg.answer_tokens, device=trainer.engine.device,
                           dtype=trainer.dtype, synced_gpus=trainer.zero_stage == 3 and trainer.world > 1)


# -- the sweep -----------------------------------------------------------------------------------
def parse_sweep(specs: list[str] | tuple[str, ...]) -> dict[str, list[Any]]:
    """["train.lr=1e-4,3e-4", "beta=0.1,0.5"] -> {"train.lr": [1e-4, 3e-4], "beta": [0.1, 0.5]}."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"--sweep {spec!r}: expected key=value1,value2,...")
        key, raw = spec.split("=", 1)
        values = [parse_overrides([f"v={v.strip()}"])["v"] for v in raw.split(",") if v.strip()]
        if not key.strip() or not values:
            raise ConfigError(f"--sweep {spec!r}: expected key=value1,value2,...")
        grid[key.strip()] = values
    return grid


def _trial_name(combo: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in combo.items())


def _sort_key(heldout: dict[str, float], metrics: list[tuple[str, str]]) -> tuple[float, ...]:
    """Lower is better, metric by metric; a missing or NaN value ranks last on that metric."""
    key = []
    for name, mode in metrics:
        value = heldout.get(name, float("nan"))
        key.append(float("inf") if not math.isfinite(value) else (value if mode == "min" else -value))
    return tuple(key)


def sweep(run: Callable[..., dict[str, Any]], cfg, grid: dict[str, list[Any]], metrics: list[tuple[str, str]],
          resume: bool = False) -> dict[str, Any]:
    """Train one run per grid point in `<run_dir>/sweep/<key=value,...>`, keep the best on the held-out slice.

    Every run trains on the same training records; runs are ranked on `summary["heldout_after"]` by
    `metrics`, a list of (name, "min"|"max") compared in order (the next breaks ties). A run that
    diverges is recorded and ranked out. The best run's adapter is copied to `<run_dir>/adapter`
    and its summary, with the whole table, written to `<run_dir>/summary.json` (and `sweep.json`).
    With `resume`, a grid point whose run finished is read back, an interrupted one continues.
    """
    for name, mode in metrics:
        if mode not in ("min", "max"):
            raise ValueError(f"sweep: mode of {name} must be 'min' or 'max', got {mode!r}")
    if not grid:
        raise ValueError("sweep: no values to try (e.g. --sweep train.lr=1e-4,3e-4,1e-3)")
    if not cfg.heldout_fraction:
        raise ValueError("sweep: heldout_fraction is 0, so there is no held-out slice of the training records "
                         "to compare the runs on; set heldout_fraction (e.g. 0.1)")
    run_dir = Path(cfg.run_dir)
    # Paths that default relative to run_dir are pinned: every trial starts from this run's model.
    pinned = {"adapter": str(stage2_adapter_path(cfg)),
              "init_from": baseline_base(cfg).path if cfg.init_from else ""}
    results, summaries = [], {}
    for values in itertools.product(*grid.values()):
        combo = dict(zip(grid, values))
        trial_dir = run_dir / "sweep" / _trial_name(combo)
        overrides = parse_overrides([f"{k}={v}" for k, v in combo.items()])
        trial = with_overrides(cfg, merge(merge(pinned, overrides), {"run_dir": str(trial_dir)}))
        done = trial_dir / "summary.json"
        try:
            summary = json.loads(done.read_text()) if resume and done.is_file() else run(trial, resume=resume)
        except TrainingDiverged as exc:             # a rate too high for this model: a result, not a crash
            results.append({"overrides": combo, "run_dir": str(trial_dir), "error": str(exc)})
            if is_main():
                log.warning("sweep %s: diverged (%s)", _trial_name(combo), exc)
            continue
        summaries[str(trial_dir)] = summary
        results.append({"overrides": combo, "run_dir": str(trial_dir), "adapter": summary["adapter"],
                        "heldout_before": summary["heldout_before"], "heldout_after": summary["heldout_after"]})
        if is_main():
            shown = ", ".join(f"{n} {summary['heldout_after'].get(n, float('nan')):.4f}" for n, _ in metrics)
            log.warning("sweep %s: held-out %s", _trial_name(combo), shown)
    ranked = sorted((r for r in results if "error" not in r), key=lambda r: _sort_key(r["heldout_after"], metrics))
    if not ranked:
        raise ValueError("sweep: every run diverged; try smaller values")
    best = ranked[0]
    table = {"metrics": [list(m) for m in metrics], "best": best, "runs": results}
    summary = dict(summaries[best["run_dir"]])
    summary.update(sweep=table, best_run_dir=best["run_dir"], adapter=str(run_dir / "adapter"))
    if is_main():
        target = run_dir / "adapter"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(best["adapter"], target)
    write_json(run_dir / "sweep.json", table)
    write_json(run_dir / "summary.json", summary)
    return summary
