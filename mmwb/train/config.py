"""The knobs of one training run, as a plain dataclass that YAML configs and CLI overrides fill in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass
class ParamGroupConfig:
    """Parameters whose name matches ``pattern`` (fnmatch, e.g. ``"projector.*"``) get their own LR/decay.

    The first matching group wins; unmatched trainable parameters use the run's ``lr`` and ``weight_decay``.
    """

    pattern: str
    lr: float | None = None
    weight_decay: float | None = None


@dataclass
class TrainConfig:
    """One run. A *step* is one optimizer update over ``batch_size * grad_accum * world_size`` samples."""

    out_dir: Path = Path("runs/train")
    max_steps: int | None = None  # optimizer steps; None means ``epochs`` full passes
    epochs: int = 1
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    clip_grad_norm: float | None = 1.0  # None: no clipping (the norm is still logged)
    precision: str = "fp32"  # fp32 | bf16 | fp16, checked against the device by mmwb.runtime
    device: str | None = None  # None: whatever accelerate picks (the launcher's GPU, else CPU)
    ema_decay: float | None = None  # None: no EMA; else the run ends with the EMA weights in the model
    eval_every: int = 0  # steps; 0: only at the end
    save_every: int = 0  # steps; 0: only at the end
    keep_last: int = 3  # newest checkpoints kept on disk; 0 keeps all
    max_bad_steps: int = 5  # NaN/inf losses in a row before the run stops
    log_every: int = 1
    seed: int = 0
    shuffle: bool = True
    num_workers: int = 0
    resume: str | None = None  # "latest" or the path of a checkpoint folder
    touch_all_params: bool = True  # give every trainable tensor a (zero) gradient each step; see engine.py
    find_unused_parameters: bool = False  # DDP's own (slower) search for unused parameters
    # none: DDP under a multi-process launch; full: FSDP2 ZeRO-3 (parameters, gradients and optimizer state
    # sharded); grad_op: FSDP's SHARD_GRAD_OP (ZeRO-2-like: the same split at rest, a unit's parameters stay
    # gathered from its forward to its backward). Sharded, unused tensors always get zero gradients (as the touch
    # above gives DDP). See mmwb/train/sharding.py
    sharding: Literal["none", "full", "grad_op"] = "none"
    shard_units: list[str] = field(
        default_factory=list
    )  # class names gathered as one unit, besides the model's
    # own _no_split_modules (decoder layers, vision blocks)
    progress: bool = True
    tensorboard: bool = True  # through accelerate's tracker, when tensorboard is installed
