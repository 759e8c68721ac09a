"""Atomic training checkpoints with nothing but safetensors and weights-only torch files.

Layout of `<run_dir>/checkpoints/`::

    step-000040/trainable.safetensors   trainable tensors only (gathered under ZeRO-3), written by rank 0
    step-000040/rank-00000.pt           per rank: its ZeRO fp32 master partition, its optimizer state,
                                        the LR scheduler and RNG states
    step-000040/state.json              step, data position, world size, ZeRO stage, last loss
    latest                              the name of the newest complete checkpoint

Why not DeepSpeed's save/load_checkpoint: its loader unpickles with `torch.load(weights_only=False)`
and it saves the whole module. Here every `.pt` file holds only tensors and plain containers and is
read with `weights_only=True`; the partitioned optimizer state is taken from the ZeRO optimizer's
own fp32 partitions and its inner torch optimizer.

Why atomic: a checkpoint is written into a temporary folder and renamed into place, and `latest`
is replaced by rename too, so a run killed at any moment leaves either the old or the new
checkpoint, never a half-written one. `run_dir` must be on a file system all ranks share.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or was written by a different setup."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- what goes into a checkpoint -----------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from, as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(value: Any) -> Any:
    """random.setstate needs tuples; a round trip may give lists."""
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


def _zero_stage(optimizer) -> int:
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return 3
    if hasattr(optimizer, "single_partition_of_fp32_groups"):
        return 2
    raise CheckpointError(f"checkpoints support DeepSpeed ZeRO stages 1-3; the optimizer is "
                          f"{type(optimizer).__name__} (use configs/deepspeed/zero2.json or zero3.json)")


def optimizer_state(optimizer) -> dict[str, Any]:
    """This rank's share of the ZeRO optimizer: fp32 master partition + inner torch optimizer state."""
    if _zero_stage(optimizer) == 3:
        optimizer._set_fp32_optimizer_param_groups()
        inner = optimizer.optimizer.state_dict()
        optimizer._clear_fp32_optimizer_param_groups()
        fp32 = optimizer.fp32_partitioned_groups_flat
    else:
        inner = optimizer.optimizer.state_dict()
        fp32 = optimizer.single_partition_of_fp32_groups
    return {"fp32": [t.detach().cpu().clone() for t in fp32], "inner": inner}


def load_optimizer_state(optimizer, state: dict[str, Any], where: Path) -> None:
    """Restore this rank's optimizer share; under ZeRO-3 this also restores the model's partitions."""
    stage = _zero_stage(optimizer)
    current = optimizer.fp32_partitioned_groups_flat if stage == 3 else optimizer.single_partition_of_fp32_groups
    saved = state["fp32"]
    if len(saved) != len(current) or any(a.numel() != b.numel() for a, b in zip(saved, current)):
        raise CheckpointError(f"{where}: optimizer partitions do not match this run (different trainable "
                              "parameters, process count or ZeRO settings)")
    if stage == 3:
        from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, LOSS_SCALER, OPTIMIZER_STATE_DICT

        # DeepSpeed's own rigid loader, fed with safely loaded tensors: it copies the fp32 partitions,
        # the inner optimizer state, and refreshes the model's (bf16 or fp32) partitions from fp32.
        optimizer._rigid_load_state_dict({
            LOSS_SCALER: optimizer.loss_scaler, "dynamic_loss_scale": optimizer.dynamic_loss_scale,
            "overflow": optimizer.overflow, OPTIMIZER_STATE_DICT: state["inner"], FP32_FLAT_GROUPS: saved,
        })
        return
    optimizer.optimizer.load_state_dict(state["inner"])
    for cur, old in zip(current, saved):
        cur.data.copy_(old.to(cur.device, cur.dtype))


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the trainable parameters (gathered from all ranks under ZeRO-3), on CPU."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with gather([p for _, p in named]):
        return {n: p.detach().cpu().clone().contiguous() for n, p in named}


def gather(params: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """Context in which ZeRO-3 partitioned parameters are whole (a no-op for ZeRO-1/2)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


def load_trainable_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(named) != set(tensors):
        missing, unexpected = sorted(set(named) - set(tensors)), sorted(set(tensors) - set(named))
        raise CheckpointError(f"{where}: trainable tensors do not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    with gather(list(named.values()), modifier_rank=0), torch.no_grad():
        for name, param in named.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                      f"the model has {tuple(param.shape)}")
            param.copy_(tensors[name].to(param.device, param.dtype))


# -- save / load ---------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer, scheduler,
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` atomically on every rank; returns its folder. Collective."""
    root = checkpoint_root(run_dir)
    name = f"step-{step:06d}"
    final, tmp = root / name, root / f".tmp-{name}"
    tensors = trainable_tensors(model)              # collective under ZeRO-3: every rank calls it
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(tensors, str(tmp / "trainable.safetensors"), metadata={"step": str(step)})
    _barrier()
    per_rank = {"optimizer": optimizer_state(optimizer), "scheduler": scheduler.state_dict(), "rng": rng_state()}
    torch.save(per_rank, tmp / f"rank-{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, name)
        _prune(root, keep, final)
    _barrier()
    return final


def _prune(root: Path, keep: int, newest: Path) -> None:
    """Delete all but the newest `keep` checkpoints (and temp folders of killed writes)."""
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    for old in done[:-keep] if keep else []:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler,
                    expect: dict[str, Any]) -> dict[str, Any]:
    """Restore model trainables, optimizer, scheduler and RNG from `path`; returns its state.json.

    `expect` holds settings that must equal the saved ones (world size, ZeRO stage, batch layout):
    partitioned optimizer states only fit the layout that wrote them.
    """
    state = json.loads((path / "state.json").read_text())
    for key, value in expect.items():
        if state.get(key) != value:
            raise CheckpointError(f"{path}: written with {key}={state.get(key)!r}, this run has {value!r}; "
                                  "resume with the same setting")
    rank_file = path / f"rank-{_rank():05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{rank_file}: missing (was the checkpoint written by fewer processes?)")
    per_rank = torch.load(rank_file, map_location="cpu", weights_only=True)
    if _zero_stage(optimizer) != 3:   # ZeRO-3 restores the model's partitions from the fp32 masters
        load_trainable_tensors(model, load_file(str(path / "trainable.safetensors")), path)
    load_optimizer_state(optimizer, per_rank["optimizer"], path)
    scheduler.load_state_dict(per_rank["scheduler"])
    set_rng_state(per_rank["rng"])
    _barrier()
    return state
