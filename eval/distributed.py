"""Data-parallel evaluation: shard items by rank under `torchrun`, merge the answers on every rank.

Why this is enough: evaluation has no gradients, so ranks never talk while generating. Each rank
answers its share (every world_size-th item of a length-sorted list, which balances prompt lengths),
writes to the shared response cache, and one `all_gather_object` at the end gives every rank the
full set; rank 0 writes the reports. Because each item's sample has its own seed (see
`eval.models`), N processes give the same answers as one.

Backend: gloo on CPU, nccl on GPU (each rank on cuda:LOCAL_RANK).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def device(self) -> str:
        """cuda:LOCAL_RANK when GPUs exist, else cpu."""
        if torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return "cpu"

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share: items rank, rank + world_size, ..."""
        return list(items[self.rank::self.world_size])

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (just [obj] in one process)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.initialised_here and dist.is_initialized():
            dist.destroy_process_group()
            self.initialised_here = False


def from_env() -> DistContext:
    """The context `torchrun` describes in RANK / WORLD_SIZE / LOCAL_RANK; initialises the group once.

    Also splits the CPU threads between local ranks so two CPU processes do not fight over cores.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    ctx = DistContext(rank=rank, world_size=world, local_rank=local)
    if world > 1:
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local % torch.cuda.device_count())
            dist.init_process_group(backend=backend)
            ctx.initialised_here = True
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return ctx
