"""RMSNorm, computed in float32 whatever the activation dtype (as every supported family does)."""

from __future__ import annotations

import torch
from torch import nn

from mmwb.models.decoder.kernels.cpu import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
