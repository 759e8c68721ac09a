"""What the guard costs, measured against the unchanged model in the same run.

Prints two ratios (medians over repeats, after warm-up):
- guard_over_prefill: a guard verdict (vision tower + safety projector + prompt embeddings + head)
  over one plain prefill of the same prompt and image (the base model's forward, no modules), both
  from tensors already on the device. `guard_api_over_prefill_api` is the same with each side's
  processor call (image preprocessing, tokenisation) included: `SafetyGuard.verdict` vs.
  processor + forward.
- guarded_over_plain_generate: `SafetyGuard.generate` (verdict, then greedy generation with the safety
  tokens in the sequence, reusing the guard's vision features; a policy that always passes, so text is
  really generated) over the base model's `generate` on the plain processor's input; 64 new tokens
  each (min_new_tokens = max_new_tokens, so lengths match), processor calls included on both sides.

Shapes: `tiny` (the embedded tiny LLaVA and configs/tiny.yaml's modules) or `llava-1.5-7b` (CLIP
ViT-L/14-336 + Llama-7B with random bf16 weights built on the GPU, the paper's modules: 64 safety
tokens, C-Abstractor depth 3, MLP depth 2, 576 queries). Nothing is downloaded.

    python bench/guard_overhead.py --device cpu --shape tiny
    python bench/guard_overhead.py --device cuda --shape llava-1.5-7b

The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from safety_modules import GuardPolicy, SafetyConfig, SafetyGuard, attach, build_prompt

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Describe the image in detail."
NEW_TOKENS = 64


def build_7b(device: str):
    """A LLaVA-1.5-7B-shaped model with random bf16 weights, its processor and the paper's modules."""
    from base_models.shapes import random_llava, safety_config

    model, processor = random_llava("llava-1.5-7b", device)
    return model, processor, safety_config("llava-1.5-7b")


def build(shape: str, device: str):
    """(base model, its own processor, safety config) for `shape` on `device`."""
    if shape == "tiny":
        from base_models.tiny import build_tiny_llava

        model, processor = build_tiny_llava(seed=0)
        cfg = SafetyConfig.from_yaml(REPO / "configs" / "tiny.yaml", section="safety")
        return model.to(device), processor, cfg
    if device != "cuda":
        raise SystemExit(f"--shape {shape} needs --device cuda (a 7B model on a CPU would take hours)")
    return build_7b(device)


def median_seconds(fns: dict[str, Callable[[], object]], device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time of each function; the functions are interleaved per repeat so that drift of
    the machine (clocks, other load) affects each side alike."""

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=["tiny", "llava-1.5-7b"], default="tiny")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats of the verdict and the prefill")
    parser.add_argument("--gen-repeats", type=int, default=5, help="timed repeats of each generate")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (0: torch's default); 1 is steadier on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")

    torch.manual_seed(0)
    base, processor, cfg = build(args.shape, args.device)
    model = attach(base, cfg, processor)
    never = cfg.num_safety_levels  # no verdict reaches it: the guard always passes, so text is generated
    guard = SafetyGuard(model, policy=GuardPolicy(refuse_at_level=never, instruct_at_level=never))

    side = base.config.vision_config.image_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    device = args.device

    def plain_inputs():
        batch = processor(images=[image], text=[build_prompt(processor, PROMPT)], return_tensors="pt")
        return {k: v.to(device) for k, v in batch.items()}

    def safe_inputs():
        batch = model.processor(images=[image], text=[build_prompt(model.processor, PROMPT)], return_tensors="pt")
        return {k: v.to(device) for k, v in batch.items()}

    plain, safe = plain_inputs(), safe_inputs()
    if device == "cuda":
        plain["pixel_values"] = plain["pixel_values"].to(base.dtype)
        safe["pixel_values"] = safe["pixel_values"].to(base.dtype)
    tower = base.model.vision_tower
    gen = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
               pad_token_id=processor.tokenizer.pad_token_id)

    @torch.no_grad()
    def prefill():  # what generate's first step does: the whole prompt, logits for the last position
        return base(**plain, logits_to_keep=1)

    @torch.no_grad()
    def prefill_api():
        return base(**plain_inputs(), logits_to_keep=1)

    @torch.no_grad()
    def guard_core():
        encoded = model.encode_images(safe["pixel_values"], safe.get("image_sizes"))
        return model.head_logits(safe["input_ids"], safe["attention_mask"], encoded)

    @torch.no_grad()
    def vision_tower():
        return tower(plain["pixel_values"], output_hidden_states=True)

    @torch.no_grad()
    def plain_generate():
        inputs = plain_inputs()
        if device == "cuda":
            inputs["pixel_values"] = inputs["pixel_values"].to(base.dtype)
        return base.generate(**inputs, **gen)

    def guarded_generate():
        return guard.generate([image], PROMPT, **gen)

    # the two generations must produce the same number of tokens for the ratio to mean anything
    plain_len = plain_generate().shape[1] - plain["input_ids"].shape[1]
    guarded_len = model.generate(**safe, **gen).shape[1]
    assert plain_len == guarded_len == NEW_TOKENS, (plain_len, guarded_len)
    assert guarded_generate()[0].action == "pass"

    t = median_seconds({"prefill": prefill, "guard": guard_core, "vision_tower": vision_tower,
                        "prefill_api": prefill_api, "guard_api": lambda: guard.verdict([image], PROMPT)},
                       device, args.warmup, args.repeats)
    g = median_seconds({"plain_generate": plain_generate, "guarded_generate": guarded_generate},
                       device, max(1, args.warmup - 1), args.gen_repeats)

    print(f"shape {args.shape} on {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else f" ({torch.get_num_threads()} threads)"))
    print(f"prompt tokens: plain {plain['input_ids'].shape[1]}, with safety tokens {safe['input_ids'].shape[1]}")
    for name, seconds in {**t, **g}.items():
        print(f"  {name:18s} {seconds * 1e3:10.2f} ms (median)")
    result = {
        "device": device,
        "shape": args.shape,
        "guard_over_prefill": round(t["guard"] / t["prefill"], 4),
        "guarded_over_plain_generate": round(g["guarded_generate"] / g["plain_generate"], 4),
        "guard_api_over_prefill_api": round(t["guard_api"] / t["prefill_api"], 4),
        "vision_tower_over_prefill": round(t["vision_tower"] / t["prefill"], 4),
        "ms": {name: round(seconds * 1e3, 3) for name, seconds in {**t, **g}.items()},
        "new_tokens": NEW_TOKENS,
        "repeats": {"prefill_and_guard": args.repeats, "generate": args.gen_repeats},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
