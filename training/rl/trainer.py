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
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from safety_modules.configio import ConfigError
from safety_modules.images import MAX_IMAGE_PIXELS, load_image
from safety_modules.labels import SAFE, UNSAFE
from safety_modules.prompting import build_prompt, encode_batch
from training.collectives import global_means, global_whiten
from runtime.distributed import is_main
from training.config import TrainConfig
from training.engine import Engine
from training.logprobs import entropy_from_logits, token_logprobs
from training.rl.losses import AdaptiveKLController, gae, kl_estimate, masked_mean, policy_loss, token_rewards, value_loss
from training.rl.reward import ClassifierReward, classifier_task
from training.rl.rollout import PolicyWithValue, Rollout, sample, score_tokens, select

log = logging.getLogger(__name__)
KL_ESTIMATORS = ("k1", "k2", "k3")
# Seed salts. A generator drawn per (run seed, counter) -- an epoch's prompt order, a step's minibatch
# order -- is seeded with seed * SEED_STRIDE + counter: the stride exceeds any count of epochs or
# steps, so two (seed, counter) pairs never share a generator seed.
SEED_STRIDE = 1_000_003
# Each rank samples its answers from seed + RANK_SEED_STRIDE * rank: identical streams would correlate
# the ranks' answers, and a stride far above the seeds people pick (0, 1, 42) keeps rank r of seed s
# from replaying rank 0 of seed s + r.
RANK_SEED_STRIDE = 7919


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
        gen = torch.Generator().manual_seed(self.seed * SEED_STRIDE + epoch)
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


# -- the trainer ---------------------------------------------------------------------------------
def ppo_batches(train: TrainConfig, rollout: RolloutSpec, ppo: PPOSpec) -> tuple[int, int]:
    """(samples per minibatch, micro-batches per minibatch): a process's rollout splits into
    `ppo.minibatches` optimizer steps of `train.micro_batch_size` forward passes each."""
    if train.global_batch_size or train.gradient_accumulation_steps != 1:
        raise ConfigError("train.global_batch_size / train.gradient_accumulation_steps: not used by PPO; the "
                          "batch is rollout.batch_size per process, split into algo.minibatches optimizer steps "
                          "of train.micro_batch_size forward passes each")
    minibatch, rest = divmod(rollout.batch_size, ppo.minibatches)
    if rest or minibatch % train.micro_batch_size:
        raise ConfigError(f"rollout.batch_size ({rollout.batch_size}) must split into algo.minibatches "
                          f"({ppo.minibatches}) minibatches of a multiple of train.micro_batch_size "
                          f"({train.micro_batch_size}) samples")
    return minibatch, minibatch // train.micro_batch_size


def rank_seed_offset(rank: int) -> int:
    """Sampling seeds differ per rank (identical streams would correlate the ranks' answers)."""
    return RANK_SEED_STRIDE * rank


def disable_dropout(module: torch.nn.Module) -> int:
    """Set every dropout probability to 0; returns how many were non-zero."""
    changed = 0
    for sub in module.modules():
        if isinstance(sub, torch.nn.Dropout) and sub.p > 0:
            sub.p = 0.0
            changed += 1
    return changed


