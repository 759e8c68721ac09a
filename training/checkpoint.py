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
checkpoint, never a half-written one; a write that fails (a full disk) removes its temporary folder
and says so plainly, and the previous checkpoint stays the latest. `run_dir` must be on a file
system all ranks share.

Why checked: a checkpoint is only ever written when every tensor in it (trainables, optimizer
partitions and moments) is finite, so "the last good checkpoint" always names one that resumes. On
resume each candidate is read whole and verified before anything is loaded; a corrupt or truncated
newest checkpoint is skipped, with a warning saying why, for the newest older one that verifies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from runtime.distributed import import_deepspeed
from runtime.layout import StageLayout
from safety_modules.fileio import CorruptFileError, FileWriteError, read_json, write_file, write_text_atomic
from training.collectives import any_process

log = logging.getLogger(__name__)

LATEST = "latest"
TRAINABLE = "trainable.safetensors"
STATE = "state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
SHOWN_NAMES = 3          # tensor names quoted in an error


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or was written by a different setup."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's files cannot be read back or hold non-finite values; an older one may do."""


class NonFiniteCheckpoint(CheckpointError):
    """The state to be saved holds NaN/inf values; nothing was written."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return StageLayout(run_dir).checkpoints


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint folder `latest` names, or None when there is none."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    name = _read_pointer(pointer)
    path = checkpoint_root(run_dir) / name
    if not STEP_DIR.match(name) or not (path / STATE).is_file():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint")
    return path


def _read_pointer(pointer: Path) -> str:
    try:
        return pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptCheckpoint(f"{pointer}: cannot be read ({exc})") from None


def _step_of(path: Path) -> int:
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def candidate_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders to resume from, best first: the one `latest` names, then the
    older ones, newest first (all of them, newest first, when `latest` is missing or unreadable)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    done = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE).is_file()),
                  key=_step_of, reverse=True)
    try:
        named = latest_checkpoint(run_dir)
    except CheckpointError as exc:
        log.warning("%s; looking for the newest complete checkpoint instead", exc)
        named = None
    if named is None:
        return done
    return [named] + [p for p in done if _step_of(p) < _step_of(named)]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def nonfinite_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a nest of dicts/lists that hold a NaN or an inf."""
    if isinstance(obj, torch.Tensor):
        return [prefix or "tensor"] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [n for i, v in enumerate(obj) for n in nonfinite_tensors(v, f"{prefix}[{i}]")]
    return []


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Trainable parameters holding NaN/inf (this rank's partition under ZeRO-3); collective: the
    result is empty on every rank only when every rank's share is finite."""
    bad = [n for n, p in model.named_parameters()
           if p.requires_grad and not bool(torch.isfinite(getattr(p, "ds_tensor", p).detach()).all())]
    if any_process(bool(bad)) and not bad:
        return ["(a partition held by another process)"]
    return bad


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
    return ", ".join(names[:SHOWN_NAMES]) + more


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
        # Imported here: deepspeed is heavy, and `safevlm --help` imports this module.
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
    return import_deepspeed().zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


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


# -- save ----------------------------------------------------------------------------------------
def _latest_phrase(run_dir: str | Path, kind: str = "latest") -> str:
    """'the latest checkpoint is still X' (or 'the last good checkpoint is X'): what a failed save leaves."""
    try:
        latest = latest_checkpoint(run_dir)
    except CheckpointError:
        latest = None
    if latest is None:
        return "no checkpoint was written before it"
    return f"the latest checkpoint is still {latest}" if kind == "latest" else f"the last good checkpoint is {latest}"


def _attempt(action: Callable[[], None]) -> str | None:
    """Run one rank's part of a write; the error text (None on success) for the ranks to agree on."""
    try:
        action()
    except FileWriteError as exc:
        return str(exc)
    except OSError as exc:
        return f"{exc.filename or 'checkpoint'}: {exc.strerror or exc}"
    return None


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer, scheduler,
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` atomically on every rank; returns its folder. Collective.

    Raises NonFiniteCheckpoint (nothing written) when any tensor to be saved is NaN/inf, and
    CheckpointError (the temporary folder removed, `latest` unchanged) when a write fails.
    """
    root = checkpoint_root(run_dir)
    name = f"step-{step:06d}"
    final, tmp = root / name, root / f".tmp-{name}"
    tensors = trainable_tensors(model)              # collective under ZeRO-3: every rank calls it
    per_rank = {"optimizer": optimizer_state(optimizer), "scheduler": scheduler.state_dict(), "rng": rng_state()}
    bad = nonfinite_tensors(tensors) + nonfinite_tensors(per_rank["optimizer"], "optimizer")
    if any_process(bool(bad)):
        what = (f"{len(bad)} tensors hold NaN/inf ({_shown(bad)})" if bad
                else "another process's optimizer partition holds NaN/inf")
        raise NonFiniteCheckpoint(f"checkpoint {final} not written: {what}; {_latest_phrase(run_dir, 'good')}")

    def fail(error: str | None) -> None:
        if any_process(error is not None):
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"checkpoint {final} not written: {error or 'another process could not write its part'}"
                                  f"; {_latest_phrase(run_dir)}")

    def start() -> None:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        data = safetensors_bytes(tensors, metadata={"step": str(step)})
        write_file(tmp / TRAINABLE, lambda fh: fh.write(data))

    def finish() -> None:
        write_file(tmp / STATE, lambda fh: fh.write(json.dumps({**state, "step": step}, indent=2).encode("utf-8")))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, name)

    fail(_attempt(start) if _rank() == 0 else None)
    fail(_attempt(lambda: write_file(tmp / f"rank-{_rank():05d}.pt", lambda fh: torch.save(per_rank, fh))))
    fail(_attempt(finish) if _rank() == 0 else None)
    if _rank() == 0:
        _prune(root, keep, final)
    _barrier()
    return final


def _prune(root: Path, keep: int, newest: Path) -> None:
    """Delete all but the newest `keep` checkpoints (and temp folders of killed writes)."""
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    done = sorted(p for p in root.glob("step-*") if (p / STATE).is_file())
    for old in done[:-keep] if keep else []:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


# -- load ----------------------------------------------------------------------------------------
@dataclass
class CheckpointData:
    """One checkpoint read whole and verified (this rank's share), not yet applied."""

    path: Path
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    per_rank: dict[str, Any]


def read_checkpoint(path: Path, expect: dict[str, Any]) -> CheckpointData:
    """Read and verify `path` (state.json, trainable tensors, this rank's file) without loading it.

    Raises CorruptCheckpoint naming the file for anything unreadable, truncated or non-finite, and
    CheckpointError when the checkpoint was written with another layout (`expect`).
    """
    try:
        state = read_json(path / STATE, "checkpoint state")
    except (CorruptFileError, FileNotFoundError) as exc:
        raise CorruptCheckpoint(str(exc)) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or isinstance(state.get("step"), bool):
        raise CorruptCheckpoint(f"{path / STATE}: field 'step' is missing or not an integer")
    for key, value in expect.items():
        if state.get(key) != value:
            raise CheckpointError(f"{path}: written with {key}={state.get(key)!r}, this run has {value!r}; "
                                  "resume with the same setting")
    try:
        tensors = load_file(str(path / TRAINABLE))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpoint(f"{path / TRAINABLE}: corrupt or truncated ({exc})") from None
    rank_file = path / f"rank-{_rank():05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{rank_file}: missing (was the checkpoint written by fewer processes?)")
    try:
        per_rank = torch.load(rank_file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptCheckpoint(f"{rank_file}: corrupt or truncated ({first})") from None
    if not isinstance(per_rank, dict) or not {"optimizer", "scheduler", "rng"} <= set(per_rank):
        raise CorruptCheckpoint(f"{rank_file}: not a checkpoint file (expected optimizer, scheduler and rng)")
    bad = nonfinite_tensors(tensors) + nonfinite_tensors(per_rank["optimizer"], "optimizer")
    if bad:
        raise CorruptCheckpoint(f"{path}: {len(bad)} tensors hold NaN/inf ({_shown(bad)})")
    return CheckpointData(path, state, tensors, per_rank)


def apply_checkpoint(data: CheckpointData, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Restore model trainables, optimizer, scheduler and RNG from a verified checkpoint; its state."""
    if _zero_stage(optimizer) != 3:   # ZeRO-3 restores the model's partitions from the fp32 masters
        load_trainable_tensors(model, data.tensors, data.path)
    load_optimizer_state(optimizer, data.per_rank["optimizer"], data.path)
    scheduler.load_state_dict(data.per_rank["scheduler"])
    set_rng_state(data.per_rank["rng"])
    _barrier()
    return data.state


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler,
                    expect: dict[str, Any]) -> dict[str, Any]:
    """Restore model trainables, optimizer, scheduler and RNG from `path`; returns its state.json.

    `expect` holds settings that must equal the saved ones (world size, ZeRO stage, batch layout):
    partitioned optimizer states only fit the layout that wrote them.
    """
    return apply_checkpoint(read_checkpoint(path, expect), model, optimizer, scheduler)


def resume_checkpoint(run_dir: str | Path, model: torch.nn.Module, optimizer, scheduler,
                      expect: dict[str, Any]) -> tuple[Path, dict[str, Any], list[str]] | None:
    """Load the best checkpoint of `run_dir` that verifies on every rank. Collective.

    Returns (folder, its state, why each newer one was skipped), or None when there is none at all;
    raises CheckpointError listing every skipped one when none verifies.
    """
    candidates = candidate_checkpoints(run_dir)
    if not candidates:
        return None
    skipped: list[str] = []
    for path in candidates:
        try:
            data, problem = read_checkpoint(path, expect), None
        except CorruptCheckpoint as exc:
            data, problem = None, str(exc)
        if any_process(problem is not None):
            skipped.append(f"{path.name} skipped: {problem or 'another process could not read its part'}")
            continue
        return path, apply_checkpoint(data, model, optimizer, scheduler), skipped
    raise CheckpointError(f"{checkpoint_root(run_dir)}: no checkpoint verifies ({'; '.join(skipped)}); "
                          "remove the folder to start over")
