"""The training engine every trainer stands on, and the supervised trainer of the stage recipes.

`Engine` owns what a DeepSpeed training run needs whatever it trains: the run folder's lock, the
process group (`runtime.distributed.setup`), DeepSpeed (config, initialize, LR schedule, ZeRO-3
registration), stepping with a finite-loss check, a finite-weights check after the last update,
checkpoints and resume, metrics (runtime/layout.py names the files), the progress bar, gather /
barrier, and rank-sharded evaluation batches. A trainer adds its data and its step: `Trainer`
(supervised, below) and `training.rl.trainer.PPOTrainer`.

Launch: `safevlm train stage1 --config FILE` (one process), `torchrun --nproc-per-node N -m
safevlm.cli train ...`, or `deepspeed --num_gpus N --module safevlm.cli train ...`; several nodes:
`deepspeed --hostfile hostfile --module safevlm.cli train ...` (hostfile lines `node1 slots=8`; the
run folder must be on a file system all nodes share). A single process gets a group of one, so
DeepSpeed is the engine on every path: gloo and fp32 on CPU, NCCL and bf16 on GPU.

One supervised step = `gradient_accumulation_steps` micro-batches per process. The LM loss is
normalised by the number of response tokens in the whole global batch (all processes, all
micro-batches), so one process with accumulation and N processes without give the same loss and the
same gradients.
"""

from __future__ import annotations

import logging
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from runtime import runlock
from runtime.distributed import all_reduce, import_deepspeed, is_main, setup
from runtime.layout import StageLayout
from safety_modules.adapter_io import remember_base
from safety_modules.labels import IGNORE_INDEX
from training import checkpoint as ckpt
from training.collator import to_device
from training.collectives import any_process, global_means
from training.config import TrainConfig
from training.deepspeed_setup import (WarmupDecay, deepspeed_config, lr_schedule,  # noqa: F401  (public API)
                                      register_zero3_external_parameters, use_bf16, zero_stage)
from training.records import RecordError
from training.run_metrics import MetricsLog, append_metrics, truncate_metrics  # noqa: F401  (public API)

log = logging.getLogger(__name__)