class PPOTrainer(Engine):
    """PPO on the engine: DeepSpeed around `PolicyWithValue`, balanced prompts, the classifier reward.
    `fit()` runs PPO; `evaluate()` judges greedy answers."""

    def __init__(self, policy: PolicyWithValue, records, reward: ClassifierReward, train: TrainConfig,
                 rollout: RolloutSpec, ppo: PPOSpec, run_dir: str | Path, seed: int = 0, name: str = "ppo",
                 max_image_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.minibatch, self.accumulation = ppo_batches(train, rollout, ppo)
        self.policy, self.reward = policy, reward
        # Plain dicts once (a datasets.Dataset row access costs far more than a list index).
        self.records = list(records.dataset) if hasattr(records, "dataset") else list(records)
        self.rollout_spec, self.ppo = rollout, ppo
        super().__init__(train, run_dir, seed, name)
        torch.manual_seed(seed + rank_seed_offset(self.rank))     # each rank samples its own answers
        self.prompts = BalancedPrompts([row["label"] for row in self.records], rollout.batch_size, self.rank,
                                       self.world, seed)
        self.total_steps = train.max_steps or train.epochs * self.prompts.steps_per_epoch
        self.optimizer_steps_total = self.total_steps * ppo.epochs * ppo.minibatches
        self._direct_params = list(policy.model.safety.parameters(recurse=False))   # read without a module call
        if disable_dropout(policy) and is_main():
            log.info("%s: dropout set to 0 in the policy (PPO ratios must start at 1)", name)
        ds_train = dataclasses.replace(train, gradient_accumulation_steps=self.accumulation, global_batch_size=0)
        self.start_deepspeed(policy, policy.model, ds_train, self.optimizer_steps_total)
        self.collate = PromptCollator(policy.model.processor, max_image_pixels)
        self.tokenizer = policy.model.processor.tokenizer
        self.kl = AdaptiveKLController(ppo.kl_coef, ppo.kl_target if ppo.adaptive_kl else None, ppo.kl_horizon)
        self.optimizer_steps = 0

    @property
    def model(self):
        return self.policy.model

    # -- rollouts and rewards --------------------------------------------------------------------
    def _generate(self, rows: list[dict[str, Any]], do_sample: bool) -> Rollout:
        batch = self.to_device(self.collate(rows))
        spec = self.rollout_spec
        synced = self.zero_stage == 3 and self.world > 1
        with self.gather(self._direct_params):
            return sample(self.policy, batch, self.tokenizer, spec.max_new_tokens, spec.temperature, spec.top_p,
                          do_sample=do_sample, synced_gpus=synced)

    def _judge(self, rows: list[dict[str, Any]], texts: list[str]):
        return self.reward([r["question"] for r in rows], texts, [r["label"] for r in rows],
                           [classifier_task(r["task"] or None) for r in rows])

    # -- one PPO step ----------------------------------------------------------------------------
    def _train_steps(self) -> Iterator[dict[str, Any]]:
        while self.step < self.total_steps:
            step_started = time.time()
            row = self.train_step()
            self.step += 1
            row["step_s"] = time.time() - step_started         # rollout + judging + PPO epochs
            yield row

    def _postfix(self, row: dict[str, Any]) -> dict[str, str]:
        return {"reward": f"{row['reward']:.3f}", "acc": f"{row['accuracy']:.2f}", "kl": f"{row['kl']:.3f}",
                "ent": f"{row['entropy']:.2f}"}

    def _throughput(self, elapsed: float, steps: int) -> dict[str, float]:
        return {"mean_step_s": elapsed / steps if steps else 0.0}

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
        safe = torch.tensor([r["label"] == SAFE for r in rows])
        unsafe = torch.tensor([r["label"] == UNSAFE for r in rows])
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
        ppo, micro = self.ppo, self.cfg.micro_batch_size
        temperature = self.rollout_spec.temperature
        gen = torch.Generator().manual_seed(self.seed * SEED_STRIDE + self.step)
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
        return {**means, "optimizer_steps": updates, "early_stopped": float(stopped), "last_approx_kl": last_kl,
                "grad_norm": self.grad_norm()}

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
        self.backward_step(loss)
        return {"loss": loss.item(), "pg_loss": pg.item(), "vf_loss": vf.item(), "update_entropy": entropy.item(),
                "clipfrac": stats["clipfrac"].item(), "approx_kl": stats["approx_kl"].item()}

    # -- checkpoints -----------------------------------------------------------------------------
    def _layout(self) -> dict[str, Any]:
        return {"world_size": self.world, "zero_stage": self.zero_stage, "rollout_batch_size": self.rollout_spec.batch_size,
                "micro_batch_size": self.cfg.micro_batch_size, "accumulation": self.accumulation,
                "total_steps": self.total_steps}

    def _checkpoint_state(self, loss: float) -> dict[str, Any]:
        return {"loss": loss, "kl_coef": self.kl.value, "optimizer_steps": self.optimizer_steps}

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer_steps = state["optimizer_steps"]
        self.kl.value = state["kl_coef"]
        self.engine.global_steps = self.optimizer_steps

    # -- evaluation and export -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, rows: list[dict[str, Any]], batch_size: int | None = None) -> dict[str, float]:
        """Greedy answers to `rows` judged by the reward classifier: reward, accuracy, per-label accuracy,
        false refusals (safe images judged Unsafe). Rows are sharded over ranks; every rank runs the
        same number of batches (ZeRO-3)."""
        size = batch_size or self.rollout_spec.batch_size
        sums: dict[str, list[float]] = {}
        with self.evaluating():
            for indices, w in self.shard_batches(len(rows), size):
                chunk = [rows[j] for j in indices]
                rollout = self._generate(chunk, do_sample=False)
                judged = self._judge(chunk, rollout.texts)
                safe = torch.tensor([r["label"] == SAFE for r in chunk]).float() * w
                unsafe = torch.tensor([r["label"] == UNSAFE for r in chunk]).float() * w
                correct = judged.correct.float()
                refused = torch.tensor([p == UNSAFE for p in judged.predicted]).float()
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
        return global_means({k: (v[0], v[1]) for k, v in sums.items()})

    def value_head_tensors(self) -> dict[str, torch.Tensor]:
        """The value head's weights, whole (gathered under ZeRO-3), on CPU. Collective."""
        params = list(self.policy.value_head.parameters())
        with self.gather(params):
            return {n: p.detach().cpu().clone().contiguous() for n, p in self.policy.value_head.named_parameters()}
