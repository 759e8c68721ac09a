"""Stage-2 training throughput of our DeepSpeed trainer, measured against references in one run.

CPU (default): stage-2 samples/s on the tiny model -- LoRA + safety modules, LM + weighted
classification loss -- with our trainer (DeepSpeed ZeRO-2, one process, fp32) against a plain
`transformers.Trainer` loop on the same model, data, batch, optimizer (AdamW) and schedule.
Target: ours / HF >= 1.0.

GPU (`--device cuda`): LLaVA-1.5-7B shape (random bf16 weights built from the config on the GPU,
the tiny tokenizer for ids), LoRA on every LLM linear layer, ZeRO-2, bf16, gradient checkpointing:
tokens/s with the safety modules attached against the same run without them (target >= 0.95),
and the fraction of the bf16 matmul rate measured in this run: tokens/s x 8 x params / (matmul
FLOP/s).

    python bench/trainer_throughput.py                    # CPU, tiny
    python bench/trainer_throughput.py --device cuda      # one GPU, 7B shape

Both sides are timed by the same forward pre-hook on the model, over the same steps after warm-up
(data loading and optimizer steps included). On CPU each side runs single-threaded in a fresh
process, interleaved; `ours_over_hf_trainer` compares samples per second of process CPU time (what
a step costs on an idle core -- wall clock on a shared machine also counts other people's work);
the wall-clock ratio is printed beside it. The last line of output is one JSON object.
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

from safety_modules import SafetyConfig, add_lora, attach  # noqa: E402
from training.collator import TrainingCollator  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.engine import Trainer  # noqa: E402
from training.recipes.stage0 import stage0_loss  # noqa: E402
from training.recipes.stage2 import stage2_loss  # noqa: E402
from training.records import load_records  # noqa: E402

ZERO2 = str(ROOT / "configs" / "deepspeed" / "zero2.json")
ANSWER = ("No. The image shows a weapon pointed at a person, which depicts violence; it is not "
          "appropriate to share on social media, and I would advise against posting it.")


def write_records(root: Path, n: int, size: int) -> Path:
    """n records with noise images of size x size, half unsafe; returns the records file."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "records").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        unsafe = i % 2
        lines.append(json.dumps({
            "id": str(i), "image": f"images/{i}.png", "safety_level": 2 if unsafe else 0,
            "risk_type": "violence" if unsafe else "none",
            "conversations": [{"from": "human", "value": f"<image>\nIs image {i} safe to post on social media?"},
                              {"from": "gpt", "value": ANSWER if unsafe else "Yes, it is a harmless picture."}]}))
    path = root / "records" / "stage2.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


class Stamps:
    """Wall and process-CPU time at each forward call of `model` (a pre-hook: the same clock for both
    sides). CPU time of a single-threaded process is what a step costs on an idle core; wall time on
    a shared machine also counts other people's work."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        model.register_forward_pre_hook(self._stamp)

    def _stamp(self, module, args) -> None:
        if module.training:
            self.wall.append(time.perf_counter())
            self.cpu.append(time.process_time())

    def rates(self, warmup: int, samples_per_step: int) -> dict[str, float]:
        steps = len(self.wall) - 1 - warmup
        return {"samples_per_s": steps * samples_per_step / (self.wall[-1] - self.wall[warmup]),
                "samples_per_cpu_s": steps * samples_per_step / (self.cpu[-1] - self.cpu[warmup])}


def ours(model, records, collate, loss_fn, cfg: TrainConfig, run_dir: Path, warmup: int) -> dict[str, float]:
    """Our trainer; the forward pre-hook fires once per micro-batch (accumulation 1 here)."""
    stamps = Stamps(model)
    trainer = Trainer(model, records, collate, loss_fn, cfg, run_dir, name="ours")
    trainer.fit()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = stamps.rates(warmup, trainer.global_batch)
    tokens_per_sample = sum(r["tokens"] for r in rows[warmup:]) / (len(rows[warmup:]) * trainer.global_batch)
    out["tokens_per_s"] = out["samples_per_s"] * tokens_per_sample
    out["loss"] = rows[-1]["loss"]
    return out


def hf_trainer(model, records, collate, cfg: TrainConfig, out: Path, warmup: int) -> dict[str, float]:
    """The same training with a plain transformers.Trainer (its defaults, AdamW, cosine schedule)."""
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments

    stamps = Stamps(model)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cfg.micro_batch_size, max_steps=cfg.max_steps,
        learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.grad_clip,
        weight_decay=cfg.weight_decay, optim="adamw_torch", report_to=[], logging_steps=10**6, save_strategy="no",
        use_cpu=True, remove_unused_columns=False, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    HFTrainer(model=model, args=args, train_dataset=records.dataset, data_collator=collate).train()
    return stamps.rates(warmup, cfg.micro_batch_size)


def tiny_stage2_model(seed: int = 0):
    from base_models.tiny import build_tiny_llava

    base, processor = build_tiny_llava(seed=seed)
    torch.manual_seed(seed)
    model = attach(base, SafetyConfig(num_safety_tokens=4, num_queries=4, projector_depth=1), processor)
    add_lora(model, r=8, alpha=16)
    model.safety.projector.requires_grad_(False)
    return model


def cpu_side(args) -> dict:
    """One side of the CPU comparison, in a process of its own (see run_cpu)."""
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(deepspeed=ZERO2, micro_batch_size=args.batch, max_steps=args.steps, lr=1e-3, warmup_steps=2,
                      torch_threads=args.threads, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_records(Path(tmp) / "world", n=args.batch * args.steps, size=32)
        model = tiny_stage2_model()
        records = load_records(data, model.safety_config.risk_types, 4)
        collate = TrainingCollator(model.processor)
        if args.side == "ours":
            return ours(model, records, collate, stage2_loss, cfg, Path(tmp) / "ours", args.warmup)
        return hf_trainer(model, records, collate, cfg, Path(tmp) / "hf", args.warmup)


def run_cpu(args) -> dict:
    """Each side in a fresh process (same threads): our trainer sets up a process group, and
    `transformers.Trainer` would then see a distributed launch and wrap the model in DDP."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(args.threads)
    runs: dict[str, list[dict]] = {"ours": [], "hf": []}
    for rep in range(args.repeats):               # interleaved: a busy machine slows both alike
        for side in ("ours", "hf"):
            cmd = [sys.executable, __file__, "--side", side, "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads", str(args.threads)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"{side} side failed:\n{done.stderr[-3000:]}")
            runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
        o, h = runs["ours"][-1], runs["hf"][-1]
        print(f"repeat {rep}: ours {o['samples_per_s']:.1f} samples/s ({o['samples_per_cpu_s']:.1f} per CPU-s), "
              f"transformers.Trainer {h['samples_per_s']:.1f} samples/s ({h['samples_per_cpu_s']:.1f} per CPU-s)",
              flush=True)
    best = {side: {k: max(r[k] for r in rs) for k in ("samples_per_s", "samples_per_cpu_s")}
            for side, rs in runs.items()}
    return {"device": "cpu", "model": "tiny", "batch": args.batch, "steps": args.steps, "threads": args.threads,
            "ours_samples_per_cpu_s": round(best["ours"]["samples_per_cpu_s"], 2),
            "hf_trainer_samples_per_cpu_s": round(best["hf"]["samples_per_cpu_s"], 2),
            "ours_over_hf_trainer": round(best["ours"]["samples_per_cpu_s"] / best["hf"]["samples_per_cpu_s"], 3),
            "ours_samples_per_s_wall": round(best["ours"]["samples_per_s"], 2),
            "hf_trainer_samples_per_s_wall": round(best["hf"]["samples_per_s"], 2),
            "ours_over_hf_trainer_wall": round(best["ours"]["samples_per_s"] / best["hf"]["samples_per_s"], 3)}


