"""Safety head: the question attends to the image's safety evidence, then two classifiers.

Why pooling over all prompt tokens: the reference code took position 0 only, so its
"text-image" head never read the question. Here every prompt token (padding and image placeholders
excluded) queries [head safety tokens ; safety-projected features], and the outputs are averaged
under the prompt mask, so the question steers the verdict while padding cannot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from safety_modules.labels import IGNORE_INDEX


class CrossAttention(nn.Module):
    """Multi-head cross-attention on `scaled_dot_product_attention`.

    Why not `nn.MultiheadAttention`: its inference fast path switches kernels when gradients are
    off, so the same weights would give different bits in training and in the guard.
    """

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.o_proj = nn.Linear(width, width)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        split = lambda x: rearrange(x, "b t (h d) -> b h t d", h=self.num_heads)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q_proj(queries)), split(self.k_proj(memory)),
                                             split(self.v_proj(memory)))
        return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))


class SafetyHead(nn.Module):
    def __init__(self, width: int, num_heads: int, num_levels: int, num_risk_types: int) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"safety head: width {width} is not divisible by {num_heads} attention heads")
        self.query_norm = nn.LayerNorm(width)
        self.memory_norm = nn.LayerNorm(width)
        self.attention = CrossAttention(width, num_heads)
        self.out_norm = nn.LayerNorm(width)
        self.level = nn.Linear(width, num_levels)
        self.risk = nn.Linear(width, num_risk_types)

    def forward(self, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor,
                memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt_embeds (B, T, D), prompt_mask (B, T) bool, memory (B, M, D) -> level and risk logits."""
        if prompt_embeds.shape[:2] != prompt_mask.shape:
            raise ValueError(f"safety head: prompt mask {tuple(prompt_mask.shape)} does not match "
                             f"prompt embeddings {tuple(prompt_embeds.shape)}")
        if not bool(prompt_mask.any(dim=1).all()):
            raise ValueError("safety head: a sample has no prompt token to read (empty prompt mask)")
        queries = self.query_norm(prompt_embeds)
        keys = self.memory_norm(memory)
        attended = self.attention(queries, keys)
        hidden = self.out_norm(attended + queries)
        weights = prompt_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        return self.level(pooled), self.risk(pooled)


def safety_loss(level_logits: torch.Tensor, risk_logits: torch.Tensor,
                level_labels: torch.Tensor | None, risk_labels: torch.Tensor | None) -> torch.Tensor | None:
    """CE(level) + CE(risk type); label IGNORE_INDEX ignores a sample (e.g. a record with no risk label)."""
    losses = []
    if level_labels is not None and bool((level_labels != IGNORE_INDEX).any()):
        losses.append(F.cross_entropy(level_logits.float(), level_labels.to(level_logits.device), ignore_index=IGNORE_INDEX))
    if risk_labels is not None and bool((risk_labels != IGNORE_INDEX).any()):
        losses.append(F.cross_entropy(risk_logits.float(), risk_labels.to(risk_logits.device), ignore_index=IGNORE_INDEX))
    if not losses:
        return None
    return sum(losses)
