"""Safety projectors: vision-tower patch features -> safety features of the LLM width.

The default is Honeybee's C-Abstractor (CVPR 2024): convolutional ResNet bottleneck blocks keep
locality, adaptive average pooling reduces the patch grid to a fixed number of queries, more blocks
refine, and an MLP reads out to the LLM width. The MLP variant (LLaVA-style, one feature per patch)
is kept for ablations. Both are independent of the model's own projector.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from safety_modules.config import SafetyConfig


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels at every spatial position of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rearrange(x, "b c h w -> b h w c")
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return rearrange(x, "b h w c -> b c h w")


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1) with a residual connection."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, bias=False), LayerNorm2d(out_ch), nn.SiLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), LayerNorm2d(out_ch), nn.SiLU(),
            nn.Conv2d(out_ch, out_ch, 1, bias=False), LayerNorm2d(out_ch),
        )
        self.shortcut = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def _mlp(in_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class CAbstractor(nn.Module):
    """(B, P, vision_width) patch features on a square grid -> (B, num_queries, text_width)."""

    def __init__(self, vision_width: int, text_width: int, num_patches: int, cfg: SafetyConfig) -> None:
        super().__init__()
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ValueError(
                f"c-abstractor needs a square patch grid, the vision tower gives {num_patches} patches"
            )
        self.num_patches = num_patches
        self.out_grid = math.isqrt(cfg.num_queries)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, vision_width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        width = vision_width
        self.stage1 = nn.Sequential(*[Bottleneck(width, width) for _ in range(cfg.projector_depth)])
        self.pool = nn.AdaptiveAvgPool2d(self.out_grid)
        self.stage2 = nn.Sequential(*[Bottleneck(width, width) for _ in range(cfg.projector_depth)])
        self.readout = _mlp(width, text_width, cfg.projector_mlp_depth)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if patches.dim() != 3 or patches.shape[1] != self.num_patches:
            raise ValueError(
                f"c-abstractor expects patch features of shape (N, {self.num_patches}, width), got {tuple(patches.shape)}"
            )
        x = patches + self.pos_embed.to(patches.dtype)
        grid = math.isqrt(self.num_patches)
        x = rearrange(x, "b (h w) d -> b d h w", h=grid, w=grid)
        x = self.stage2(self.pool(self.stage1(x)))
        x = rearrange(x, "b d h w -> b (h w) d")
        return self.readout(x)


class MLPProjector(nn.Module):
    """(B, P, vision_width) -> (B, P, text_width): one safety feature per patch (ablation)."""

    def __init__(self, vision_width: int, text_width: int, num_patches: int, cfg: SafetyConfig) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.readout = _mlp(vision_width, text_width, cfg.projector_mlp_depth)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.readout(patches)


def build_projector(cfg: SafetyConfig, vision_width: int, text_width: int, num_patches: int) -> nn.Module:
    """The projector named by `cfg.projector`, sized from the base model's widths."""
    cls = {"c-abstractor": CAbstractor, "mlp": MLPProjector}[cfg.projector]
    return cls(vision_width, text_width, num_patches, cfg)
