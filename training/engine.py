"""The DeepSpeed training loop shared by every recipe (one process or many, CPU or GPU).

Launch: `safevlm train stage1 --config FILE` (one process), `torchrun --nproc-per-node N -m
safevlm.cli train ...`, or `deepspeed --num_gpus N --module safevlm.cli train ...`; several nodes:
`deepspeed --hostfile hostfile --module safevlm.cli train ...` (hostfile lines `node1 slots=8`; the
run folder must be on a file system all nodes share). A single process sets the rendezvous
variables itself (RANK=0, WORLD_SIZE=1, a free MASTER_PORT), so DeepSpeed is the engine on every
path: gloo and fp32 on CPU, NCCL and bf16 on GPU.

DeepSpeed JSON (`configs/deepspeed/zero2.json`, `zero3.json`): values written "auto" are filled from
TrainConfig (batch sizes, lr, betas, eps, weight decay, clipping, bf16). The optimizer is AdamW with
`torch_adam: true` (torch's own, nothing compiled); the LR schedule is ours (linear warm-up, then
cosine / linear / constant), stepped by DeepSpeed at each optimizer step.

One step = `gradient_accumulation_steps` micro-batches per process. The LM loss is normalised by the
number of response tokens in the whole global batch (all processes, all micro-batches), so one
process with accumulation and N processes without give the same loss and the same gradients.
"""

from __future__ import annotations

import json
import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from safety_modules.adapter_io import remember_base
from safety_modules.fileio import CorruptFileError, write_text_atomic
from safety_modules.labels import IGNORE_INDEX
from training import checkpoint as ckpt
from runtime import runlock
from runtime.distributed import all_reduce, import_deepspeed, is_main, setup
from training.config import TrainConfig
from training.records import RecordError

log = logging.getLogger(__name__)

