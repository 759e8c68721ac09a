"""PPO arithmetic, each piece small enough to check against a hand computation (the log-probability
pieces DPO shares live in training/logprobs.py).

Fixes of the reference code built in here: rewards are whitened with an epsilon (its per-batch
min-max normalisation divided by zero when all rewards were equal), the score is placed at the last
*real* response token (never on a padding slot), and the KL estimator is unclamped.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8,
           shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the (masked) batch; all-equal inputs give zeros, not NaN."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    if mask is not None:
        out = out * mask.to(out.dtype)
    return out


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate from sampled tokens' log-probabilities, unclamped.

    k1 = log p - log q (unbiased, can be negative per token); k3 = (r - 1) - log r with
    r = q / p (unbiased, non-negative, lower variance; Schulman 2020).
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator must be k1, k2 or k3, got {kind!r}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a (B, T) response mask (rows must have at least one)."""
    if not bool(mask.any(dim=1).all()):
        raise ValueError("a response has no real token (empty response mask)")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                  length_coef: float = 0.0) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL on every real token, the score (+ optional length term) on the last."""
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    last = last_token_index(mask)
    bonus = scores.to(kl.dtype)
    if length_coef:
        bonus = bonus + length_coef * mask.sum(dim=1).to(kl.dtype)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += bonus
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, T) response tokens; padding gets 0 advantage.

    Returns (advantages, returns = advantages + values).
    """
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    last_adv = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(last_adv)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_adv = delta + gamma * lam * last_adv
        last_adv = last_adv * m
        advantages[:, t] = last_adv
        # Padding after the response must not leak into earlier steps: carry values only over real tokens.
        next_value = torch.where(m.bool(), values[:, t], next_value)
    return advantages, (advantages + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate; returns (loss, stats with clip fraction and approximate KL)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float) -> torch.Tensor:
    """Clipped value loss: 0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class AdaptiveKLController:
    """Ziegler et al. (2019): move the KL coefficient so the observed KL tracks a target."""

    def __init__(self, init_coef: float, target: float | None, horizon: int = 10000) -> None:
        self.value = init_coef
        self.target = target
        self.horizon = horizon

    def update(self, observed_kl: float, batch_size: int) -> float:
        if self.target is None:
            return self.value
        error = max(min(observed_kl / self.target - 1.0, 0.2), -0.2)
        self.value *= 1.0 + error * batch_size / self.horizon
        return self.value

