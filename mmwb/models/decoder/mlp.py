"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmwb.models.decoder.kernels.cpu import swiglu
from mmwb.models.decoder.linear import Linear


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._plain():  # decode-sized CPU inference: the whole MLP in one kernel call
            fused = swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
            if fused is not None:
                return fused
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def _plain(self) -> bool:
        """No adapter (peft LoRA) wraps a projection: their weights alone say what the MLP computes."""
        return all(type(m) is Linear for m in (self.gate_proj, self.up_proj, self.down_proj))
