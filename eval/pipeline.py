"""One evaluation run from folder to report: items -> cached, sharded answers -> scores -> files.

Why a module of its own: the CLI (`safevlm eval ...`), the end-to-end pipeline and the tests all run
evaluations the same way; each `run_*` takes a ready model runner (so a test can pass a model it just
trained) and returns the results dict that `eval.report.write_results` wrote on rank 0 (None on the
other ranks of a `torchrun`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

from eval.benchmarks import general, rtvlm
from eval.benchmarks import unsafeconcepts as uc
from eval.benchmarks.protocols import MEASUREMENT, RLHF_TEST, protocol_items
from eval.benchmarks.safe_images import load_safe_images
from eval.core.cache import Cache
from eval.core.items import MULTIPLE_CHOICE, EvalItem
from eval.core.labeling import Labeler, build_labelers
from eval.core.models import GenerationSettings, ModelRunner
from eval.generation import GenerationResult, answer_items
from eval.judge_check import check_answers, judge_accuracy
from eval.report import write_results
from runtime.distributed import DistContext
from runtime.layout import EvalLayout
from safety_modules.configio import ConfigError, to_dict
from safety_modules.input_format import CONVERSATION_NAMES, IMAGE_PREPROCESS, PROCESSOR_PREPROCESS


@dataclass
class EvalConfig:
    """Settings of an evaluation run (YAML section `eval`; CLI flags override)."""

    generation: GenerationSettings = field(default_factory=GenerationSettings)
    batch_size: int = 16
    progress: bool = True
    image_preprocess: Literal[IMAGE_PREPROCESS] = PROCESSOR_PREPROCESS    # pad_to_square: LLaVA-1.5's own
    conversation: Literal[CONVERSATION_NAMES] = ""     # "": the processor's chat template; llava_v1: the original's
    judge_check: int = 8        # questions per task whose labelled answers score each labeller (0: none)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.judge_check < 0:
            raise ConfigError(f"judge_check: must be >= 0, got {self.judge_check}")


def open_cache(cache: Cache | str | Path | None, out: Path, table: str = "responses") -> Cache | None:
    """A Cache object, a path to one, None for the default `<out>/cache.sqlite`, or False for none."""
    if cache is False:
        return None
    if isinstance(cache, Cache):
        return cache
    return Cache(Path(cache) if cache else EvalLayout(out).cache, table=table)


def _results(benchmark: str, runner: ModelRunner, cfg: EvalConfig, gen: GenerationResult, ctx: DistContext | None,
             cache: Cache | None, data: dict) -> dict:
    """What every results.json starts with: the benchmark, the model, the settings, the data, the generation."""
    return {
        "benchmark": benchmark,
        "model": {"name": runner.name, "kind": runner.kind, "fingerprint": runner.fingerprint},
        "settings": {**to_dict(cfg.generation), "batch_size": cfg.batch_size},
        "data": data,
        "generation": {"generated": gen.generated, "from_cache": gen.from_cache,
                       "world_size": ctx.world_size if ctx else 1, "per_rank": gen.per_rank,
                       "cache": str(cache.path) if cache is not None and cache.path else None},
    }


def _answer_and_score(benchmark: str, items: Sequence[EvalItem], runner: ModelRunner, cfg: EvalConfig,
                      cache: Cache | str | Path | None, out: Path, ctx: DistContext | None,
                      on_batch: Callable[[int, int], None] | None,
                      score: Callable[[dict[str, str]], dict], data: dict) -> tuple[dict, dict] | None:
    """Answer `items` on every rank (cached, sharded), then on rank 0 score the answers with `score`:
    (the results so far, the scored {"records", "metrics"}); None on the other ranks."""
    store = open_cache(cache, out)
    gen = answer_items(items, runner, cfg.generation, cache=store, batch_size=cfg.batch_size, ctx=ctx,
                       progress=cfg.progress, on_batch=on_batch, desc=benchmark)
    if ctx is not None and not ctx.is_main:
        return None
    scored = score(gen.answers)
    return _results(benchmark, runner, cfg, gen, ctx, store, data), scored


def run_unsafeconcepts(runner: ModelRunner, data: str | Path, out: str | Path, *, split: str | None = None,
                       protocol: str = MEASUREMENT, safe_data: str | Path | None = None,
                       limit: int | None = None, sample: int | None = None, seed: int = 0,
                       tasks: Sequence[str] | None = None, labelers: Mapping[str, Labeler] | None = None,
                       classifier: str | Path | None = None, second_classifier: str | Path | None = None,
                       rules: bool = True, cfg: EvalConfig | None = None, cache: Cache | str | Path | None = None,
                       ctx: DistContext | None = None,
                       on_batch: Callable[[int, int], None] | None = None) -> dict | None:
    """UnsafeConcepts under `protocol` (`eval.benchmarks.protocols`: `measurement` = perception, image
    and text-only alignment; `rlhf-test` = the reference's RLHF test, greedy) on an UnsafeConcepts-layout
    folder, with the safe images of `safe_data` (a folder as the reference writes it) when given."""
    cfg = cfg or EvalConfig()
    if protocol == RLHF_TEST:                         # the reference's RLHF test decodes greedily
        cfg = replace(cfg, generation=replace(cfg.generation, greedy=True))
    out = Path(out)
    ds = uc.load_unsafeconcepts(data)
    safe = load_safe_images(safe_data) if safe_data else None
    items = protocol_items(protocol, ds, safe, split, tasks, limit=limit, sample=sample, seed=seed)
    labelers = labelers if labelers is not None else build_labelers(classifier, second_classifier, rules)
    images = {(it.meta["is_safe"], it.meta["image"]) for it in items if "image" in it.meta}
    done = _answer_and_score(
        "unsafeconcepts", items, runner, cfg, cache, out, ctx, on_batch,
        lambda answers: uc.score(items, answers, labelers),
        {"root": str(Path(data)), "protocol": protocol, "split": split or "all",
         "safe_data": str(Path(safe_data)) if safe_data else None, "limit": limit, "sample": sample,
         "n_images": sum(1 for is_safe, _ in images if not is_safe),
         "n_safe_images": sum(1 for is_safe, _ in images if is_safe),
         "n_items": len(items), "tasks": sorted({it.task for it in items})})
    if done is None:
        return None
    results, scored = done
    results["labelers"] = list(labelers)
    results["metrics"] = {**scored["metrics"], "protocol": protocol}
    check = {"labelers": {}, "records": []}
    if cfg.judge_check:
        check = judge_accuracy(check_answers(items, cfg.judge_check, seed), labelers)
        results["judge_check"] = {"questions_per_task": cfg.judge_check, "n": len(check["records"]),
                                  "labelers": check["labelers"]}
    write_results(out, results, scored["records"], check["records"])
    return results


def run_rtvlm(runner: ModelRunner, data: str | Path, out: str | Path, judge, *, subsets: Sequence[str] | None = None,
              limit: int | None = None, sample: int | None = None, seed: int = 0, cfg: EvalConfig | None = None,
              cache: Cache | str | Path | None = None, ctx: DistContext | None = None,
              on_batch: Callable[[int, int], None] | None = None) -> dict | None:
    """The RTVLM subsets answered, judged by `judge` (see eval.judges), scored per subtask/aspect."""
    cfg = cfg or EvalConfig()
    out = Path(out)
    items = rtvlm.load_rtvlm(data, subsets)
    if limit is not None or sample is not None:
        by_subset: dict[str, list[EvalItem]] = {}
        for it in items:
            by_subset.setdefault(it.meta["subset"], []).append(it)
        items = [it for group in by_subset.values() for it in uc.subsample(group, limit=limit, sample=sample, seed=seed)]
    done = _answer_and_score(
        "rtvlm", items, runner, cfg, cache, out, ctx, on_batch, lambda answers: rtvlm.score(items, answers, judge),
        {"root": str(Path(data)), "subsets": sorted({it.meta["subset"] for it in items}),
         "limit_per_subset": limit, "sample_per_subset": sample, "n_items": len(items)})
    if done is None:
        return None
    results, scored = done
    results["metrics"] = scored["metrics"]
    write_results(out, results, scored["records"])
    return results


def run_general(runner: ModelRunner, data: str | Path, out: str | Path, *, split: str | None = "heldout_render",
                limit: int | None = None, sample: int | None = None, seed: int = 0,
                labelers: Mapping[str, Labeler] | None = None, classifier: str | Path | None = None,
                cfg: EvalConfig | None = None, cache: Cache | str | Path | None = None,
                ctx: DistContext | None = None) -> dict | None:
    """MME-style yes/no (accuracy, accuracy+) or the concept world's multiple choice and captions."""
    cfg = cfg or EvalConfig()
    out = Path(out)
    items = general.load_general(data, split=split, limit=limit, sample=sample, seed=seed)
    if labelers is None and any(it.task == MULTIPLE_CHOICE for it in items):
        labelers = build_labelers(classifier, None, rules=True)
    done = _answer_and_score(
        "general", items, runner, cfg, cache, out, ctx, None, lambda answers: general.score(items, answers, labelers),
        {"root": str(Path(data)), "split": split, "limit": limit, "sample": sample, "n_items": len(items)})
    if done is None:
        return None
    results, scored = done
    results["labelers"] = list(labelers or {})
    results["metrics"] = scored["metrics"]
    write_results(out, results, scored["records"])
    return results
