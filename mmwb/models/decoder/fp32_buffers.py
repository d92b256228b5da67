"""Buffers that stay fp32 when the model is cast to bf16/fp16."""

from __future__ import annotations

import torch
from torch import nn


class Fp32Buffers(nn.Module):
    """A module whose buffers named in ``fp32_buffers`` keep fp32 through ``.to(dtype)``/``.half()``, device moves
    still apply. RoPE frequencies rounded to bf16 turn cos(position x freq) wrong by up to 1.6 at position 2000;
    the router's balancing bias loses its small updates in bf16."""

    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse: bool = True):
        kept = {name: getattr(self, name) for name in self.fp32_buffers if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            moved = getattr(self, name)
            # the pre-cast values on the new device (a meta tensor has no values: to_empty keeps only the dtype)
            setattr(self, name, moved.float() if before.is_meta else before.to(moved.device, torch.float32))
        return self
