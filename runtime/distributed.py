"""The one process-group layer of training and evaluation: set up once, read everywhere.

`setup()` is called by the entry point (the CLI, the pipeline, or the first engine a Python user
builds): it joins the group a launcher (`torchrun`, `deepspeed`) describes in RANK / WORLD_SIZE /
LOCAL_RANK, or, when a DeepSpeed engine needs one, makes a group of one process. It is idempotent;
every later caller gets the same `DistContext` from `context()`. The collectives (`all_reduce`,
`gather`, `barrier`) and the rank sharding (`shard`, `padded_shard`) live here and nowhere else, so
a fix to how ranks split work lands once.

Backend: gloo on CPU, NCCL on GPU (each rank on cuda:LOCAL_RANK).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# The port a lone process picked for its group of one; a process that inherits it (a subprocess of a
# lone run: the pipeline test, a notebook that trained and then launches `safevlm`) is lone too.
LONE_PORT_ENV = "SAFEVLM_LONE_PORT"
# Attempts at binding a port we picked ourselves (another process can take it before the store binds).
PORT_ATTEMPTS = 5


def import_deepspeed():
    """The `deepspeed` module (with `deepspeed.ops`), its logger writing to stderr. DeepSpeed's logger
    binds sys.stdout when it is first imported, and warns at once; so every first import goes through
    here, and stdout keeps only what the CLI prints there (a command's JSON summary)."""
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed
        import deepspeed.ops
    return deepspeed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Shard:
    """One rank's share of `n` items, padded so that every rank runs the same number of batches (a
    ZeRO-3 forward is collective): `indices` (padding rows repeat item 0) and `weights` (0 for
    padding, so a padding row is never counted)."""

    indices: list[int]
    weights: list[float]

    @property
    def valid(self) -> int:
        """How many of `indices` are real items (the rest is padding)."""
        return int(sum(self.weights))


@dataclass(frozen=True)
class DistContext:
    """This process's place in the group: rank, world size, local rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

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

    def padded_shard(self, n: int) -> Shard:
        """This rank's indices of `n` items (every world_size-th), padded to ceil(n / world_size)."""
        mine = list(range(self.rank, n, self.world_size))
        per_rank = math.ceil(n / self.world_size)
        padding = per_rank - len(mine)
        return Shard(indices=mine + [0] * padding, weights=[1.0] * len(mine) + [0.0] * padding)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (just [obj] in one process)."""
        if not (self.active and dist.is_initialized()):
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()


def all_reduce(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Collective reduction of CPU-or-device tensors (gloo needs CPU tensors, NCCL device ones)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    out = values.to(device)
    dist.all_reduce(out, op=op)
    return out.to(values.device)


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and prints."""
    return not dist.is_initialized() or dist.get_rank() == 0


def launched() -> bool:
    """True under a launcher that started several processes (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def context() -> DistContext:
    """This process's context: the live group's, else what the launcher's variables say."""
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return DistContext(rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", rank)))
    rank = int(os.environ.get("RANK", "0"))
    return DistContext(rank=rank, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                       local_rank=int(os.environ.get("LOCAL_RANK", str(rank))))


def setup(group_of_one: bool = False) -> DistContext:
    """Join (or create) the process group once; returns this process's context. Idempotent.

    Under a launcher, every rank joins its group (DeepSpeed's initialisation, so the engine and the
    evaluation share it); CPU threads are split between the node's ranks. A lone process gets a
    group only with `group_of_one` (a DeepSpeed engine needs one): it sets the launcher's variables
    itself (RANK=0, WORLD_SIZE=1, a free port). Its subprocesses inherit them; without the
    `SAFEVLM_LONE_PORT` mark they would take them for a launcher's and bind the parent's port, so a
    process whose MASTER_PORT is the marked one picks its own.
    """
    if dist.is_initialized():
        return context()
    inherited = os.environ.get(LONE_PORT_ENV) is not None and os.environ.get(LONE_PORT_ENV) == os.environ.get("MASTER_PORT")
    if not launched() and not group_of_one:
        return context()
    own_port = False
    if "RANK" not in os.environ or inherited:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        own_port = "MASTER_PORT" not in os.environ or inherited
        if own_port:
            os.environ["MASTER_PORT"] = os.environ[LONE_PORT_ENV] = str(_free_port())
    deepspeed = import_deepspeed()
    if not torch.cuda.is_available():
        # Plain gloo collectives on CPU: DeepSpeed would otherwise JIT-compile a shared-memory op.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    attempts = PORT_ATTEMPTS if own_port else 1
    for attempt in range(attempts):
        try:
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
            break
        except dist.DistNetworkError:
            if attempt == attempts - 1:
                raise
            os.environ["MASTER_PORT"] = os.environ[LONE_PORT_ENV] = str(_free_port())
    ctx = context()
    if torch.cuda.is_available():
        torch.cuda.set_device(ctx.local_rank % torch.cuda.device_count())
    elif ctx.active:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(ctx.world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return ctx


def teardown() -> None:
    """End a multi-process run cleanly: wait for every rank, then tear the group down. A process that
    exits with the group alive can abort its peer at exit ("terminate called without an active
    exception" with gloo), which the launcher reports as a failed run."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()