# loss_fn(engine, batch, lm_num_items) -> (loss to backpropagate, {metric name: scalar tensor})
LossFn = Callable[[Any, dict[str, torch.Tensor], float], tuple[torch.Tensor, dict[str, torch.Tensor]]]
# metric_fn(engine, batch) -> {name: (per-sample values, per-sample weights)}
MetricFn = Callable[[Any, dict[str, torch.Tensor]], dict[str, tuple[torch.Tensor, torch.Tensor]]]


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; the message names the step and the last good
    checkpoint (one whose tensors were checked when it was written)."""


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


def _hold_run_lock(owner: object, run_dir: Path) -> None:
    """One run per folder: a second run on it is refused before it writes anything. The lock lives
    as long as `owner` (the main rank takes it; all ranks of a run share the folder)."""
    lock = runlock.acquire(run_dir) if runlock.is_main_process() else None
    if lock is not None:
        weakref.finalize(owner, lock.release)


class Engine:
    """DeepSpeed around one module, and everything a trainer does besides its own data and step.

    A subclass calls `super().__init__` (lock, threads, process group), seeds, works out its step
    counts, then `start_deepspeed`; it implements `_train_steps` (advance `self.step`, yield each
    step's metrics), `_layout` (what a checkpoint must agree on), `_checkpoint_state` and `_restore`
    (its own counters), `_postfix` (the progress bar) and `_throughput` (the summary's rate).
    `engine` is the DeepSpeed engine; `model` the module it trains.
    """

    total_steps: int
    zero_stage: int
    engine: Any
    optimizer: Any
    scheduler: Any
    dtype: torch.dtype

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, seed: int, name: str) -> None:
        self.cfg, self.run_dir, self.seed, self.name = cfg, Path(run_dir), seed, name
        self.paths = StageLayout(self.run_dir)
        _hold_run_lock(self, self.run_dir)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.group = setup(group_of_one=True)
        self.rank, self.world = self.group.rank, self.group.world_size
        self.step = 0
        self.last_checkpoint: Path | None = None

    # -- DeepSpeed -------------------------------------------------------------------------------
    def start_deepspeed(self, module: torch.nn.Module, trunk: torch.nn.Module, ds_cfg: TrainConfig,
                        schedule_steps: int) -> None:
        """DeepSpeed around `module` (its trainable tensors, one optimizer), the LR schedule over
        `schedule_steps` optimizer steps. `trunk` is the attached model inside it: the one whose
        safety tokens ZeRO-3 must gather and whose layers gradient checkpointing wraps."""
        deepspeed = import_deepspeed()
        ds_config = deepspeed_config(ds_cfg, self.world)
        self.zero_stage = zero_stage(ds_config)
        if self.zero_stage == 3:
            register_zero3_external_parameters(trunk)
            remember_base(trunk)        # the adapter's base hash, while the base is still whole
        if ds_cfg.gradient_checkpointing:
            trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{self.name}: the model has no trainable parameters")
        schedule = lr_schedule(ds_cfg, schedule_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, model_parameters=params, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.dtype = torch.bfloat16 if use_bf16(ds_cfg) else torch.float32

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return to_device(batch, self.engine.device, self.dtype)

    def backward_step(self, loss: torch.Tensor) -> None:
        """Backward and (at the accumulation boundary) the optimizer step; a NaN/inf loss on any
        process stops the run first. Collective."""
        self._check_finite(loss)
        self.engine.backward(loss)
        self.engine.step()

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # -- divergence ------------------------------------------------------------------------------
    def _last_good(self) -> str:
        return (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "no checkpoint was written before it")

    def _check_finite(self, loss: torch.Tensor) -> None:
        if any_process(not bool(torch.isfinite(loss.detach()).all())):
            raise TrainingDiverged(f"{self.name}: loss is {loss.item()} (NaN/inf on at least one process) at step "
                                   f"{self.step + 1}; stopping, {self._last_good()}")

    def _check_weights(self) -> None:
        """After the last update (which no later loss check sees): NaN/inf weights stop the run
        before anything is exported. Collective."""
        bad = ckpt.nonfinite_parameters(self.engine.module)
        if bad:
            raise TrainingDiverged(f"{self.name}: the update of step {self.step} made {len(bad)} trainable tensors "
                                   f"NaN/inf ({', '.join(bad[:3])}); stopping, {self._last_good()}")

    # -- checkpoints -----------------------------------------------------------------------------
    def _layout(self) -> dict[str, Any]:
        """What a checkpoint must agree on with this run to resume it (world size, batch layout...)."""
        raise NotImplementedError

    def _checkpoint_state(self, loss: float) -> dict[str, Any]:
        """The trainer's own counters a checkpoint keeps besides the layout."""
        raise NotImplementedError

    def _restore(self, state: dict[str, Any]) -> None:
        """Set the trainer's own counters from a checkpoint's state (`self.step` is already set)."""
        raise NotImplementedError

    def save(self, loss: float) -> Path:
        """Checkpoint the current step; a NaN/inf in the state stops the run (nothing written)."""
        state = {**self._layout(), **self._checkpoint_state(loss)}
        try:
            self.last_checkpoint = ckpt.save_checkpoint(self.run_dir, self.step, self.engine.module, self.optimizer,
                                                        self.scheduler, state, keep=self.cfg.keep_checkpoints)
        except ckpt.NonFiniteCheckpoint as exc:
            raise TrainingDiverged(f"{self.name}: the update of step {self.step} made the weights NaN/inf; "
                                   f"stopping: {exc}") from None
        return self.last_checkpoint

    def resume(self) -> bool:
        """Load the newest checkpoint of run_dir that verifies (its layout checked against this run's);
        True when one was loaded. A corrupt newer checkpoint is skipped with a warning saying why."""
        loaded = ckpt.resume_checkpoint(self.run_dir, self.engine.module, self.optimizer, self.scheduler,
                                        self._layout())
        if loaded is None:
            if is_main():
                log.warning("%s: --resume: no checkpoint in %s, starting from step 0", self.name, self.run_dir)
            return False
        path, state, skipped = loaded
        if is_main():
            for reason in skipped:
                log.warning("%s: --resume: %s", self.name, reason)
        self.step = state["step"]
        self._restore(state)
        self.last_checkpoint = path
        truncate_metrics(self.metrics_path, self.step)
        if is_main():
            log.info("%s: resumed from %s (step %d of %d)", self.name, path, self.step, self.total_steps)
        return True

    # -- the loop --------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.paths.metrics

    def _train_steps(self) -> Iterator[dict[str, Any]]:
        """Train from `self.step` to `total_steps`, advancing `self.step` and yielding each step's metrics."""
        raise NotImplementedError

    def _postfix(self, row: dict[str, Any]) -> dict[str, str]:
        """The progress bar's figures for a step's metrics."""
        raise NotImplementedError

    def _throughput(self, elapsed: float, steps: int) -> dict[str, float]:
        """The summary's rate over `steps` steps that took `elapsed` seconds."""
        raise NotImplementedError

    def fit(self) -> dict[str, Any]:
        """Train to `total_steps`; returns the last step's metrics and throughput. Logs every
        `log_every` steps (and the last), checkpoints every `save_every`; NaN/inf weights after the
        last update stop the run before anything is exported."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(self.paths, self.name)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.name, dynamic_ncols=True,
                   disable=not (is_main() and self.cfg.progress))
        last: dict[str, Any] = {}
        started, start_step = time.time(), self.step
        try:
            for last in self._train_steps():
                last["elapsed_s"] = time.time() - started       # wall clock incl. data loading
                last.update(gpu_memory())
                bar.update(1)
                bar.set_postfix(self._postfix(last))
                if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                    metrics.write(last, self.step)
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self.save(last["loss"])
        finally:
            bar.close()
            metrics.close()
        self._check_weights()
        elapsed = time.time() - started
        return {**last, "steps": self.step, "seconds": round(elapsed, 2), "processes": self.world,
                **self._throughput(elapsed, self.step - start_step)}

    # -- evaluation and export -------------------------------------------------------------------
    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """The engine in eval mode within the block, back in train mode after it."""
        self.engine.eval()
        try:
            yield
        finally:
            self.engine.train()

    def shard_batches(self, n: int, size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
        """This rank's share of `n` items in batches of `size`: (indices, weights), weight 0 for the
        padding rows that give every rank the same number of batches (a ZeRO-3 forward is collective)."""
        shard = self.group.padded_shard(n)
        for start in range(0, len(shard.indices), size):
            yield shard.indices[start:start + size], torch.tensor(shard.weights[start:start + size])

    def gather(self, params: list[torch.nn.Parameter]):
        """Context in which ZeRO-3 parameters are whole on every rank (for exports). Collective."""
        return ckpt.gather(params)

    def barrier(self) -> None:
        self.group.barrier()


class Trainer(Engine):
    """The supervised trainer of the stage recipes: a map-style dataset, a collate function and a
    loss function on the engine. `fit()` trains; `evaluate()` and `gather()` serve the recipes."""

    def __init__(self, model: torch.nn.Module, dataset: Any, collate_fn: Callable, loss_fn: LossFn,
                 cfg: TrainConfig, run_dir: str | Path, seed: int = 0, name: str = "train",
                 num_workers: int = 0) -> None:
        self.model, self.dataset, self.collate_fn, self.loss_fn = model, dataset, collate_fn, loss_fn
        self.num_workers = num_workers                  # DataLoader worker processes
        super().__init__(cfg, run_dir, seed, name)
        torch.manual_seed(seed)
        self.accumulation = cfg.accumulation(self.world)
        self.global_batch = cfg.micro_batch_size * self.world * self.accumulation
        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{name}: {len(dataset)} records are fewer than one global batch "
                             f"({self.global_batch} = micro {cfg.micro_batch_size} x {self.world} "
                             f"processes x {self.accumulation} accumulation)")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.start_deepspeed(model, model, cfg, self.total_steps)
        self.sampler = DistributedSampler(dataset, num_replicas=self.world, rank=self.rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.context = context_length(model)

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

    def _checkpoint_state(self, loss: float) -> dict[str, Any]:
        return {"epoch": self.step // self.steps_per_epoch, "loss": loss,
                "samples_seen": self.step * self.global_batch}

    def _restore(self, state: dict[str, Any]) -> None:
        self.engine.global_steps = self.step
        self.engine.global_samples = self.step * self.global_batch

    # -- the loop --------------------------------------------------------------------------------
    def _train_steps(self) -> Iterator[dict[str, Any]]:
        self.engine.train()
        while self.step < self.total_steps:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            batches = iter(self._epoch_loader(epoch, offset))
            for _ in range(offset, self.steps_per_epoch):
                if self.step >= self.total_steps:
                    break
                micro = [next(batches) for _ in range(self.accumulation)]
                for indices, batch in micro:
                    self._check_length(indices, batch, self.dataset)
                row = self._train_step([batch for _, batch in micro], epoch)
                self.step += 1
                yield row

    def _postfix(self, row: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{row['loss']:.4f}", "samples_s": f"{row['samples_per_s']:.1f}"}

    def _throughput(self, elapsed: float, steps: int) -> dict[str, float]:
        return {"mean_samples_per_s": steps * self.global_batch / elapsed if steps and elapsed else 0.0}

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
            loss, metrics = self.loss_fn(self.engine, self.to_device(batch), lm_items)
            self.backward_step(loss)
            for key, value in {"loss": loss, **metrics}.items():
                sums[key] = sums.get(key, 0) + value.detach().float().cpu()
        names = sorted(sums)
        means = all_reduce(torch.stack([sums[k] for k in names])) / (self.world * self.accumulation)
        elapsed = time.time() - start
        out = {"step": self.step + 1, "epoch": epoch, "lr": lr}
        out.update({k: float(v) for k, v in zip(names, means)})
        out.update({"grad_norm": self.grad_norm(), "tokens": int(tokens[1].item()), "step_s": elapsed,
                    "samples_per_s": self.global_batch / elapsed, "tokens_per_s": tokens[1].item() / elapsed})
        return out

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset: Any, collate_fn: Callable, metric_fn: MetricFn, batch_size: int | None = None,
                 limit: int = 0) -> dict[str, float]:
        """Weighted means over `dataset` (sharded over ranks, every record counted once).

        metric_fn(engine, batch) -> {name: (per-sample values, per-sample weights)}; the result is
        sum(values) / sum(weights) per name. All ranks run the same number of batches (ZeRO-3).
        """
        size = batch_size or self.cfg.micro_batch_size
        n = min(len(dataset), limit) if limit else len(dataset)
        totals: dict[str, torch.Tensor] = {}
        with self.evaluating():
            for rows, keep in self.shard_batches(n, size):
                batch = collate_fn([dataset[j] for j in rows])
                self._check_length(rows, batch, dataset)
                for key, (values, weights) in metric_fn(self.engine, self.to_device(batch)).items():
                    pair = torch.stack([(values.float().cpu() * keep).sum(), (weights.float().cpu() * keep).sum()])
                    totals[key] = totals.get(key, 0) + pair
        return global_means({k: (v[0], v[1]) for k, v in totals.items()}, dtype=torch.float32)
