"""Answer `EvalItem`s with a model runner: cached, sharded over ranks, batched, with a progress bar.

Why this order of work: look every item up in the response cache first, then generate only the
missing ones in full batches of similar length (left padding wastes little), writing each finished
batch to the cache at once. An interrupted run therefore resumes with full batches and a rerun
generates nothing. Items are sorted by question length before sharding, so each rank gets a
balanced mix and its batches stay length-bucketed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from PIL import Image
from tqdm.auto import tqdm

from eval.core.cache import Cache, content_key, file_hash
from eval.core.items import BLANK, DataError, EvalItem
from eval.core.models import GenerationSettings, ModelRunner, item_seed
from runtime.distributed import DistContext
from safety_modules.images import load_image

CACHE_VERSION = "response/v1"
GAP = 8  # white pixels between images composed side by side


def compose(images: Sequence[Image.Image]) -> Image.Image:
    """Several images side by side at a common height, on white (single-image models see one picture)."""
    if len(images) == 1:
        return images[0]
    height = min(im.height for im in images)
    scaled = [im.resize((max(1, round(im.width * height / im.height)), height)) for im in images]
    canvas = Image.new("RGB", (sum(im.width for im in scaled) + GAP * (len(scaled) - 1), height), (255, 255, 255))
    x = 0
    for im in scaled:
        canvas.paste(im, (x, 0))
        x += im.width + GAP
    return canvas


def item_image(item: EvalItem, runner: ModelRunner) -> Image.Image:
    """The one image the model sees for `item` (blank, a file, or files composed)."""
    if item.images == (BLANK,):
        return runner.blank_image()
    return compose([load_image(path) for path in item.images])


def image_hashes(item: EvalItem) -> list[str]:
    out = []
    for path in item.images:
        if path == BLANK:
            out.append("blank")
            continue
        try:
            out.append(file_hash(path))
        except FileNotFoundError:
            raise DataError(f"item {item.id}: image file not found: {path}") from None
    return out


def response_key(runner: ModelRunner, item: EvalItem, settings: GenerationSettings) -> str:
    """Cache key: model fingerprint (+ adapter), question, image contents, generation settings."""
    return content_key(CACHE_VERSION, runner.fingerprint, item.question, image_hashes(item), settings.cache_fields())


@dataclass
class GenerationResult:
    answers: dict[str, str]
    generated: int = 0            # summed over ranks
    from_cache: int = 0
    per_rank: list[dict] = field(default_factory=list)


def answer_items(items: Sequence[EvalItem], runner: ModelRunner, settings: GenerationSettings,
                 cache: Cache | None = None, batch_size: int = 16, ctx: DistContext | None = None,
                 progress: bool = True, on_batch: Callable[[int, int], None] | None = None,
                 desc: str = "generating") -> GenerationResult:
    """Answers of every item (merged over ranks), keyed by item id.

    `on_batch(done, total)` is called after each generated batch of this rank (progress hooks).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    ctx = ctx or DistContext()
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"duplicate item id {dup!r}")
    ordered = sorted(items, key=lambda it: (len(it.question), it.id))
    mine = ctx.shard(ordered)
    keys = {it.id: response_key(runner, it, settings) for it in mine}
    answers: dict[str, str] = {}
    missing: list[EvalItem] = []
    for it in mine:
        hit = cache.get(keys[it.id], require=("text",)) if cache is not None else None
        if hit is not None:
            answers[it.id] = hit["text"]
        else:
            missing.append(it)
    cached = len(answers)
    bar = tqdm(total=len(mine), initial=cached, desc=desc, unit="item", disable=not (progress and ctx.is_main),
               dynamic_ncols=True)
    try:
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            images = [item_image(it, runner) for it in chunk]
            seeds = [item_seed(settings.seed, keys[it.id]) for it in chunk]
            texts = runner.generate([it.question for it in chunk], images, settings, seeds)
            if cache is not None:
                cache.put_many({keys[it.id]: {"text": text} for it, text in zip(chunk, texts)})
            answers.update({it.id: text for it, text in zip(chunk, texts)})
            bar.update(len(chunk))
            if on_batch is not None:
                on_batch(len(answers), len(mine))
    finally:
        bar.close()
    stats = {"rank": ctx.rank, "items": len(mine), "generated": len(missing), "from_cache": cached,
             "unreadable_cache_rows": cache.unreadable if cache is not None else 0}
    merged: dict[str, str] = {}
    per_rank = []
    for part, part_stats in ctx.gather((answers, stats)):
        merged.update(part)
        per_rank.append(part_stats)
    return GenerationResult(answers=merged, generated=sum(s["generated"] for s in per_rank),
                            from_cache=sum(s["from_cache"] for s in per_rank), per_rank=per_rank)
