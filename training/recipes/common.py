"""What every recipe shares: loading its records, writing its config, summary and before-metrics,
training with the metrics of the untrained model kept for a resume, exporting an adapter, and the
response-LM and head metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from safety_modules.adapter_io import save_adapter
from safety_modules.config import SafetyConfig
from safety_modules.configio import to_dict
from safety_modules.fileio import CorruptFileError, read_json, write_json_atomic
from safety_modules.labels import IGNORE_INDEX
from runtime.distributed import is_main
from runtime.layout import StageLayout
from training.config import DataConfig
from training.engine import Trainer
from training.records import RecordSet, load_records


def load_training_records(data: DataConfig, safety: SafetyConfig, *, require_answer: bool,
                          require_labels: bool, path: str | None = None) -> RecordSet:
    """The records of `data` (or of another file `path` with the same checks)."""
    source = path or data.train
    if not source:
        raise ValueError("data.train: no records file given (e.g. data.train=WORLD/records/stage1.jsonl)")
    return load_records(source, safety.risk_types, safety.num_safety_levels,
                        image_root=data.image_root or None, skip_bad_records=data.skip_bad_records,
                        require_answer=require_answer, require_labels=require_labels,
                        verify_images=data.verify_images, max_image_pixels=data.max_image_pixels,
                        max_records=data.max_records)


def write_json(path: Path, obj: Any) -> None:
    """Rank 0 writes, atomically; JSON with a trailing newline."""
    if is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, obj)


def save_run_config(run_dir: Path, cfg: Any) -> None:
    write_json(StageLayout(run_dir).config, to_dict(cfg))


def write_summary(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """The finished run's summary, written to its folder (rank 0) and returned."""
    write_json(StageLayout(run_dir).summary, summary)
    return summary


def measured_before(run_dir: Path, resume: bool, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Metrics of the untrained model, kept in run_dir so a resumed run reports the true start."""
    path = StageLayout(run_dir).before
    if resume and path.is_file():
        try:
            return read_json(path, "metrics of the untrained model")
        except CorruptFileError as exc:     # measured again below: the model is still untrained here
            logging.getLogger(__name__).warning("%s; measuring it again", exc)
    before = measure()
    write_json(path, before)
    return before


def fit_measured(trainer: Trainer, run_dir: Path, resume: bool, measure: Callable[[], Any]) -> tuple[Any, dict, Any]:
    """(metrics before, the last step's metrics, metrics after): `measure` runs on the untrained model
    (kept for a resume, see measured_before), the trainer resumes when asked and fits, `measure` again."""
    before = measured_before(run_dir, resume, measure)
    if resume:
        trainer.resume()
    last = trainer.fit()
    return before, last, measure()


def trainable_parameters(model) -> int:
    """Parameters that train (ZeRO-3's partitioned ones counted whole)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def export_adapter(trainer: Trainer, model, directory: Path) -> Path:
    """save_adapter with every safety (and LoRA) parameter gathered; rank 0 writes. Collective."""
    params = list(model.safety.parameters()) + [p for n, p in model.named_parameters() if "lora_" in n]
    with trainer.gather(params):
        if is_main():
            save_adapter(model, directory)
    trainer.barrier()
    return directory


def response_lm_metrics(engine, batch: dict[str, torch.Tensor], **forward_kwargs) -> dict[str, tuple]:
    """Per-sample summed token cross-entropy on response tokens, weighted by their count."""
    out = engine(**batch, **forward_kwargs)
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    metrics = {"lm_loss": ((losses * mask).sum(1), mask.sum(1))}
    if getattr(out, "safety_logits", None) is not None:
        metrics.update(head_accuracy(out, batch))
    return metrics


def head_accuracy(out, batch: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Safety-level, safe/unsafe and risk-type accuracy per sample (unlabelled samples weigh 0)."""
    level, risk = batch["safety_labels"], batch["risk_labels"]
    has_level, has_risk = (level != IGNORE_INDEX).float(), (risk != IGNORE_INDEX).float()
    pred_level, pred_risk = out.safety_logits.argmax(-1), out.risk_logits.argmax(-1)
    return {
        "level_accuracy": ((pred_level == level).float() * has_level, has_level),
        "unsafe_accuracy": (((pred_level > 0) == (level > 0)).float() * has_level, has_level),
        "risk_accuracy": ((pred_risk == risk).float() * has_risk, has_risk),
    }
