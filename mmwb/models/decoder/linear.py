"""nn.Linear whose decode-sized CPU products take mmwb's streaming kernel (mmwb.models.decoder.kernels.cpu).

Same parameters, names and results as nn.Linear (peft wraps it like one); only a forward with at most a few rows,
in fp32 on a CPU without autograd, runs differently.
"""

from __future__ import annotations

import torch
from torch import nn

from mmwb.models.decoder.kernels.cpu import linear


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
