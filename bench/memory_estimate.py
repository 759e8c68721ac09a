"""Expected GPU memory per GPU of every training stage at LLaVA-1.5-7B shape, ZeRO-2 and ZeRO-3.

Arithmetic, not a measurement: the model is built on the `meta` device (no memory, no GPU), the
safety modules and the stage-2 LoRA are attached as the recipes attach them, and the parameters each
stage trains are counted exactly. Memory per GPU is then the usual mixed-precision accounting
(DeepSpeed bf16 + AdamW):
  frozen weights     2 B/param      ZeRO-2: whole on every GPU      ZeRO-3: / N (+ live gathered params)
  trainable weights  2 B/param      ZeRO-2: whole                   ZeRO-3: / N
  gradients          2 B/param      / N (both stages partition them)
  fp32 master + Adam 12 B/param     / N
  communication buckets (the JSON in configs/deepspeed/: 2 x 200M elements for ZeRO-2, 1e9 live
  parameters for ZeRO-3, both in bf16)
plus activations of one micro-batch: per LLM layer ~40 bytes x tokens x hidden (flash/SDPA
attention, SwiGLU MLP, bf16); with gradient checkpointing only each layer's input (2 bytes x tokens x
hidden) is kept and one layer is recomputed at a time; logits cost 10 bytes x tokens x vocabulary
(bf16 logits, fp32 log-softmax and its gradient). PPO's rollout adds the KV cache of its generation.
The frozen vision tower keeps no activations. Allocator fragmentation comes on top (10-20%).

`python bench/memory_estimate.py [--gpus 8] [--json]` prints one table; the README quotes it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

GIB = 2 ** 30
LAYER_BYTES_PER_TOKEN_HIDDEN = 40     # activations of one decoder layer without checkpointing
LOGIT_BYTES = 10                      # bf16 logits + fp32 log-softmax + its gradient
ZERO2_BUCKETS = 2 * 200_000_000 * 2   # reduce + allgather buckets, bf16
ZERO3_LIVE = 1_000_000_000 * 2        # stage3_max_live_parameters, bf16


@dataclass
class StagePlan:
    """What one stage of configs/llava-1.5-7b.yaml trains and feeds per GPU."""

    name: str
    trainable: int
    frozen: int                        # every other parameter in memory (the base, frozen modules)
    micro_batch: int
    tokens: int                        # sequence length of one sample
    checkpointing: bool
    sequences_per_sample: int = 1      # DPO: chosen and rejected
    kv_cache_batch: int = 0            # PPO: prompts generated at once


def count_parameters(shape: str) -> dict[str, int]:
    """Parameter counts of the base, the safety modules and the stage-2 LoRA, from a meta-device build."""
    from safety_modules import add_lora, attach
    from base_models.shapes import lora_rank, random_llava, safety_config

    base, processor = random_llava(shape, "meta")
    total = sum(p.numel() for p in base.parameters())
    with torch.device("meta"):
        model = attach(base, safety_config(shape), processor)
        safety = {name: sum(p.numel() for p in child.parameters()) for name, child in model.safety.named_children()}
        tokens = sum(p.numel() for p in model.safety.parameters(recurse=False))
        add_lora(model, r=lora_rank(shape), alpha=16)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    from PIL import Image
    from safety_modules.prompting import build_prompt
    prompt = build_prompt(processor, "Is this image safe for viewing on social media?")
    length = processor(images=[Image.new("RGB", (336, 336))], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    text = base.config.text_config
    return {"base": total, "projector": safety["projector"], "head": safety["head"], "tokens": tokens, "lora": lora,
            "prompt_tokens": length + safety_config(shape).num_safety_tokens, "hidden": text.hidden_size,
            "layers": text.num_hidden_layers, "vocab": text.vocab_size}


def stage_plans(c: dict[str, int], response: int = 64) -> list[StagePlan]:
    """The stages as configured in configs/llava-1.5-7b.yaml (micro-batches, checkpointing)."""
    prompt, full = c["prompt_tokens"], c["prompt_tokens"] + response
    safety = c["projector"] + c["head"] + c["tokens"]
    on_top = c["lora"] + c["tokens"]                          # PPO, SFT, DPO: head and projector frozen
    base, projector, head = c["base"], c["projector"], c["head"]
    return [
        StagePlan("stage1", safety, base, 16, prompt, checkpointing=True),
        StagePlan("stage2", c["lora"] + c["tokens"] + head, base + projector, 16, full, checkpointing=True),
        StagePlan("ppo", on_top + c["hidden"] + 1, base + projector + head, 8, full, checkpointing=True,
                  kv_cache_batch=16),
        StagePlan("sft", on_top, base + projector + head, 16, full, checkpointing=True),
        StagePlan("dpo", on_top, base + projector + head, 8, full, checkpointing=True, sequences_per_sample=2),
    ]


def activations(c: dict[str, int], s: StagePlan) -> int:
    tokens = s.micro_batch * s.sequences_per_sample * s.tokens
    layer = LAYER_BYTES_PER_TOKEN_HIDDEN * tokens * c["hidden"]
    kept = (2 * tokens * c["hidden"] * c["layers"] + layer) if s.checkpointing else layer * c["layers"]
    logits = LOGIT_BYTES * tokens * c["vocab"]
    kv = 2 * 2 * c["layers"] * s.kv_cache_batch * s.tokens * c["hidden"]     # k and v, bf16
    return max(kept + logits, kv)


def per_gpu(c: dict[str, int], s: StagePlan, zero: int, gpus: int) -> dict[str, float]:
    states = {
        "frozen": 2 * s.frozen / (gpus if zero == 3 else 1),
        "trainable": 2 * s.trainable / (gpus if zero == 3 else 1),
        "grads": 2 * s.trainable / gpus,
        "optimizer": 12 * s.trainable / gpus,
        "buffers": ZERO3_LIVE if zero == 3 else ZERO2_BUCKETS,
        "activations": activations(c, s),
    }
    out = {k: round(v / GIB, 2) for k, v in states.items()}
    out["total"] = round(sum(states.values()) / GIB, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llava-1.5-7b")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args()
    counts = count_parameters(args.shape)
    rows = {}
    for plan in stage_plans(counts):
        rows[plan.name] = {"trainable_M": round(plan.trainable / 1e6, 1), "micro_batch": plan.micro_batch,
                           "tokens": plan.tokens, **{f"zero{z}": per_gpu(counts, plan, z, args.gpus) for z in (2, 3)},
                           "one_gpu_zero2": per_gpu(counts, plan, 2, 1)["total"]}
    if args.json:
        print(json.dumps({"shape": args.shape, "gpus": args.gpus, "counts": counts, "stages": rows}))
        return
    print(f"{args.shape}: base {counts['base'] / 1e9:.2f}B, safety modules "
          f"{(counts['projector'] + counts['head'] + counts['tokens']) / 1e6:.1f}M, LoRA {counts['lora'] / 1e6:.1f}M; "
          f"estimated GiB per GPU on {args.gpus} GPUs (weights, states, buffers, activations; no fragmentation)")
    print(f"{'stage':8} {'trainable':>10} {'micro':>6} {'tokens':>7} {'ZeRO-2':>8} {'ZeRO-3':>8} {'1 GPU ZeRO-2':>13}")
    for name, r in rows.items():
        print(f"{name:8} {r['trainable_M']:>9}M {r['micro_batch']:>6} {r['tokens']:>7} {r['zero2']['total']:>8} "
              f"{r['zero3']['total']:>8} {r['one_gpu_zero2']:>13}")
    print(json.dumps({name: {"zero2": r["zero2"]["total"], "zero3": r["zero3"]["total"]} for name, r in rows.items()}))


if __name__ == "__main__":
    main()
