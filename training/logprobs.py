"""Log-probability arithmetic shared by DPO (training/dpo_data.py, the DPO recipe) and PPO (training/rl).

Why a module of its own: DPO's data code and the RL package both need it, and `training.rl` builds
on `training`; kept here, below both, the imports go one way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) for each position: logits (B, T, V) predicting tokens (B, T)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the categorical distribution given by `logits` (..., V)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023) on sequence log-probabilities; returns (mean loss, reward margins)."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean(), beta * margin
