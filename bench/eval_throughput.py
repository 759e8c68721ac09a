"""Items/s of the batched evaluator against answering one item at a time, same model, same run.

Why: the reference harnesses answer local models one item at a time; our evaluator batches
length-sorted items with left padding and the KV cache. Both sides here go through the same code
(`eval.generation.answer_items`, greedy, no cache) with batch size B and 1, on a model with the
safety modules attached, and both must produce the same answers.

    python bench/eval_throughput.py                       # tiny model on CPU (target >= 4x at batch 16)
    python bench/eval_throughput.py --shape llava-7b      # LLaVA-1.5-7B shape, random bf16 weights, GPU
                                                          # (target >= 10x at batch 16)
The last line of output is one JSON object: device, batch, batched_over_single, and the rates.
Random weights rarely emit end-of-sequence, and EOS is disabled so every answer has exactly
--max-new-tokens tokens on both sides (a fair, fixed amount of work).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from base_models.shapes import random_llava, safety_config  # noqa: E402
from base_models.tiny import build_tiny_llava  # noqa: E402
from eval.benchmarks.unsafeconcepts import PROMPTS  # noqa: E402
from eval.core.items import EvalItem  # noqa: E402
from eval.core.models import GenerationSettings, SafetyRunner  # noqa: E402
from eval.generation import answer_items  # noqa: E402
from safety_modules import SafetyConfig, attach  # noqa: E402


def tiny_model():
    base, processor = build_tiny_llava(seed=0)
    return attach(base, SafetyConfig(num_safety_tokens=4, num_queries=4), processor), 32


def llava7b_model(device: str):
    """LLaVA-1.5-7B shape (CLIP ViT-L/14-336 + Llama-7B), random bf16 weights, the paper's modules."""
    torch.manual_seed(0)
    base, processor = random_llava("llava-1.5-7b", device)
    return attach(base, safety_config("llava-1.5-7b"), processor), 336


def make_items(n: int, size: int, folder: Path, seed: int = 0) -> list[EvalItem]:
    rng = np.random.default_rng(seed)
    questions = PROMPTS["alignment"] + PROMPTS["alignment_text_only"]
    items = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        q = questions[i % len(questions)].replace("[unsafe concept]", f"concept number {i}")
        items.append(EvalItem(id=f"bench/{i}", task="alignment", question=q, images=(str(path),)))
    return items


def timed(items, runner, settings, batch: int, sync) -> tuple[float, dict]:
    sync()
    start = time.perf_counter()
    answers = answer_items(items, runner, settings, cache=None, batch_size=batch, progress=False).answers
    sync()
    return time.perf_counter() - start, answers


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "llava-7b"], default="tiny")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--items", type=int, default=None, help="items for the batched side (default 64 tiny, 64 7B)")
    p.add_argument("--single-items", type=int, default=None, help="items answered one at a time (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 16 tiny, 64 for 7B")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads, both sides (default 1: a tiny model's ops take microseconds, and "
                        "extra threads spin against other processes on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape == "llava-7b" and not device.startswith("cuda"):
        print("the LLaVA-7B shape needs a GPU (--device cuda)", file=sys.stderr)
        return 2
    if args.shape == "tiny":
        model, size = tiny_model()
        model = model.to(device)
    else:
        model, size = llava7b_model(device)
    model.eval()
    model.base.generation_config.eos_token_id = None  # fixed-length answers on both sides
    runner = SafetyRunner(model, fingerprint=f"bench-{args.shape}")
    settings = GenerationSettings(greedy=True, max_new_tokens=args.max_new_tokens or (16 if args.shape == "tiny" else 64))
    n_batched = args.items or 64
    n_single = args.single_items or 16
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:
        items = make_items(max(n_batched, n_single), size, Path(tmp))
        timed(items[:args.batch], runner, settings, args.batch, sync)       # warm-up both paths
        timed(items[:2], runner, settings, 1, sync)
        t_batched, batched = timed(items[:n_batched], runner, settings, args.batch, sync)
        t_single, single = timed(items[:n_single], runner, settings, 1, sync)
    same = sum(batched[k] == v for k, v in single.items())
    rate_b, rate_s = n_batched / t_batched, n_single / t_single
    print(f"shape {args.shape} on {device}: {settings.max_new_tokens} new tokens per item")
    print(f"batched (batch {args.batch}): {n_batched} items in {t_batched:.2f} s = {rate_b:.2f} items/s")
    print(f"one at a time:              {n_single} items in {t_single:.2f} s = {rate_s:.2f} items/s")
    print(f"answers identical on {same}/{len(single)} items answered both ways")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(json.dumps({"device": name, "shape": args.shape, "batch": args.batch,
                      "batched_over_single": round(rate_b / rate_s, 2), "batched_items_per_s": round(rate_b, 3),
                      "single_items_per_s": round(rate_s, 3), "max_new_tokens": settings.max_new_tokens,
                      "identical_answers": f"{same}/{len(single)}", "torch_threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
