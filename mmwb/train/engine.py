"""The training loop every mmwb recipe shares, built on accelerate.

accelerate owns the machinery: device placement, DDP/DeepSpeed wrapping (``accelerate launch``), mixed
precision, gradient accumulation (``accumulate``/``backward``) and clipping. mmwb owns what makes a run
trustworthy: exactly resumable data order (``data.py``), atomic checkpoints with RNG state (``checkpoint.py``),
NaN/inf steps that are skipped and counted instead of poisoning the weights, metrics on disk, and sharded
training (FSDP2, ``sharding.py``).

Unused parameters under DDP: an MoE layer whose expert gets no tokens on one rank leaves that expert without a
gradient there, and DDP's bucketed all-reduce then never finishes ("Expected to have finished reduction"). With
``touch_all_params`` (the default) the engine adds ``0 * p.flatten()[0]`` for every trainable tensor to the loss,
so every parameter takes part in every backward pass with a zero gradient. That costs one tiny op per tensor,
keeps DDP on its fast path (``find_unused_parameters=True`` re-walks the autograd graph every step), and gives a
single process and DDP the same gradients (zeros, not ``None``), so their AdamW updates match. Under sharding
(``train.sharding``, ``sharding.py``) FSDP2's own setting does the same inside each gathered unit.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    is_tensorboard_available,
    load_checkpoint_in_model,
    send_to_device,
)
from safetensors.torch import load_model, save_file, save_model
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmwb.errors import MmwbCheckpointError, MmwbConfigError, MmwbError
from mmwb.runtime import resolve_device, resolve_precision, seed_everything
from mmwb.train import checkpoint as ckpt
from mmwb.train import sharding
from mmwb.train.config import TrainConfig
from mmwb.train.data import CollatedBatch, DataPosition, ResumableBatchSampler, SkipBadItems, skip_bad_items
from mmwb.train.ema import make_ema
from mmwb.train.metrics import MetricsLog, plot_loss_curves, read_jsonl
from mmwb.train.schedules import make_scheduler

log = logging.getLogger(__name__)

LossOutput = torch.Tensor | tuple[torch.Tensor, dict[str, Any]]
LossFn = Callable[[nn.Module, Any], LossOutput]
EvalFn = Callable[[nn.Module], dict[str, float]]
_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# What a resumed run takes from its own config rather than from the checkpoint's optimizer state.
_HYPERPARAMETERS = ("initial_lr", "weight_decay", "betas", "eps")


class TrainingDivergedError(MmwbError):
    """The loss was NaN/inf for ``max_bad_steps`` steps in a row; the weights were never updated with them."""


@dataclass
class TrainResult:
    step: int
    epoch: int
    world_size: int
    rank: int
    last_loss: float
    bad_steps: int
    skipped_items: int
    checkpoint: Path | None
    metrics: Path
    plot: Path | None
    final_eval: dict[str, float] = field(default_factory=dict)
    # True when the model was sharded across processes: it stays sharded (and cannot run: the run ends the process
    # group), so the weights to build on are the consolidated checkpoint (``load_run_weights`` into a fresh copy)
    sharded: bool = False
    state_bytes: dict[str, int] = field(
        default_factory=dict
    )  # this rank's parameters/gradients/optimizer state


@dataclass
class _Progress:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    bad_in_a_row: int = 0
    bad_total: int = 0
    skipped_items: int = 0
    samples_seen: int = 0


@dataclass
class _StepStats:
    bad: bool
    loss: float
    items: int
    skipped: int
    extras: dict[str, float]
    grad_norm: float = float("nan")
    lr: float = float("nan")


def train(
    model: nn.Module,
    loss_fn: LossFn,
    dataset: Dataset,
    config: TrainConfig,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    eval_fn: EvalFn | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    on_save: Callable[[Path], None] | None = None,
    shardable: bool = False,
) -> TrainResult:
    """Train ``model`` on ``dataset`` with ``loss_fn(model, batch) -> loss | (loss, metrics)``; see ``Trainer``."""
    return Trainer(
        model,
        loss_fn,
        dataset,
        config,
        collate_fn=collate_fn,
        eval_fn=eval_fn,
        on_step=on_step,
        on_save=on_save,
        shardable=shardable,
    ).run()


def load_run_weights(module: nn.Module, result: TrainResult) -> nn.Module:
    """Load a run's final weights (its consolidated checkpoint) into ``module``, a fresh copy of what trained:
    after a sharded run (``result.sharded``) the trained module itself stays split across processes."""
    if result.checkpoint is None:
        raise MmwbCheckpointError("the run saved no checkpoint to load")
    load_checkpoint_in_model(module, str(result.checkpoint), strict=True)
    return module


class Trainer:
    """One run: build optimizer/schedule, resume if asked, loop over steps, evaluate, checkpoint, log.

    ``eval_fn(model) -> {name: value}`` runs on every process in eval mode without gradients (its values are
    logged with an ``eval_`` prefix, and again as ``ema_eval_`` on the EMA weights). ``on_step(step, record)``
    is called on every process after each optimizer step. ``on_save(folder)`` runs on the main process while a
    checkpoint is still staged, to add files of its own (a model config, say) that are published with it.

    ``train.sharding`` (full / grad_op) shards the model with FSDP2 under a multi-process launch; callers that
    can use a sharded result (see ``TrainResult.sharded``) say so with ``shardable=True``, the others refuse it.
    Sharded, ``eval_fn`` must run the same forwards on every rank (the same data, say): each unit's forward
    gathers its parameters collectively.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        dataset: Dataset,
        config: TrainConfig,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        eval_fn: EvalFn | None = None,
        on_step: Callable[[int, dict[str, Any]], None] | None = None,
        on_save: Callable[[Path], None] | None = None,
        shardable: bool = False,
    ) -> None:
        self.config = config
        self.on_save = on_save
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.on_step = on_step
        seed_everything(config.seed)
        self.accelerator = _make_accelerator(config)
        self.out_dir = Path(config.out_dir)
        self.checkpoints = self.out_dir / "checkpoints"
        if not config.resume and ckpt.list_checkpoints(self.checkpoints):
            raise MmwbConfigError(
                f"{self.checkpoints} holds checkpoints of an earlier run: resume it (resume: latest) "
                f"or pick another out_dir"
            )
        acc = self.accelerator
        self.sampler = ResumableBatchSampler(
            len(dataset),  # type: ignore[arg-type]
            config.batch_size,
            config.grad_accum,
            acc.num_processes,
            acc.process_index,
            config.seed,
            config.shuffle,
        )
        self.total_steps = config.max_steps or config.epochs * self.sampler.steps_per_epoch
        self.loader = DataLoader(
            SkipBadItems(dataset),
            batch_sampler=self.sampler,
            collate_fn=skip_bad_items(collate_fn),
            num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(config.seed),  # never draws from the global RNG
            pin_memory=acc.device.type == "cuda",
        )
        self.sharded = self._shard(model, shardable)  # before the optimizer: sharding replaces the parameters
        optimizer = torch.optim.AdamW(
            param_groups(model, config), lr=config.lr, betas=config.betas, eps=config.eps
        )
        self.scheduler = make_scheduler(optimizer, config.schedule, config.warmup_steps, self.total_steps)
        if self.sharded:
            self.model, self.optimizer = model, acc.prepare(optimizer)
        else:
            self.model, self.optimizer = acc.prepare(model, optimizer)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.ema: AveragedModel | None = (
            make_ema(acc.unwrap_model(self.model), config.ema_decay) if config.ema_decay is not None else None
        )
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        self.last_loss = float("nan")
        self.last_eval: dict[str, float] = {}
        self.saved_at = -1
        self.state_bytes: dict[str, int] = {}

    def _shard(self, model: nn.Module, shardable: bool) -> bool:
        """Apply ``train.sharding`` to ``model`` (in place) when more than one process trains; True if it did."""
        config, acc = self.config, self.accelerator
        if acc.distributed_type == DistributedType.FSDP:
            raise MmwbConfigError(
                "launched in accelerate's FSDP mode: mmwb shards with FSDP2 itself; launch as multi-GPU/CPU "
                "(configs/accelerate/README.md) and set train.sharding: full or grad_op"
            )
        if config.sharding == "none":
            return False
        if acc.distributed_type == DistributedType.DEEPSPEED:
            raise MmwbConfigError("train.sharding and a DeepSpeed launch both shard: use one of them")
        if not shardable:
            raise MmwbConfigError(
                f"train.sharding: {config.sharding}: this trainer does not support sharding yet"
            )
        if config.ema_decay is not None or acc.mixed_precision == "fp16":
            raise MmwbConfigError(
                "train.sharding works without EMA and with fp32 or bf16 (fp16 needs a sharded gradient scaler)"
            )
        if acc.num_processes == 1:
            log.info("train.sharding: %s with one process: nothing to shard", config.sharding)
            return False
        units = sharding.shard_units(
            model, sharding.unit_classes(model, config.shard_units), config.shard_units
        )
        param_dtype = torch.bfloat16 if acc.mixed_precision == "bf16" else None
        sharding.shard_model(model, config.sharding, units, param_dtype)
        log.info(
            "sharded (%s) over %d processes in %d units + the root",
            config.sharding,
            acc.num_processes,
            len(units),
        )
        return True

    # ----------------------------------------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        acc, config = self.accelerator, self.config
        progress, rng = self._resume() if config.resume else (_Progress(), None)
        self._prepare_outputs(progress)
        if rng is not None:
            ckpt.set_rng_state(rng)  # last thing before the loop: nothing may draw between here and step 1
        bar = tqdm(
            total=self.total_steps,
            initial=progress.step,
            desc="train",
            unit="step",
            file=sys.stderr,
            disable=not (acc.is_main_process and config.progress),
            dynamic_ncols=True,
        )
        started, samples_here = time.perf_counter(), 0
        batches: Iterator[CollatedBatch] | None = None
        self.model.train()
        while progress.step < self.total_steps:
            if batches is None:
                batches = self._epoch_batches(progress.position)
            stats = self._step(itertools.islice(batches, config.grad_accum))
            epoch = progress.position.epoch
            progress.position = self._advance(progress.position)
            if progress.position.sample == 0:
                batches = None  # epoch finished: the next one gets a new order
            progress.skipped_items += stats.skipped
            progress.samples_seen += stats.items
            samples_here += stats.items
            if stats.bad:
                self._count_bad_step(progress)
                continue
            if stats.items == 0:
                log.warning("a step's micro-batches held no readable item on any process: no update")
                continue
            progress.bad_in_a_row = 0
            progress.step += 1
            record = self._record(
                progress, epoch, stats, samples_here / max(time.perf_counter() - started, 1e-9)
            )
            bar.set_postfix(
                loss=f"{stats.loss:.4g}", samples_s=f"{record['samples_per_s']:.1f}", refresh=False
            )
            bar.update(1)
            self._after_step(progress, record)
        bar.close()
        return self._finish(progress)

    def _epoch_batches(self, position: DataPosition) -> Iterator[CollatedBatch]:
        """This rank's micro-batches from ``position`` to the end of its epoch."""
        self.sampler.set_position(position)
        self.loader.generator.manual_seed(
            self.config.seed + position.epoch
        )  # worker seeds: per epoch, not per run
        return iter(self.loader)

    def _prepare_outputs(self, progress: _Progress) -> None:
        """Clear what a killed run left (staging folders, log lines past its checkpoint); start trackers."""
        if self.accelerator.is_main_process:
            self._clear_stale_staging()
            if self.config.resume:
                self.metrics.truncate_after(progress.step)
                for path in ckpt.set_aside_after(self.checkpoints, progress.step):
                    log.warning(
                        "resumed from step %d: the later checkpoint is set aside as %s", progress.step, path
                    )
            else:
                self.metrics.path.unlink(missing_ok=True)
        self.saved_at = progress.step if self.config.resume else -1
        self.accelerator.init_trackers("mmwb-train")

    def _after_step(self, progress: _Progress, record: dict[str, Any]) -> None:
        config, step = self.config, progress.step
        if step % config.log_every == 0 or step == self.total_steps:
            self._log(record, step)
        if self.on_step is not None:
            self.on_step(step, record)
        if config.eval_every and step % config.eval_every == 0 and self.eval_fn is not None:
            self.last_eval = self._evaluate(step)
        self.last_loss = record["loss"]
        if config.save_every and step % config.save_every == 0:
            self._save(progress)

    def _finish(self, progress: _Progress) -> TrainResult:
        """Evaluate and save the final step (unless just done), plot the losses, close trackers."""
        acc, config = self.accelerator, self.config
        if self.eval_fn is not None and (not config.eval_every or progress.step % config.eval_every):
            self.last_eval = self._evaluate(progress.step)
        if self.saved_at != progress.step:
            self._save(progress)
        if (
            self.ema is not None
        ):  # the run's result is the average: what the caller exports and evaluates next
            acc.unwrap_model(self.model).load_state_dict(self.ema.module.state_dict())
        plot = None
        if acc.is_main_process:
            plot = plot_loss_curves(read_jsonl(self.metrics.path), self.out_dir / "loss.png")
        acc.wait_for_everyone()
        acc.end_training()
        return TrainResult(
            step=progress.step,
            epoch=progress.position.epoch,
            world_size=acc.num_processes,
            rank=acc.process_index,
            last_loss=self.last_loss,
            bad_steps=progress.bad_total,
            skipped_items=progress.skipped_items,
            checkpoint=ckpt.checkpoint_path(self.checkpoints, progress.step),
            metrics=self.metrics.path,
            plot=plot,
            final_eval=self.last_eval,
            sharded=self.sharded,
            state_bytes=self.state_bytes,
        )

    def _step(self, micro_batches: Iterable[CollatedBatch]) -> _StepStats:
        """One optimizer step over ``grad_accum`` micro-batches; a NaN/inf loss on any rank skips the update."""
        acc = self.accelerator
        zero = torch.zeros((), device=acc.device)
        loss_sum, good, bad, items, skipped = (
            zero.clone(),
            zero.clone(),
            zero.clone(),
            zero.clone(),
            zero.clone(),
        )
        extras: dict[str, torch.Tensor] = {}
        count = 0
        for collated in micro_batches:
            count += 1
            for reason in collated.skipped:
                log.warning("skipped a bad data item (%s)", reason)
            skipped += len(collated.skipped)
            with acc.accumulate(self.model):
                loss = self._touch()
                if self._runs_forward(collated):
                    batch = send_to_device(collated.data, acc.device)
                    value, metrics = _split_loss(self.loss_fn(self.model, batch))
                    finite = torch.isfinite(value.detach())
                    bad += ~finite
                    good += finite
                    loss_sum += torch.where(finite, value.detach().float(), zero)
                    items += _batch_size(batch)
                    for key, metric in metrics.items():
                        extras[key] = (
                            extras.get(key, zero) + torch.as_tensor(metric).detach().to(acc.device).float()
                        )
                    loss = loss + value
                if (
                    loss.requires_grad
                ):  # False for a micro-batch without data (and touch_all_params off / sharded)
                    acc.backward(loss)
        if count != self.config.grad_accum:
            raise RuntimeError(
                f"the sampler gave {count} micro-batches for one step, expected {self.config.grad_accum}"
            )
        keys = sorted(extras)
        totals = acc.reduce(
            torch.stack([loss_sum, good, bad, items, skipped, *(extras[k] for k in keys)]), "sum"
        )
        loss_total, good_n, bad_n, items_n, skipped_n, *extra_totals = totals.tolist()
        mean = (lambda total: total / good_n) if good_n else (lambda total: float("nan"))
        stats = _StepStats(
            bad=bad_n > 0,
            loss=mean(loss_total),
            items=int(items_n),
            skipped=int(skipped_n),
            extras={k: mean(v) for k, v in zip(keys, extra_totals)},
        )
        if not stats.bad and stats.items > 0:
            self._update(stats)
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def _runs_forward(self, collated: CollatedBatch) -> bool:
        """Whether this micro-batch has data to run. Sharded, every rank runs a forward or none does (a unit's
        gather is a collective): a micro-batch with no readable item on one rank is skipped on all of them."""
        here = collated.data is not None
        if not self.sharded:
            return here
        acc = self.accelerator
        ranks_with_data = acc.reduce(
            torch.tensor(float(here), device=acc.device), "sum"
        )  # accelerate has no min
        everywhere = int(ranks_with_data) == acc.num_processes
        if here and not everywhere:
            log.warning(
                "another rank's micro-batch held no readable item: this rank's %d items sit out the micro-batch "
                "too (sharded units run their forward on every rank or none)",
                _batch_size(collated.data),
            )
        return everywhere

    def _update(self, stats: _StepStats) -> None:
        """Clip, step optimizer/schedule/EMA. A non-finite gradient norm (outside fp16 scaling) is a bad step."""
        acc = self.accelerator
        max_norm = self.config.clip_grad_norm if self.config.clip_grad_norm is not None else math.inf
        norm = acc.clip_grad_norm_(
            self.params, max_norm
        )  # sharded: accelerate reduces over all ranks' shards
        stats.grad_norm = float(norm) if norm is not None else float("nan")
        if acc.scaler is None and norm is not None and not math.isfinite(stats.grad_norm):
            stats.bad = True
            return
        stats.lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        if not self.optimizer.step_was_skipped:  # fp16 overflow: the scaler already lowered its scale
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(acc.unwrap_model(self.model))
        if not self.state_bytes:  # once, while gradients and optimizer state both exist
            self.state_bytes = sharding.state_bytes(self.model, self.optimizer)

    def _touch(self) -> torch.Tensor:
        """Zero that depends on every trainable tensor (see the module docstring for why)."""
        if not self.config.touch_all_params or self.sharded:  # sharded: zeros come from FSDP (sharding.py)
            return torch.zeros((), device=self.accelerator.device)
        return torch.stack([p.reshape(-1)[:1].sum() for p in self.params]).sum() * 0.0

    def _advance(self, position: DataPosition) -> DataPosition:
        sample = position.sample + self.sampler.step_samples
        if sample >= self.sampler.steps_per_epoch * self.sampler.step_samples:
            return DataPosition(position.epoch + 1, 0)
        return DataPosition(position.epoch, sample)

    def _count_bad_step(self, progress: _Progress) -> None:
        progress.bad_in_a_row += 1
        progress.bad_total += 1
        log.warning(
            "step %d: non-finite loss or gradient, update skipped (%d in a row, %d in total)",
            progress.step + 1,
            progress.bad_in_a_row,
            progress.bad_total,
        )
        if progress.bad_in_a_row >= self.config.max_bad_steps:
            bad = progress.bad_in_a_row
            progress.bad_in_a_row = 0  # a resumed run (with a lower lr, say) counts afresh
            if (
                self.saved_at != progress.step
            ):  # skipped steps never touched the weights: these are the good ones
                self._save(progress)
            raise TrainingDivergedError(
                f"training stopped after step {progress.step}: the loss or gradient was NaN/inf for "
                f"{bad} steps in a row (max_bad_steps={self.config.max_bad_steps}); "
                f"lower lr, set clip_grad_norm, use fp32/bf16, or check the data, then resume from "
                f"{ckpt.checkpoint_path(self.checkpoints, progress.step)} (it holds the last good step)"
            )

    # ------------------------------------------------------------------------------------ logging and eval
    def _record(
        self, progress: _Progress, epoch: int, stats: _StepStats, samples_per_s: float
    ) -> dict[str, Any]:
        return {
            "step": progress.step,
            "epoch": epoch,
            "loss": stats.loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "samples_per_s": samples_per_s,
            "bad_steps": progress.bad_total,
            "skipped_items": progress.skipped_items,
            **stats.extras,
        }

    def _log(self, record: dict[str, Any], step: int) -> None:
        if self.accelerator.is_main_process:
            self.metrics.write(record)
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def _evaluate(self, step: int) -> dict[str, float]:
        assert self.eval_fn is not None
        live = self.accelerator.unwrap_model(
            self.model
        )  # eval_fn sees the model it was given, not a DDP wrapper
        results = {f"eval_{k}": float(v) for k, v in _eval(self.eval_fn, live).items()}
        if self.ema is not None:
            results |= {f"ema_eval_{k}": float(v) for k, v in _eval(self.eval_fn, self.ema.module).items()}
        self._log({"step": step, **results}, step)
        return results

    # --------------------------------------------------------------------------------------- checkpoints
    def _save(self, progress: _Progress) -> Path:
        """All ranks: the model (consolidated by rank 0 when sharded, plus every rank's shards of model and
        optimizer) and per-rank RNG into one staged folder."""
        acc = self.accelerator
        final = ckpt.checkpoint_path(self.checkpoints, progress.step)
        staging = ckpt.staging_path(final)
        if acc.is_main_process:
            ckpt.begin(final)
        acc.wait_for_everyone()
        if self.sharded:
            full = sharding.full_state_dict(self.model)  # every rank takes part; rank 0 gets the tensors
            if acc.is_main_process:
                save_file(full, str(staging / ckpt.MODEL_FILE), metadata={"format": "pt"})
            sharding.save_sharded(staging / sharding.SHARDED_DIR, self.model, self.optimizer)
        else:
            acc.save_model(self.model, staging, safe_serialization=True)
        ckpt.save_state(ckpt.rng_state(), ckpt.rng_path(staging, acc.process_index))
        if acc.is_main_process:
            ckpt.save_state(self._trainer_state(progress), staging / ckpt.STATE_FILE)
            if self.ema is not None:
                save_model(self.ema, str(staging / ckpt.EMA_FILE), force_contiguous=True)
            meta = {"step": progress.step, "world_size": acc.num_processes, "config": _jsonable(self.config)}
            (staging / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
            if self.on_save is not None:
                self.on_save(staging)
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.publish(staging, final)
            ckpt.prune(self.checkpoints, self.config.keep_last)
        acc.wait_for_everyone()
        self.saved_at = progress.step
        return final

    def _trainer_state(self, progress: _Progress) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {
            "step": progress.step,
            "epoch": progress.position.epoch,
            "sample": progress.position.sample,
            "bad_in_a_row": progress.bad_in_a_row,
            "bad_total": progress.bad_total,
            "skipped_items": progress.skipped_items,
            "samples_seen": progress.samples_seen,
            "global_batch": self.sampler.step_samples,
            "world_size": self.accelerator.num_processes,
            "sharding": self.config.sharding if self.sharded else "none",
            "optimizer": None
            if self.sharded
            else self.optimizer.state_dict(),  # sharded: in sharding.SHARDED_DIR
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "last_loss": self.last_loss,
            "last_eval": self.last_eval,
        }

    def _resume(self) -> tuple[_Progress, dict[str, Any] | None]:
        """Load weights, optimizer, schedule, EMA and position; returns the RNG state to set just before the loop."""
        acc = self.accelerator
        path = ckpt.find_checkpoint(self.checkpoints, self.config.resume or "latest")
        state = ckpt.load_state(path / ckpt.STATE_FILE)
        if state["global_batch"] != self.sampler.step_samples:
            raise MmwbCheckpointError(
                f"{path}: saved with a global batch of {state['global_batch']} samples per step, this run has "
                f"{self.sampler.step_samples}; keep batch_size x grad_accum x processes to resume exactly"
            )
        saved_sharding = state.get("sharding", "none")
        if (saved_sharding != "none") != self.sharded:  # full and grad_op checkpoints are alike
            this_run = f"{self.config.sharding} over {acc.num_processes}" + (
                " (one process shards nothing)" if acc.num_processes == 1 else ""
            )
            raise MmwbCheckpointError(
                f"{path}: saved with train.sharding {saved_sharding} over {state['world_size']} processes; resume "
                f"it sharded or not as it was saved (this run: {this_run})"
            )
        configured = [{key: group[key] for key in _HYPERPARAMETERS} for group in self.optimizer.param_groups]
        if self.sharded:
            sharding.load_sharded(path / sharding.SHARDED_DIR, self.model, self.optimizer)
        else:
            load_checkpoint_in_model(acc.unwrap_model(self.model), str(path), strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_hyperparameters(configured)
        if acc.scaler is not None and state["scaler"] is not None:
            acc.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            load_model(self.ema, str(path / ckpt.EMA_FILE), device=str(acc.device))
        rng_file = ckpt.rng_path(path, acc.process_index)
        rng = ckpt.load_state(rng_file) if state["world_size"] == acc.num_processes else None
        if rng is None:
            log.warning(
                "%s: saved by %d processes, resumed by %d: RNG streams restart",
                path,
                state["world_size"],
                acc.num_processes,
            )
        log.info("resumed from %s at step %d", path, state["step"])
        self.last_loss = state.get("last_loss", self.last_loss)  # absent from checkpoints of older versions
        self.last_eval = state.get("last_eval", self.last_eval)
        progress = _Progress(
            step=state["step"],
            position=DataPosition(state["epoch"], state["sample"]),
            bad_in_a_row=state["bad_in_a_row"],
            bad_total=state["bad_total"],
            skipped_items=state["skipped_items"],
            samples_seen=state["samples_seen"],
        )
        return progress, rng

    def _apply_hyperparameters(self, configured: list[dict[str, Any]]) -> None:
        """Put this run's lr, weight decay, betas and eps back after loading a checkpoint's optimizer and schedule
        (which carry the old run's): resuming with a lower lr after a divergence must train at the lower lr."""
        for group, values in zip(self.optimizer.param_groups, configured, strict=True):
            changed = {k: (group[k], v) for k, v in values.items() if group[k] != v}
            if changed:
                log.info("group %s: %s from this run's config", group.get("name"), changed)
            group.update(values)
        step, factors = self.scheduler.last_epoch, self.scheduler.lr_lambdas
        self.scheduler.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        for group, factor in zip(self.optimizer.param_groups, factors, strict=True):
            group["lr"] = group["initial_lr"] * factor(
                step
            )  # the schedule at the resumed step, this run's lr
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _clear_stale_staging(self) -> None:
        for stale in ckpt.recover(self.checkpoints):
            log.warning("removed %s, left by a run killed while saving", stale)


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: each ``config.param_groups`` pattern with its own LR/decay, then the rest; frozen excluded."""
    specs = config.param_groups
    groups: list[dict[str, Any]] = [
        {
            "params": [],
            "lr": spec.lr if spec.lr is not None else config.lr,
            "weight_decay": spec.weight_decay if spec.weight_decay is not None else config.weight_decay,
            "name": spec.pattern,
        }
        for spec in specs
    ]
    groups.append({"params": [], "lr": config.lr, "weight_decay": config.weight_decay, "name": "default"})
    for name, param in model.named_parameters():
        if param.requires_grad:
            index = next((i for i, spec in enumerate(specs) if fnmatch(name, spec.pattern)), len(specs))
            groups[index]["params"].append(param)
    for spec, group in zip(specs, groups):
        if not group["params"]:
            log.warning("param group %r matches no trainable parameter", spec.pattern)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise MmwbConfigError("the model has no trainable parameters (all have requires_grad=False)")
    return groups


def _make_accelerator(config: TrainConfig) -> Accelerator:
    """Map mmwb's precision names onto accelerate after checking them against the device."""
    if min(config.grad_accum, config.batch_size, config.log_every, config.max_bad_steps) < 1:
        raise MmwbConfigError("batch_size, grad_accum, log_every and max_bad_steps must be at least 1")
    if min(config.eval_every, config.save_every, config.keep_last) < 0:
        raise MmwbConfigError(
            "eval_every, save_every and keep_last must be 0 (at the end / keep all) or more"
        )
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    tracker = "tensorboard" if config.tensorboard and is_tensorboard_available() else None
    _fresh_accelerate_state()
    return Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=_MIXED_PRECISION[precision.name],
        gradient_accumulation_steps=config.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)],
        log_with=tracker,
        project_dir=str(config.out_dir),
    )


def _fresh_accelerate_state() -> None:
    """Forget the precision and device of an earlier Trainer in this process (``mmwb recipe`` runs several):
    accelerate keeps them process-wide and refuses a different precision. Under ``accelerate launch`` the process
    group (PartialState) is kept."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    AcceleratorState._reset_state(reset_partial_state=not launched)
    GradientState._reset_state()


def _split_loss(output: LossOutput) -> tuple[torch.Tensor, dict[str, Any]]:
    if isinstance(output, tuple):
        return output[0], output[1]
    return output, {}


def _batch_size(batch: Any) -> int:
    """Items in a collated batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    if isinstance(batch, list | tuple):
        return _batch_size(batch[0])
    return 1


def _eval(eval_fn: EvalFn, model: nn.Module) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return eval_fn(model)
    finally:
        model.train(was_training)


def _jsonable(config: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config), default=str))
