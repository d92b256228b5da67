"""Exponential moving average of the weights, on torch's own ``AveragedModel``.

After the first update the average equals the weights; after that ``ema = decay * ema + (1 - decay) * w``.
Buffers (e.g. BatchNorm statistics) are averaged too, so the EMA model is usable on its own for evaluation.
"""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mmwb.errors import MmwbConfigError


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """A copy of ``model`` (same device) that ``ema.update_parameters(model)`` moves towards the live weights."""
    if not 0.0 < decay < 1.0:
        raise MmwbConfigError(f"ema_decay must be in (0, 1), got {decay}")
    return (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        .eval()
        .requires_grad_(False)
    )
