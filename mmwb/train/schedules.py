"""Learning-rate schedules: linear warmup, then cosine, linear or constant.

The factors are transformers' ``get_{cosine,linear,constant}_schedule_with_warmup`` (tests check parity), written
on torch's ``LambdaLR`` here because importing ``transformers.optimization`` pulls in peft and costs seconds in
every (sub)process. The lambdas are ``functools.partial`` of module functions, so the scheduler's state dict
holds only numbers and loads with ``weights_only=True``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from mmwb.errors import MmwbConfigError


def make_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int
) -> LambdaLR:
    """A LambdaLR stepped once per optimizer step; the LR factor at step ``s`` is ``factor(s)``."""
    if not 0 <= warmup_steps <= total_steps:
        raise MmwbConfigError(
            f"warmup_steps must be in [0, {total_steps}] (the run's steps), got {warmup_steps}"
        )
    factors = {"cosine": cosine_factor, "linear": linear_factor, "constant": constant_factor}
    if name not in factors:
        raise MmwbConfigError(f"schedule must be one of {', '.join(factors)}, got {name!r}")
    return LambdaLR(optimizer, partial(factors[name], warmup=warmup_steps, total=total_steps))


def _warmup(step: int, warmup: int) -> float | None:
    return step / max(1, warmup) if step < warmup else None


def cosine_factor(step: int, warmup: int, total: int) -> float:
    """Half a cosine from 1 to 0 over the steps after warmup."""
    rising = _warmup(step, warmup)
    if rising is not None:
        return rising
    done = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * done)))


def linear_factor(step: int, warmup: int, total: int) -> float:
    """A straight line from 1 to 0 over the steps after warmup."""
    rising = _warmup(step, warmup)
    if rising is not None:
        return rising
    return max(0.0, (total - step) / max(1, total - warmup))


def constant_factor(step: int, warmup: int, total: int) -> float:
    """1 after warmup (``total`` is unused, kept for one signature)."""
    rising = _warmup(step, warmup)
    return rising if rising is not None else 1.0