# -- GPU: LLaVA-1.5-7B shape ---------------------------------------------------------------------
def llava_7b(device: str):
    """LLaVA-1.5-7B shapes with random bf16 weights, frozen, and its processor (base_models/shapes.py)."""
    from base_models.shapes import random_llava

    model, processor = random_llava("llava-1.5-7b", device)
    model.train()                                 # as a freshly built model: gradient checkpointing acts in train mode
    model.requires_grad_(False)
    return model, processor


def matmul_flops(device: str, n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.time()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.time() - start)


def run_gpu(args) -> dict:
    from peft import LoraConfig, get_peft_model

    from safety_modules.lora import LLM_LINEAR_PATTERN

    cfg = TrainConfig(deepspeed=ZERO2, micro_batch_size=args.batch, max_steps=args.steps, lr=1e-5, warmup_steps=2,
                      gradient_checkpointing=True, precision="bf16", progress=False)
    safety_cfg = SafetyConfig(num_safety_tokens=64, projector_depth=3, projector_mlp_depth=2, num_queries=576)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_records(Path(tmp) / "world", n=args.batch * args.steps, size=336)
        for variant in ("without", "with"):
            torch.manual_seed(0)
            base, processor = llava_7b("cuda")
            params = sum(p.numel() for p in base.parameters())
            if variant == "with":
                model = attach(base, safety_cfg, processor)
                add_lora(model, r=args.lora_r, alpha=16)
                model.safety.projector.requires_grad_(False)
                collate, loss_fn = TrainingCollator(model.processor), stage2_loss
            else:
                lora = LoraConfig(r=args.lora_r, lora_alpha=16, target_modules=LLM_LINEAR_PATTERN)
                model = get_peft_model(base, lora)
                collate, loss_fn = TrainingCollator(processor), stage0_loss
            records = load_records(data, safety_cfg.risk_types, 4)
            out[variant] = ours(model, records, collate, loss_fn, cfg, Path(tmp) / variant, args.warmup)
            out[variant]["params"] = params
            print(f"{variant} modules: {out[variant]['tokens_per_s']:.0f} tokens/s, "
                  f"{out[variant]['samples_per_s']:.2f} samples/s")
            del model, base
            torch.cuda.empty_cache()
    peak = matmul_flops("cuda")
    fraction = out["with"]["tokens_per_s"] * 8 * out["with"]["params"] / peak
    return {"device": torch.cuda.get_device_name(0), "model": "llava-1.5-7b shape (random bf16)",
            "batch": args.batch, "lora_r": args.lora_r, "matmul_tflops": round(peak / 1e12, 1),
            "tokens_per_s_with": round(out["with"]["tokens_per_s"], 1),
            "tokens_per_s_without": round(out["without"]["tokens_per_s"], 1),
            "with_modules_over_without": round(out["with"]["tokens_per_s"] / out["without"]["tokens_per_s"], 3),
            "samples_with_over_without": round(out["with"]["samples_per_s"] / out["without"]["samples_per_s"], 3),
            "fraction_of_matmul_rate": round(fraction, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default: 8 on CPU, 8 on GPU)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 60 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    p.add_argument("--repeats", type=int, default=3, help="CPU: interleaved repeats, best of each side")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads (both sides)")
    p.add_argument("--lora-r", type=int, default=256, help="GPU: LoRA rank (the paper's 256)")
    p.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)   # internal: one CPU side
    args = p.parse_args()
    args.batch = args.batch or 8
    args.steps = args.steps or (60 if args.device == "cpu" else 20)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here")
    if args.side:
        result = cpu_side(args)
    else:
        result = run_cpu(args) if args.device == "cpu" else run_gpu(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
