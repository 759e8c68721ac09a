"""Flags, means and whitening over every process, on `runtime.distributed.all_reduce`.

Shared by the engine (a NaN loss on any process, its sharded evaluation), checkpoints (a failed
write on any process) and PPO's rewards, advantages and metrics: a process contributes its flag or
its sums and counts, the group combines them, and every process gets the same global answer. With
one process each is exactly its local counterpart.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from runtime.distributed import all_reduce


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any of them (every process calls it: collective)."""
    return bool(all_reduce(torch.tensor([1.0 if flag else 0.0]), dist.ReduceOp.MAX).item())


def global_means(sums: dict[str, tuple[float | torch.Tensor, float | torch.Tensor]],
                 dtype: torch.dtype = torch.float64) -> dict[str, float]:
    """{name: (sum, count)} of this process -> {name: global sum / global count} (NaN when the count is 0).

    The sums travel and divide in `dtype` (float64 by default; the supervised evaluation keeps float32).
    """
    names = sorted(sums)
    if not names:
        return {}
    table = all_reduce(torch.tensor([[float(sums[k][0]), float(sums[k][1])] for k in names], dtype=dtype))
    return {k: (row[0] / row[1]).item() if row[1] > 0 else float("nan") for k, row in zip(names, table)}


def global_whiten(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """`training.rl.losses.whiten` over the batches of all processes (mean and variance of the global batch).

    One process: exactly `whiten(x, mask, eps)`. All-equal values give zeros, not NaN.
    """
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    first = all_reduce(torch.stack([(x * m).sum(), m.sum()]).detach().cpu())
    count = first[1].clamp_min(1.0)
    mean = (first[0] / count).to(x.device)
    var = (all_reduce(((x - mean) ** 2 * m).sum().detach().cpu().reshape(1))[0] / count).to(x.device)
    return (x - mean) * torch.rsqrt(var + eps) * m
