"""The PPO loop on DeepSpeed: balanced prompt batches, rollouts, classifier rewards, GAE, clipped updates.

One PPO step (per process, `rollout.batch_size` prompts, half safe and half unsafe):
1. sample answers with the policy (safety modules active, LoRA on; batched, KV cache, left padding;
   the vision tower runs once and its features serve every later forward of the step);
2. score them: policy log-probs and values (one forward), reference log-probs (the same forward
   under the frozen starting policy, training/rl/reference.py), classifier reward of the correct label;
3. rewards: the classifier score whitened over the global batch (an epsilon: all-equal scores give
   zeros, not NaN) at the last real response token, minus kl_coef x per-token KL(policy || reference)
   (unclamped estimator) on every real token, + an optional length term (off);
4. GAE advantages (whitened over the global batch), returns;
5. `epochs` passes of `minibatches` optimizer steps over the rollout: clipped policy loss + vf_coef x
   clipped value loss - entropy_coef x entropy; a minibatch whose approximate KL(old || new),
   averaged over all processes, exceeds `target_kl` ends the step's updates (early stop).

Why one DeepSpeed engine around `PolicyWithValue` (the VLM + value head): the trunk is shared by the
policy, the reference and the value function, so ZeRO-2/3 shard one set of weights, one optimizer
covers LoRA + safety tokens + value head, and checkpoints are the engine's trainable tensors.
Under ZeRO-3 the parameters are gathered by DeepSpeed's module hooks during generation too; the
safety tokens (read directly, not through a module call) are gathered around sampling, and
`synced_gpus` keeps every rank generating until all are done.

Dropout is switched off (p = 0) in the trunk: with it, the update's first forward would differ from
the one that scored the rollout, and PPO's ratio would not start at 1 (TRL does the same).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from safety_modules.configio import ConfigError
from safety_modules.images import MAX_IMAGE_PIXELS, load_image
from safety_modules.prompting import build_prompt, encode_batch
from training import checkpoint as ckpt
from runtime import runlock
from training.config import TrainConfig
from runtime.distributed import all_reduce, import_deepspeed, is_main, setup
from training.engine import (TrainingDiverged, deepspeed_config, gpu_memory, load_latest_checkpoint, lr_schedule,
                             truncate_metrics, use_bf16)
from training.logprobs import entropy_from_logits, token_logprobs
from training.rl.losses import (AdaptiveKLController, gae, kl_estimate, masked_mean, policy_loss, token_rewards,
                                value_loss)
from training.rl.reward import ClassifierReward, classifier_task
from training.rl.rollout import PolicyWithValue, Rollout, sample, score_tokens, select

log = logging.getLogger(__name__)
KL_ESTIMATORS = ("k1", "k2", "k3")


# -- settings -----------------------------------------------------------------------------------
@dataclass
class RolloutSpec:
    """How answers are sampled (the `rollout:` keys of a `ppo:` section)."""

    batch_size: int = 16          # prompts per process per PPO step, balanced over the labels (safe / unsafe)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"batch_size and max_new_tokens: must be >= 1, got {self.batch_size}, "
                              f"{self.max_new_tokens}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")


@dataclass
class PPOSpec:
    """The PPO algorithm's settings (the `algo:` keys of a `ppo:` section)."""

    epochs: int = 4               # passes over each rollout
    minibatches: int = 2          # optimizer steps per pass (rollout.batch_size / minibatches samples each)
    clip: float = 0.2             # policy ratio clip
    value_clip: float = 0.2       # value clip around the rollout's values
    vf_coef: float = 0.1
    entropy_coef: float = 0.01    # entropy bonus
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05         # initial coefficient of the per-token KL penalty
    kl_estimator: str = "k1"      # k1 (unbiased, the default), k2, k3 -- never clamped
    adaptive_kl: bool = False     # Ziegler et al.: move kl_coef so the sequence KL tracks kl_target
    kl_target: float = 6.0
    kl_horizon: int = 10000
    target_kl: float = 0.1        # early stop: a minibatch's approx KL(old || new) above this ends the step; 0 = off
    length_coef: float = 0.0      # reward per response token (off by default: no length bonus)
    whiten_eps: float = 1e-8
    whiten_rewards: bool = True   # classifier scores whitened over the global batch
    whiten_advantages: bool = True

    def __post_init__(self) -> None:
        for key in ("epochs", "minibatches", "kl_horizon"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("clip", "value_clip", "whiten_eps", "kl_target"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be > 0, got {getattr(self, key)}")
        for key in ("vf_coef", "entropy_coef", "kl_coef", "target_kl"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"gamma and lam: must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator: must be one of {list(KL_ESTIMATORS)}, got {self.kl_estimator!r}")


# -- data -----------------------------------------------------------------------------------------
class BalancedPrompts:
    """Which records each process rolls out at each step: every label equally often in every batch.

    Per epoch each label's records are shuffled (seeded by seed and epoch, the same on every rank);
    a step takes the next `per_rank x world / n_labels` of each label, interleaved so that every
    rank's share is balanced too. An epoch ends when the rarest label runs out.
    """

    def __init__(self, labels: list[str], per_rank: int, rank: int, world: int, seed: int) -> None:
        self.groups = {lab: [i for i, x in enumerate(labels) if x == lab] for lab in sorted(set(labels))}
        n = len(self.groups)
        if per_rank % n:
            raise ConfigError(f"rollout.batch_size: {per_rank} prompts per process cannot hold the {n} labels "
                              f"{sorted(self.groups)} equally; use a multiple of {n}")
        self.per_rank, self.rank, self.world, self.seed = per_rank, rank, world, seed
        self.take = per_rank * world // n
        smallest = min(len(g) for g in self.groups.values())
        self.steps_per_epoch = smallest // self.take
        if self.steps_per_epoch == 0:
            counts = {k: len(v) for k, v in self.groups.items()}
            raise ValueError(f"ppo: {counts} records per label are fewer than one balanced global batch needs "
                             f"({self.take} per label = rollout.batch_size {per_rank} x {world} processes / {n})")

    def indices(self, step: int) -> list[int]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        chosen = []
        for members in self.groups.values():
            perm = torch.randperm(len(members), generator=gen).tolist()
            chosen.append([members[j] for j in perm[offset * self.take:(offset + 1) * self.take]])
        interleaved = [group[i] for i in range(self.take) for group in chosen]
        return interleaved[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]


class PromptCollator:
    """rows -> generation inputs: the prompt (`build_prompt`, the one format), left-padded, + pixels."""

    def __init__(self, processor, max_image_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.processor = processor
        self.max_image_pixels = max_image_pixels

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [load_image(row["image"], self.max_image_pixels) for row in rows]
        texts = [build_prompt(self.processor, row["question"]) for row in rows]
        # every processor output by name: each family's image inputs travel with the pixels
        return dict(encode_batch(self.processor, images, texts, return_tensors="pt", padding="longest",
                                 padding_side="left"))


# -- collectives ---------------------------------------------------------------------------------
def global_whiten(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """`losses.whiten` over the batches of all processes (mean and variance of the global batch).

    One process: exactly `whiten(x, mask, eps)`. All-equal values give zeros, not NaN.
    """
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    first = all_reduce(torch.stack([(x * m).sum(), m.sum()]).detach().cpu())
    count = first[1].clamp_min(1.0)
    mean = (first[0] / count).to(x.device)
    var = (all_reduce(((x - mean) ** 2 * m).sum().detach().cpu().reshape(1))[0] / count).to(x.device)
    return (x - mean) * torch.rsqrt(var + eps) * m


def global_means(sums: dict[str, tuple[float | torch.Tensor, float | torch.Tensor]]) -> dict[str, float]:
    """{name: (sum, count)} of this process -> {name: global sum / global count} (NaN when count is 0)."""
    names = sorted(sums)
    if not names:
        return {}
    table = torch.tensor([[float(sums[k][0]), float(sums[k][1])] for k in names], dtype=torch.float64)
    table = all_reduce(table)
    return {k: (row[0] / row[1]).item() if row[1] > 0 else float("nan") for k, row in zip(names, table)}


def rank_seed_offset(rank: int) -> int:
    """Sampling seeds differ per rank (identical streams would correlate the ranks' answers)."""
    return 7919 * rank


def disable_dropout(module: torch.nn.Module) -> int:
    """Set every dropout probability to 0; returns how many were non-zero."""
    changed = 0
    for sub in module.modules():
        if isinstance(sub, torch.nn.Dropout) and sub.p > 0:
            sub.p = 0.0
            changed += 1
    return changed


# -- the trainer ---------------------------------------------------------------------------------
class PPOTrainer:
    """DeepSpeed engine around `PolicyWithValue`, the prompts, the reward; `fit()` runs PPO."""

    def __init__(self, policy: PolicyWithValue, records, reward: ClassifierReward, train: TrainConfig,
                 rollout: RolloutSpec, ppo: PPOSpec, run_dir: str | Path, seed: int = 0, name: str = "ppo",
                 max_image_pixels: int = MAX_IMAGE_PIXELS) -> None:
        deepspeed = import_deepspeed()

        self.policy, self.reward = policy, reward
        # Plain dicts once (a datasets.Dataset row access costs far more than a list index).
        self.records = list(records.dataset) if hasattr(records, "dataset") else list(records)
        self.train_cfg, self.rollout_spec, self.ppo = train, rollout, ppo
        self.run_dir, self.seed, self.name = Path(run_dir), seed, name
        # One run per folder, as the supervised engine: a second run on it is refused before it writes.
        lock = runlock.acquire(self.run_dir) if runlock.is_main_process() else None
        if lock is not None:
            weakref.finalize(self, lock.release)
        if train.global_batch_size or train.gradient_accumulation_steps != 1:
            raise ConfigError("train.global_batch_size / train.gradient_accumulation_steps: not used by PPO; the "
                              "batch is rollout.batch_size per process, split into algo.minibatches optimizer steps "
                              "of train.micro_batch_size forward passes each")
        if train.torch_threads:
            torch.set_num_threads(train.torch_threads)
        ctx = setup(group_of_one=True)
        self.rank, self.world = ctx.rank, ctx.world_size
        torch.manual_seed(seed + rank_seed_offset(self.rank))     # each rank samples its own answers
        self.prompts = BalancedPrompts([row["label"] for row in self.records], rollout.batch_size, self.rank, self.world, seed)
        minibatch, rest = divmod(rollout.batch_size, ppo.minibatches)
        if rest or minibatch % train.micro_batch_size:
            raise ConfigError(f"rollout.batch_size ({rollout.batch_size}) must split into algo.minibatches "
                              f"({ppo.minibatches}) minibatches of a multiple of train.micro_batch_size "
                              f"({train.micro_batch_size}) samples")
        self.minibatch = minibatch
        self.accumulation = minibatch // train.micro_batch_size
        ds_train = dataclasses.replace(train, gradient_accumulation_steps=self.accumulation, global_batch_size=0)
        self.total_steps = train.max_steps or train.epochs * self.prompts.steps_per_epoch
        ds_config = deepspeed_config(ds_train, self.world)
        self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        model = policy.model
        self._direct_params = list(model.safety.parameters(recurse=False))   # read without a module call
        if self.zero_stage == 3:
            for param in self._direct_params:
                deepspeed.zero.register_external_parameter(model, param)
        if disable_dropout(policy) and is_main():
            log.warning("%s: dropout set to 0 in the policy (PPO ratios must start at 1)", name)
        if train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{name}: the policy has no trainable parameters")
        self.optimizer_steps_total = self.total_steps * ppo.epochs * ppo.minibatches
        schedule = lr_schedule(ds_train, self.optimizer_steps_total)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=policy, model_parameters=params, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.dtype = torch.bfloat16 if use_bf16(train) else torch.float32
        self.collate = PromptCollator(model.processor, max_image_pixels)
        self.tokenizer = model.processor.tokenizer
        self.kl = AdaptiveKLController(ppo.kl_coef, ppo.kl_target if ppo.adaptive_kl else None, ppo.kl_horizon)
        self.step = 0
        self.optimizer_steps = 0
        self.last_checkpoint: Path | None = None

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def model(self):
        return self.policy.model

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def gather(self, params: list[torch.nn.Parameter]):
        """Context in which ZeRO-3 parameters are whole on every rank (exports). Collective."""
        return ckpt.gather(params)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self.engine.device
        return {k: v.to(device, self.dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}

    def _generate(self, rows: list[dict[str, Any]], do_sample: bool) -> Rollout:
        batch = self._to_device(self.collate(rows))
        spec = self.rollout_spec
        synced = self.zero_stage == 3 and self.world > 1
        with self.gather(self._direct_params):
            return sample(self.policy, batch, self.tokenizer, spec.max_new_tokens, spec.temperature, spec.top_p,
                          do_sample=do_sample, synced_gpus=synced)

    def _judge(self, rows: list[dict[str, Any]], texts: list[str]):
        return self.reward([r["question"] for r in rows], texts, [r["label"] for r in rows],
                           [classifier_task(r["task"] or None) for r in rows])

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = all_reduce(torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0]), dist.ReduceOp.MAX)
        if bad.item():
            where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                     else "no checkpoint was written before it")
            raise TrainingDiverged(f"{self.name}: loss is {loss.item()} (NaN/inf on at least one process) at step "
                                   f"{self.step + 1}; stopping, {where}")

    # -- one PPO step ----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        start = time.time()
        spec, ppo = self.rollout_spec, self.ppo
        rows = [self.records[i] for i in self.prompts.indices(self.step)]
        self.engine.eval()
        rollout = self._generate(rows, do_sample=True)
        scored = score_tokens(self.policy, rollout, spec.temperature)
        judged = self._judge(rows, rollout.texts)
        device = rollout.response.device
        mask = rollout.response_mask.to(torch.float32)
        scores = judged.scores.to(device)
        shaped = global_whiten(scores, eps=ppo.whiten_eps) if ppo.whiten_rewards else scores
        kl = kl_estimate(scored["logp"], scored["ref_logp"], ppo.kl_estimator) * mask
        kl_coef = self.kl.value
        rewards = token_rewards(shaped, kl, mask, kl_coef, ppo.length_coef)
        advantages, returns = gae(rewards, scored["values"], mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = global_whiten(advantages, mask, ppo.whiten_eps)
        lr = self.scheduler.get_last_lr()[0]
        self.engine.train()
        update = self._update(rollout, scored, advantages.detach(), returns.detach(), mask)

        seq_kl = kl.sum(dim=1)
        safe = torch.tensor([r["label"] == "Safe" for r in rows])
        unsafe = torch.tensor([r["label"] == "Unsafe" for r in rows])
        correct = judged.correct.float()
        sums = {
            "reward": (judged.scores.sum(), len(rows)),
            "log_prob_correct": (judged.log_prob.sum(), len(rows)),
            "accuracy": (correct.sum(), len(rows)),
            "accuracy_safe": ((correct * safe).sum(), safe.sum()),
            "accuracy_unsafe": ((correct * unsafe).sum(), unsafe.sum()),
            "kl": (seq_kl.sum(), len(rows)),
            "kl_per_token": (kl.sum(), mask.sum()),
            "entropy": ((scored["entropy"] * mask).sum(), mask.sum()),
            "response_length": (mask.sum(), len(rows)),
            "value": ((scored["values"] * mask).sum(), mask.sum()),
            "return": ((returns * mask).sum(), mask.sum()),
        }
        out = {"step": self.step + 1, "epoch": self.step // self.prompts.steps_per_epoch, "lr": lr,
               "kl_coef": kl_coef, **global_means(sums), **update}
        self.kl.update(out["kl"], len(rows) * self.world)
        elapsed = time.time() - start
        out.update(step_time_s=elapsed, samples_per_s=len(rows) * self.world / elapsed)
        return out

    def _update(self, rollout: Rollout, scored: dict[str, torch.Tensor], advantages: torch.Tensor,
                returns: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """PPO epochs over one rollout; early stop when the global approx KL exceeds target_kl."""
        ppo, micro = self.ppo, self.train_cfg.micro_batch_size
        temperature = self.rollout_spec.temperature
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        n = rollout.response.shape[0]
        totals: dict[str, list[float]] = {}
        updates, stopped, last_kl = 0, False, 0.0
        for _ in range(ppo.epochs):
            order = torch.randperm(n, generator=gen)
            for m in range(ppo.minibatches):
                minibatch = order[m * self.minibatch:(m + 1) * self.minibatch]
                kl_sum = 0.0
                for u in range(self.accumulation):
                    idx = minibatch[u * micro:(u + 1) * micro]
                    stats = self._micro_step(select(rollout, idx), scored, idx, advantages, returns, mask, temperature)
                    kl_sum += stats["approx_kl"]
                    for key, value in stats.items():
                        totals.setdefault(key, []).append(value)
                updates += 1
                self.optimizer_steps += 1
                last_kl = global_means({"approx_kl": (kl_sum, self.accumulation)})["approx_kl"]
                if ppo.target_kl and last_kl > ppo.target_kl:
                    stopped = True
                    break
            if stopped:
                break
        means = global_means({k: (sum(v), len(v)) for k, v in totals.items()})
        grad_norm = self.engine.get_global_grad_norm()
        return {**means, "optimizer_steps": updates, "early_stopped": float(stopped), "last_approx_kl": last_kl,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}

    def _micro_step(self, sub: Rollout, scored: dict[str, torch.Tensor], idx: torch.Tensor, advantages: torch.Tensor,
                    returns: torch.Tensor, mask: torch.Tensor, temperature: float) -> dict[str, float]:
        idx = idx.to(mask.device)
        m = mask[idx]
        out = self.engine(sub.input_ids, sub.attention_mask, sub.images, sub.prompt_len)
        logits = out["logits"].float() / temperature
        logp = token_logprobs(logits, sub.response)
        pg, stats = policy_loss(logp, scored["logp"][idx], advantages[idx], m, self.ppo.clip)
        vf = value_loss(out["values"].float(), scored["values"][idx], returns[idx], m, self.ppo.value_clip)
        entropy = masked_mean(entropy_from_logits(logits), m)
        loss = pg + self.ppo.vf_coef * vf - self.ppo.entropy_coef * entropy
        self._check_finite(loss)
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": loss.item(), "pg_loss": pg.item(), "vf_loss": vf.item(), "update_entropy": entropy.item(),
                "clipfrac": stats["clipfrac"].item(), "approx_kl": stats["approx_kl"].item()}

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Run PPO to `total_steps`; returns the last step's metrics and the wall time."""
        from tqdm import tqdm

        self.run_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.name, dynamic_ncols=True,
                   disable=not (is_main() and self.train_cfg.progress))
        last: dict[str, Any] = {}
        started, start_step = time.time(), self.step
        while self.step < self.total_steps:
            step_started = time.time()
            last = self.train_step()
            self.step += 1
            last["step_s"] = time.time() - step_started         # rollout + judging + PPO epochs
            last["elapsed_s"] = time.time() - started
            last.update(gpu_memory())
            bar.update(1)
            bar.set_postfix(reward=f"{last['reward']:.3f}", acc=f"{last['accuracy']:.2f}", kl=f"{last['kl']:.3f}",
                            ent=f"{last['entropy']:.2f}")
            if is_main() and (self.step % self.train_cfg.log_every == 0 or self.step == self.total_steps):
                with self.metrics_path.open("a") as fh:
                    fh.write(json.dumps(last) + "\n")
            if self.train_cfg.save_every and self.step % self.train_cfg.save_every == 0:
                self.save(last["loss"])
        bar.close()
        elapsed = time.time() - started
        return {**last, "steps": self.step, "seconds": round(elapsed, 2), "processes": self.world,
                "mean_step_s": elapsed / (self.step - start_step) if self.step > start_step else 0.0}

    # -- checkpoints -----------------------------------------------------------------------------
    def _layout(self) -> dict[str, Any]:
        return {"world_size": self.world, "zero_stage": self.zero_stage, "rollout_batch_size": self.rollout_spec.batch_size,
                "micro_batch_size": self.train_cfg.micro_batch_size, "accumulation": self.accumulation,
                "total_steps": self.total_steps}

    def save(self, loss: float) -> Path:
        state = {**self._layout(), "loss": loss, "kl_coef": self.kl.value, "optimizer_steps": self.optimizer_steps}
        self.last_checkpoint = ckpt.save_checkpoint(self.run_dir, self.step, self.engine.module, self.optimizer,
                                                    self.scheduler, state, keep=self.train_cfg.keep_checkpoints)
        return self.last_checkpoint

    def resume(self) -> bool:
        """Load the latest checkpoint of run_dir, if any (weights, optimizer, schedule, RNG, KL coefficient)."""
        loaded = load_latest_checkpoint(self.run_dir, self.name, self.engine.module, self.optimizer, self.scheduler,
                                        self._layout())
        if loaded is None:
            return False
        path, state = loaded
        self.step = state["step"]
        self.optimizer_steps = state["optimizer_steps"]
        self.kl.value = state["kl_coef"]
        self.engine.global_steps = self.optimizer_steps
        self.last_checkpoint = path
        truncate_metrics(self.metrics_path, self.step)
        if is_main():
            log.warning("%s: resumed from %s (step %d of %d)", self.name, path, self.step, self.total_steps)
        return True

    # -- evaluation and export -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, rows: list[dict[str, Any]], batch_size: int | None = None) -> dict[str, float]:
        """Greedy answers to `rows` judged by the reward classifier: reward, accuracy, per-label accuracy,
        false refusals (safe images judged Unsafe). Rows are sharded over ranks; every rank runs the
        same number of batches (ZeRO-3)."""
        size = batch_size or self.rollout_spec.batch_size
        mine = list(range(self.rank, len(rows), self.world))
        per_rank = math.ceil(len(rows) / self.world)
        weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
        mine = mine + [0] * (per_rank - len(mine))
        sums: dict[str, list[float]] = {}
        self.engine.eval()
        for i in range(0, per_rank, size):
            chunk = [rows[j] for j in mine[i:i + size]]
            w = torch.tensor(weights[i:i + size])
            rollout = self._generate(chunk, do_sample=False)
            judged = self._judge(chunk, rollout.texts)
            safe = torch.tensor([r["label"] == "Safe" for r in chunk]).float() * w
            unsafe = torch.tensor([r["label"] == "Unsafe" for r in chunk]).float() * w
            correct = judged.correct.float()
            refused = torch.tensor([p == "Unsafe" for p in judged.predicted]).float()
            for key, (num, den) in {
                "reward": ((judged.scores * w).sum(), w.sum()),
                "log_prob_correct": ((judged.log_prob * w).sum(), w.sum()),
                "accuracy": ((correct * w).sum(), w.sum()),
                "accuracy_safe": ((correct * safe).sum(), safe.sum()),
                "accuracy_unsafe": ((correct * unsafe).sum(), unsafe.sum()),
                "false_refusal": ((refused * safe).sum(), safe.sum()),
                "response_length": ((rollout.response_mask.sum(1).float().cpu() * w).sum(), w.sum()),
            }.items():
                acc = sums.setdefault(key, [0.0, 0.0])
                acc[0] += float(num)
                acc[1] += float(den)
        self.engine.train()
        return global_means({k: (v[0], v[1]) for k, v in sums.items()})

    def value_head_tensors(self) -> dict[str, torch.Tensor]:
        """The value head's weights, whole (gathered under ZeRO-3), on CPU. Collective."""
        params = list(self.policy.value_head.parameters())
        with self.gather(params):
            return {n: p.detach().cpu().clone().contiguous() for n, p in self.policy.value_head.named_parameters()}