# loss_fn(engine, batch, lm_num_items) -> (loss to backpropagate, {metric name: scalar tensor})
LossFn = Callable[[Any, dict[str, torch.Tensor], float], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; the message names the step and the last good
    checkpoint (one whose tensors were checked when it was written)."""


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of a metrics JSONL logged after `step` (a resumed run logs those steps again).

    A partial last line (the run was killed while writing it) is dropped with a warning; any other
    unreadable line is an error naming the file and the line, and the file is left as it was.
    """
    if not (is_main() and path.is_file()):
        return
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: cannot be read ({exc})") from None
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row_step = row.get("step", 0) if isinstance(row, dict) else None
        except json.JSONDecodeError as exc:
            if number == len(lines):
                log.warning("%s:%d: dropped a partial last line (a run was stopped while writing it)", path, number)
                continue
            raise CorruptFileError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                         "fix or remove that line to resume") from None
        if not isinstance(row_step, (int, float)):
            raise CorruptFileError(f"{path}:{number}: expected a JSON object with a numeric 'step'")
        if row_step <= step:
            kept.append(line)
    write_text_atomic(path, "".join(ln + "\n" for ln in kept))


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """One metrics line, written with a single call so a kill leaves at most a partial last line."""
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def load_latest_checkpoint(run_dir: Path, name: str, module, optimizer, scheduler,
                           layout: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
    """`--resume`: the newest checkpoint of `run_dir` that verifies, loaded into module/optimizer/
    scheduler (its layout checked against `layout`), as (path, saved state); None, with a warning,
    when there is none. A corrupt newer checkpoint is skipped with a warning saying why. Shared by
    the stage trainer and the PPO trainer, which restore their own counters from the state."""
    loaded = ckpt.resume_checkpoint(run_dir, module, optimizer, scheduler, layout)
    if loaded is None:
        if is_main():
            log.warning("%s: --resume: no checkpoint in %s, starting from step 0", name, run_dir)
        return None
    path, state, skipped = loaded
    if is_main():
        for reason in skipped:
            log.warning("%s: --resume: %s", name, reason)
    return path, state


def context_length(model: torch.nn.Module) -> int:
    """The longest sequence the model's language model takes (0: it does not say)."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "max_position_embeddings", 0) or 0)


def gpu_memory() -> dict[str, float]:
    """This process's peak GPU memory so far, for metrics.jsonl (empty on CPU): the figure that tells
    whether a recipe fits a GPU, logged at every step so a run that dies of OOM shows its trend."""
    if not torch.cuda.is_available():
        return {}
    return {"gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 3),
            "gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2 ** 30, 3)}


# -- DeepSpeed config and LR schedule ------------------------------------------------------------
def use_bf16(cfg: TrainConfig) -> bool:
    if cfg.precision == "bf16":
        return True
    return cfg.precision == "auto" and torch.cuda.is_available()


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON with every "auto" filled from `cfg`; an unknown "auto" is an error."""
    path = Path(cfg.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except OSError as exc:
        raise FileNotFoundError(f"train.deepspeed: cannot read {path} ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    accumulation = cfg.accumulation(world_size)
    values = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": cfg.micro_batch_size * accumulation * world_size,
        "gradient_clipping": cfg.grad_clip,
        "bf16.enabled": use_bf16(cfg),
        "optimizer.params.lr": cfg.lr,
        "optimizer.params.betas": list(cfg.adam_betas),
        "optimizer.params.eps": cfg.adam_eps,
        "optimizer.params.weight_decay": cfg.weight_decay,
    }

    def fill(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            return {k: fill(v, f"{prefix}{k}.") for k, v in node.items()}
        if node == "auto":
            key = prefix.rstrip(".")
            if key not in values:
                raise ValueError(f"{path}: {key}: 'auto' is not a value the trainer can fill "
                                 f"(it fills {sorted(values)})")
            return values[key]
        return node

    ds = fill(ds, "")
    ds.setdefault("steps_per_print", 10**9)      # our own progress bar and metrics do the reporting
    if ds.get("optimizer", {}).get("params", {}).get("torch_adam") is not True:
        raise ValueError(f"{path}: optimizer.params.torch_adam must be true (no JIT-compiled optimizers)")
    return ds


@dataclass
class WarmupDecay:
    """LR multiplier: linear warm-up to 1, then cosine / linear decay to min_ratio (or constant).

    A class rather than a lambda so the scheduler's state_dict holds plain numbers.
    """

    warmup: int
    total: int
    kind: str = "cosine"
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.min_ratio + (1 - self.min_ratio) * decay


def lr_schedule(cfg: TrainConfig, total_steps: int) -> WarmupDecay:
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    return WarmupDecay(warmup=min(warmup, total_steps), total=total_steps, kind=cfg.lr_schedule,
                       min_ratio=cfg.min_lr_ratio)


# -- the trainer ---------------------------------------------------------------------------------
def _register_zero3_external_parameters(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters when its forward runs; the safety tokens are read
    directly by the wrapper's forward, so they are registered with it."""
    deepspeed = import_deepspeed()

    safety = getattr(model, "safety", None)
    if safety is not None:
        for param in safety.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(model, param)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


@dataclass
class Trainer:
    """DeepSpeed engine + data + loop. `fit()` trains; `evaluate()` and `gather()` serve the recipes."""

    model: torch.nn.Module
    dataset: Any                          # map-style: dataset[i] -> row dict
    collate_fn: Callable
    loss_fn: LossFn
    cfg: TrainConfig
    run_dir: Path
    seed: int = 0
    name: str = "train"
    num_workers: int = 0                  # DataLoader worker processes
    engine: Any = field(init=False)
    rank: int = field(init=False)
    world: int = field(init=False)

    def __post_init__(self) -> None:
        deepspeed = import_deepspeed()

        self.run_dir = Path(self.run_dir)
        # One run per folder: a second run on it is refused before it writes anything.
        lock = runlock.acquire(self.run_dir) if runlock.is_main_process() else None
        if lock is not None:
            weakref.finalize(self, lock.release)
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        ctx = setup(group_of_one=True)
        self.rank, self.world = ctx.rank, ctx.world_size
        torch.manual_seed(self.seed)
        self.accumulation = self.cfg.accumulation(self.world)
        self.global_batch = self.cfg.micro_batch_size * self.world * self.accumulation
        self.steps_per_epoch = len(self.dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.name}: {len(self.dataset)} records are fewer than one global batch "
                             f"({self.global_batch} = micro {self.cfg.micro_batch_size} x {self.world} "
                             f"processes x {self.accumulation} accumulation)")
        self.total_steps = self.cfg.max_steps or self.cfg.epochs * self.steps_per_epoch
        ds_config = deepspeed_config(self.cfg, self.world)
        self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        if self.zero_stage == 3:
            _register_zero3_external_parameters(self.model)
            remember_base(self.model)        # the adapter's base hash, while the base is still whole
        if self.cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{self.name}: the model has no trainable parameters")
        schedule = lr_schedule(self.cfg, self.total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, model_parameters=params, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.dtype = torch.bfloat16 if use_bf16(self.cfg) else torch.float32
        self.sampler = DistributedSampler(self.dataset, num_replicas=self.world, rank=self.rank, shuffle=True,
                                          seed=self.seed, drop_last=True)
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.context = context_length(self.model)

    # -- data ------------------------------------------------------------------------------------
    def _epoch_loader(self, epoch: int, start_step: int):
        """This rank's micro-batches of `epoch`, from optimizer step `start_step` on (resume), each
        with the record indices it holds."""
        self.sampler.set_epoch(epoch)
        indices = list(self.sampler)
        size = self.cfg.micro_batch_size
        batches = [indices[i:i + size] for i in range(0, len(indices) - size + 1, size)]
        batches = batches[:self.steps_per_epoch * self.accumulation][start_step * self.accumulation:]
        loader = DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate_fn,
                            num_workers=self.num_workers)
        return zip(batches, loader)

    def _check_length(self, indices: list[int], batch: dict[str, torch.Tensor], dataset: Any) -> None:
        """A sequence longer than the model's context is refused, naming its record: the model would
        read positions it was never trained on without a word. Responses are cut only where the
        config asks for it (data.max_length)."""
        if not self.context or batch["input_ids"].shape[1] <= self.context:
            return
        lengths = batch["attention_mask"].sum(1).tolist()
        row = max(range(len(lengths)), key=lengths.__getitem__)
        record = dataset[indices[row]]
        where = record.get("source") if isinstance(record, dict) and record.get("source") else f"record {indices[row]}"
        raise RecordError(f"{where}: the sequence is {int(lengths[row])} tokens (prompt, image and response), "
                          f"over the model's context of {self.context} tokens; shorten it, or set data.max_length "
                          f"(at most {self.context}) to truncate responses on purpose")

    # -- checkpoints -----------------------------------------------------------------------------
    def _layout(self) -> dict[str, Any]:
        return {"world_size": self.world, "zero_stage": self.zero_stage,
                "micro_batch_size": self.cfg.micro_batch_size, "accumulation": self.accumulation,
                "total_steps": self.total_steps}

    def save(self, loss: float) -> Path:
        """Checkpoint the current step; a NaN/inf in the state stops the run (nothing written)."""
        state = {**self._layout(), "epoch": self.step // self.steps_per_epoch, "loss": loss,
                 "samples_seen": self.step * self.global_batch}
        try:
            self.last_checkpoint = ckpt.save_checkpoint(self.run_dir, self.step, self.engine.module, self.optimizer,
                                                        self.scheduler, state, keep=self.cfg.keep_checkpoints)
        except ckpt.NonFiniteCheckpoint as exc:
            raise TrainingDiverged(f"{self.name}: the update of step {self.step} made the weights NaN/inf; "
                                   f"stopping: {exc}") from None
        return self.last_checkpoint

    def _check_weights(self) -> None:
        """After the last update (which no later loss check sees): NaN/inf weights stop the run
        before anything is exported. Collective."""
        bad = ckpt.nonfinite_parameters(self.engine.module)
        if bad:
            where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                     else "no checkpoint was written before it")
            raise TrainingDiverged(f"{self.name}: the update of step {self.step} made {len(bad)} trainable tensors "
                                   f"NaN/inf ({', '.join(bad[:3])}); stopping, {where}")

    def resume(self) -> bool:
        """Load the latest checkpoint of run_dir, if any; True when one was loaded."""
        loaded = load_latest_checkpoint(self.run_dir, self.name, self.engine.module, self.optimizer, self.scheduler,
                                        self._layout())
        if loaded is None:
            return False
        path, state = loaded
        self.step = state["step"]
        self.engine.global_steps = self.step
        self.engine.global_samples = self.step * self.global_batch
        self.last_checkpoint = path
        self._truncate_metrics()
        if is_main():
            log.warning("%s: resumed from %s (step %d of %d)", self.name, path, self.step, self.total_steps)
        return True

    # -- metrics ---------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def _truncate_metrics(self) -> None:
        truncate_metrics(self.metrics_path, self.step)

    def _writer(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:          # tensorboard not installed: metrics.jsonl only
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    # -- the loop --------------------------------------------------------------------------------
    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = all_reduce(torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0]), dist.ReduceOp.MAX)
        if bad.item():
            where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                     else "no checkpoint was written before it")
            raise TrainingDiverged(f"{self.name}: loss is {loss.item()} (NaN/inf on at least one process) at step "
                                   f"{self.step + 1}; stopping, {where}")

    def fit(self) -> dict[str, Any]:
        """Train to `total_steps`; returns the last step's metrics and throughput."""
        from tqdm import tqdm

        self.run_dir.mkdir(parents=True, exist_ok=True)
        writer = self._writer() if is_main() else None
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.name, dynamic_ncols=True,
                   disable=not (is_main() and self.cfg.progress))
        self.engine.train()
        last: dict[str, float] = {}
        started, start_step = time.time(), self.step
        while self.step < self.total_steps:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            batches = iter(self._epoch_loader(epoch, offset))
            for _ in range(offset, self.steps_per_epoch):
                if self.step >= self.total_steps:
                    break
                micro = [next(batches) for _ in range(self.accumulation)]
                for indices, batch in micro:
                    self._check_length(indices, batch, self.dataset)
                last = self._train_step([batch for _, batch in micro], epoch)
                last["elapsed_s"] = time.time() - started       # wall clock incl. data loading
                last.update(gpu_memory())
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", samples_s=f"{last['samples_per_s']:.1f}")
                if is_main() and (self.step % self.cfg.log_every == 0 or self.step == self.total_steps):
                    append_metrics(self.metrics_path, last)
                    if writer is not None:
                        for key, value in last.items():
                            writer.add_scalar(f"{self.name}/{key}", value, self.step)
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self.save(last["loss"])
        bar.close()
        if writer is not None:
            writer.close()
        self._check_weights()
        elapsed = time.time() - started
        steps = self.step - start_step
        return {**last, "steps": self.step, "seconds": round(elapsed, 2), "processes": self.world,
                "mean_samples_per_s": steps * self.global_batch / elapsed if steps and elapsed else 0.0}

    def _train_step(self, micro_batches: list[dict[str, torch.Tensor]], epoch: int) -> dict[str, float]:
        start = time.time()
        lr = self.scheduler.get_last_lr()[0]          # the rate this step uses
        # Response tokens in the whole global batch: the LM loss is a mean over all of them.
        local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches if "labels" in b)
        tokens = all_reduce(torch.tensor([float(local), float(sum(int(b["attention_mask"].sum())
                                                                    for b in micro_batches))]))
        lm_items = max(tokens[0].item(), 1.0) / (self.world * self.accumulation)
        sums: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            batch = _to_device(batch, self.engine.device, self.dtype)
            loss, metrics = self.loss_fn(self.engine, batch, lm_items)
            self._check_finite(loss)
            self.engine.backward(loss)
            self.engine.step()
            for key, value in {"loss": loss, **metrics}.items():
                sums[key] = sums.get(key, 0) + value.detach().float().cpu()
        names = sorted(sums)
        means = all_reduce(torch.stack([sums[k] for k in names])) / (self.world * self.accumulation)
        elapsed = time.time() - start
        grad_norm = self.engine.get_global_grad_norm()
        out = {"step": self.step + 1, "epoch": epoch, "lr": lr}
        out.update({k: float(v) for k, v in zip(names, means)})
        out.update({"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "tokens": int(tokens[1].item()), "step_s": elapsed, "samples_per_s": self.global_batch / elapsed,
                    "tokens_per_s": tokens[1].item() / elapsed})
        return out

    # -- evaluation and export -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset: Any, collate_fn: Callable,
                 metric_fn: Callable[[Any, dict[str, torch.Tensor]], dict[str, tuple[torch.Tensor, torch.Tensor]]],
                 batch_size: int | None = None, limit: int = 0) -> dict[str, float]:
        """Weighted means over `dataset` (sharded over ranks, every record counted once).

        metric_fn(engine, batch) -> {name: (per-sample values, per-sample weights)}; the result is
        sum(values) / sum(weights) per name. All ranks run the same number of batches (ZeRO-3).
        """
        size = batch_size or self.cfg.micro_batch_size
        n = min(len(dataset), limit) if limit else len(dataset)
        mine = list(range(self.rank, n, self.world))
        per_rank = math.ceil(n / self.world)
        valid = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
        mine = mine + [0] * (per_rank - len(mine))        # padding rows, weight 0
        totals: dict[str, torch.Tensor] = {}
        self.engine.eval()
        for i in range(0, per_rank, size):
            rows = mine[i:i + size]
            batch = collate_fn([dataset[j] for j in rows])
            self._check_length(rows, batch, dataset)
            batch = _to_device(batch, self.engine.device, self.dtype)
            keep = torch.tensor(valid[i:i + size])
            for key, (values, weights) in metric_fn(self.engine, batch).items():
                pair = torch.stack([(values.float().cpu() * keep).sum(), (weights.float().cpu() * keep).sum()])
                totals[key] = totals.get(key, 0) + pair
        self.engine.train()
        names = sorted(totals)
        if not names:
            return {}
        reduced = all_reduce(torch.stack([totals[k] for k in names]))
        return {k: (v[0] / v[1]).item() if v[1] > 0 else float("nan") for k, v in zip(names, reduced)}

    def gather(self, params: list[torch.nn.Parameter]):
        """Context in which ZeRO-3 parameters are whole on every rank (for exports). Collective."""
        return ckpt.gather(params)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

