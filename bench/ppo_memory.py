"""Peak memory and time of one PPO step: our one-trunk layout against the reference code's layout.

Layouts, same shapes, same batch, same hyper-parameters, one PPO step each (sample answers, score
them, reward them, one clipped policy + value update with AdamW):
- ours: ONE trunk. Policy = base + safety modules + LoRA; reference = the frozen starting policy on
  the same base (a frozen copy of the LoRA + a snapshot of the safety tokens, no second base);
  value = a linear head on the policy's last hidden state
  (one forward gives log-probs and values, one backward trains both); vision tower once per rollout.
- reference (the reference code's layout): separate policy (base + safety modules + LoRA),
  reference (a second base + the same safety modules, frozen) and value model (a third base + the
  safety modules + its own LoRA + value head), each running its own vision tower; the update runs a
  forward/backward through the policy and another through the value model.
Both layouts also hold the same reward model: a RoBERTa-base-shaped sequence classifier (the paper's
reward model), fed the sampled token ids (random weights: memory and time are what is measured).

Measured in a fresh subprocess per layout, so neither sees the other's allocations:
- CPU: peak resident memory of the process (`resource.getrusage(...).ru_maxrss`; tracemalloc does not
  see torch's allocator), total and above the process's size before the models were built;
- CUDA: `torch.cuda.max_memory_allocated()` from the end of building (the weights held) over the
  step (so transient buffers of random initialisation do not count).
Time: the wall time of one step (after `--warmup` untimed steps).

Shapes (random weights built from a config, nothing downloaded; the tiny tokenizer gives the ids):
- `llava-1.5-7b`: CLIP ViT-L/14-336 + Llama-7B in bf16, the paper's modules (64 safety tokens,
  C-Abstractor depth 3, MLP depth 2, 576 queries), stage-2 LoRA r 256, gradient checkpointing;
- `1b`: CLIP ViT-B/32-224 + a 0.95B Llama (width 2048, 16 layers), fp32 (~1.05B parameters);
- `small`: CLIP ViT-B/32-224 (6 layers) + a 0.2B Llama (width 1024, 8 layers), fp32;
- `tiny`: the embedded tiny LLaVA (a smoke test of this script).

    python bench/ppo_memory.py --device cpu --shape 1b
    python bench/ppo_memory.py --device cuda --shape llava-1.5-7b

The last line of output is one JSON object: device, shape, peak_memory_ratio (ours / reference),
step_time_ratio (ours / reference) and the figures behind them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = ("tiny", "small", "1b", "llava-1.5-7b")
LAYOUTS = ("ours", "reference")
QUESTION = "Is this image safe for viewing on social media?"


# -- models ------------------------------------------------------------------------------------------
def build_base(shape: str, device: str, dtype: torch.dtype):
    """(base LLaVA, processor, SafetyConfig, LoRA rank) for `shape`, random weights on `device`."""
    from base_models.shapes import lora_rank, random_llava, safety_config
    from safety_modules import SafetyConfig
    from base_models.tiny import build_tiny_llava

    if shape == "tiny":
        model, processor = build_tiny_llava(seed=0)
        cfg = SafetyConfig(num_safety_tokens=4, num_queries=4, projector_depth=1)
        return model.to(device, dtype), processor, cfg, 4
    model, processor = random_llava(shape, device, dtype)
    return model, processor, safety_config(shape), lora_rank(shape)


def build_reward_model(shape: str, device: str, dtype: torch.dtype):
    """RoBERTa-base shape (the paper's reward model); a small BERT for the tiny smoke test."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    kw = {} if shape != "tiny" else dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=128, vocab_size=1000)
    with torch.device(device):
        model = RobertaForSequenceClassification(RobertaConfig(num_labels=3, **kw)).to(dtype)
    return model.eval()


def reward_scores(reward_model, response: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log P(label) from the reward model on the sampled ids (folded into its vocabulary)."""
    vocab = reward_model.config.vocab_size
    ids = torch.cat([torch.zeros_like(response[:, :1]), response % (vocab - 3) + 3], dim=1)
    with torch.no_grad():
        logits = reward_model(input_ids=ids).logits.float()
    return torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)


# -- one step of each layout ---------------------------------------------------------------------
class Setup:
    def __init__(self, args, device: str, dtype: torch.dtype) -> None:
        from PIL import Image
        import numpy as np

        from safety_modules import add_lora, attach, build_prompt
        from training.rl.reference import REFERENCE_ADAPTER
        from training.rl.rollout import PolicyWithValue

        self.args, self.device, self.dtype = args, device, dtype
        base, processor, cfg, lora_r = build_base(args.shape, device, dtype)
        self.lora_r = args.lora_r or lora_r
        # the reference code's layout: a second and a third copy of the base (policy, reference, value)
        copies = [copy.deepcopy(base), copy.deepcopy(base)] if args.layout == "reference" else []
        torch.manual_seed(0)
        policy_model = add_lora(attach(base, cfg, processor), r=self.lora_r, alpha=16)
        policy_model.safety.requires_grad_(False)           # PPO's trainable set, chosen before the reference
        policy_model.safety.llm_tokens.requires_grad_(True)  # snapshot is taken
        self.policy = PolicyWithValue(policy_model)
        self.processor = policy_model.processor
        self.tokenizer = self.processor.tokenizer
        if args.layout == "reference":
            self.reference = attach(copies[0], cfg, processor)
            value_vlm = add_lora(attach(copies[1], cfg, processor), r=self.lora_r, alpha=16)
            for model in (self.reference, value_vlm):
                model.safety.load_state_dict(policy_model.safety.state_dict())
                model.safety.requires_grad_(False)
                model.eval()
            self.value = PolicyWithValue(value_vlm)
            value_vlm.base.delete_adapter(REFERENCE_ADAPTER)   # a value model holds no KL reference
            self.reference.requires_grad_(False)
            del copies
        if args.gradient_checkpointing:
            for model in self.trunks():
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.reward_model = build_reward_model(args.shape, device, dtype)
        trainable = [p for m in self.trained() for p in m.parameters() if p.requires_grad]
        self.trainable_parameters = sum(p.numel() for p in trainable)
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        side = base.config.vision_config.image_size
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(args.batch)]
        texts = [build_prompt(self.processor, QUESTION) for _ in range(args.batch)]
        enc = self.processor(images=images, text=texts, return_tensors="pt", padding="longest", padding_side="left")
        self.batch = {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
                      "pixel_values": enc["pixel_values"].to(device, dtype)}
        self.labels = torch.tensor([i % 2 for i in range(args.batch)], device=device)

    def trunks(self):
        return [self.policy.model] + ([self.reference, self.value.model] if self.args.layout == "reference" else [])

    def trained(self):
        return [self.policy] + ([self.value] if self.args.layout == "reference" else [])

    def step(self) -> None:
        """One PPO step: sample, score, reward, one clipped update."""
        from training.logprobs import token_logprobs
        from training.rl.losses import gae, kl_estimate, policy_loss, token_rewards, value_loss, whiten
        from training.rl.rollout import sample, score_tokens

        args = self.args
        rollout = sample(self.policy, self.batch, self.tokenizer, args.new_tokens, temperature=1.0, top_p=1.0,
                         min_new_tokens=args.new_tokens)
        P = rollout.prompt_len
        if args.layout == "ours":
            scored = score_tokens(self.policy, rollout)                   # policy + values, then the start
            old_logp, ref_logp, old_values = scored["logp"], scored["ref_logp"], scored["values"]
        else:
            with torch.no_grad():
                old_logp = token_logprobs(self.policy(rollout.input_ids, rollout.attention_mask, rollout.images, P,
                                                      with_value=False)["logits"].float(), rollout.response)
                ref_images = self.reference.encode_images(self.batch["pixel_values"])
                ref_logits = self.reference(rollout.input_ids, rollout.attention_mask, images=ref_images,
                                            run_head=False).logits[:, P - 1:-1]
                ref_logp = token_logprobs(ref_logits.float(), rollout.response)
                value_images = self.value.model.encode_images(self.batch["pixel_values"])
                old_values = self.value(rollout.input_ids, rollout.attention_mask, value_images, P)["values"].float()
        mask = rollout.response_mask.float()
        scores = whiten(reward_scores(self.reward_model, rollout.response, self.labels))
        rewards = token_rewards(scores, kl_estimate(old_logp, ref_logp) * mask, mask, 0.05)
        advantages, returns = gae(rewards, old_values, mask, 1.0, 0.95)
        advantages = whiten(advantages, mask)
        for model in self.trained():
            model.train()
        if args.layout == "ours":
            out = self.policy(rollout.input_ids, rollout.attention_mask, rollout.images, P)
            pg, _ = policy_loss(token_logprobs(out["logits"].float(), rollout.response), old_logp, advantages, mask, 0.2)
            loss = pg + 0.1 * value_loss(out["values"].float(), old_values, returns, mask, 0.2)
            loss.backward()
        else:
            out = self.policy(rollout.input_ids, rollout.attention_mask, rollout.images, P, with_value=False)
            pg, _ = policy_loss(token_logprobs(out["logits"].float(), rollout.response), old_logp, advantages, mask, 0.2)
            pg.backward()
            del out, pg
            values = self.value(rollout.input_ids, rollout.attention_mask, value_images, P)["values"].float()
            (0.1 * value_loss(values, old_values, returns, mask, 0.2)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for model in self.trained():
            model.eval()


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux reports KiB


def child(args) -> dict:
    """Build one layout, run the step(s), report memory and time."""
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    import training.rl.rollout  # noqa: F401  (imports before the baseline measurement)
    import transformers  # noqa: F401
    from safety_modules import attach  # noqa: F401

    start_rss = rss_bytes()
    started = time.perf_counter()
    setup = Setup(args, device, dtype)
    build_s = time.perf_counter() - started
    built_rss = rss_bytes()
    if device == "cuda":                    # the peak from here on: the weights held + what the step adds
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        setup.step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    setup.step()
    sync()
    step_s = time.perf_counter() - t0
    result = {"layout": args.layout, "step_s": step_s, "build_s": build_s,
              "trainable_parameters": setup.trainable_parameters,
              "parameters": sum(p.numel() for m in setup.trunks() for p in m.parameters())
              + sum(p.numel() for p in setup.policy.value_head.parameters())
              + (sum(p.numel() for p in setup.value.value_head.parameters()) if args.layout == "reference" else 0)
              + sum(p.numel() for p in setup.reward_model.parameters())}
    if device == "cuda":
        result.update(peak_bytes=torch.cuda.max_memory_allocated())
    else:
        result.update(peak_bytes=rss_bytes(), start_bytes=start_rss, built_bytes=built_rss,
                      peak_above_start_bytes=rss_bytes() - start_rss)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=SHAPES, default=None, help="default: llava-1.5-7b on cuda, 1b on cpu")
    parser.add_argument("--batch", type=int, default=4, help="prompts per rollout")
    parser.add_argument("--new-tokens", type=int, default=0, help="tokens sampled per answer (default 64, CPU 16)")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (default per shape: 7b 256, 1b 64)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on for llava-1.5-7b (as a 7B run would), off otherwise")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on cuda, 0 on cpu)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--layout", choices=LAYOUTS, help=argparse.SUPPRESS)      # set in the child processes
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    args.shape = args.shape or ("llava-1.5-7b" if args.device == "cuda" else "1b")
    args.new_tokens = args.new_tokens or (64 if args.device == "cuda" else 16)
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = args.shape == "llava-1.5-7b"
    if args.warmup is None:
        args.warmup = 1 if args.device == "cuda" else 0
    if args.layout:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    results = {}
    for layout in LAYOUTS:          # one fresh process each: neither sees the other's allocations
        cmd = [sys.executable, __file__, "--layout", layout, "--device", args.device, "--shape", args.shape,
               "--batch", str(args.batch), "--new-tokens", str(args.new_tokens), "--lora-r", str(args.lora_r),
               "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode or not lines:
            raise SystemExit(f"{layout} layout failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        results[layout] = json.loads(lines[-1][len("RESULT "):])
        r = results[layout]
        print(f"{layout:9s} peak {r['peak_bytes'] / 2**30:7.2f} GiB  step {r['step_s']:8.2f} s  "
              f"parameters {r['parameters'] / 1e9:.3f} B  trainable {r['trainable_parameters'] / 1e6:.1f} M", flush=True)
    ours, ref = results["ours"], results["reference"]
    summary = {"device": args.device, "shape": args.shape,
               "peak_memory_ratio": round(ours["peak_bytes"] / ref["peak_bytes"], 4),
               "step_time_ratio": round(ours["step_s"] / ref["step_s"], 4)}
    if args.device == "cpu":
        summary["peak_above_start_ratio"] = round(ours["peak_above_start_bytes"] / ref["peak_above_start_bytes"], 4)
    summary.update(batch=args.batch, new_tokens=args.new_tokens, gradient_checkpointing=args.gradient_checkpointing,
                   ours=ours, reference=ref)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
