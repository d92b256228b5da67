"""Kimi-VL's projector: merge each 2x2 block of patches into one token, LayerNorm, two-layer GELU MLP.

Merging shrinks the token count 4x before the language model sees it. The LayerNorm runs on each patch before
the merge (Kimi's ``pre_norm``), so weights from Kimi checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from mmwb.errors import MmwbInputError
from mmwb.models.vision.base import VisionFeatures


def merge_index(grids: list[tuple[int, int]], kernel: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``(sum h*w/(kh*kw), kh*kw)`` gather index grouping each image's raster patches into merge blocks."""
    kh, kw = kernel
    blocks, start = [], 0
    for h, w in grids:
        if h % kh or w % kw:
            raise MmwbInputError(f"a {h}x{w} patch grid cannot be merged in {kh}x{kw} blocks")
        index = torch.arange(start, start + h * w, device=device).view(h // kh, kh, w // kw, kw)
        blocks.append(index.permute(0, 2, 1, 3).reshape(-1, kh * kw))  # (h/kh * w/kw, kh*kw)
        start += h * w
    return torch.cat(blocks)


class PixelShuffleMLP(nn.Module):
    """``(sum N, C)`` patches -> ``(sum N/4, out_dim)`` tokens; dense ``(B, N, C)`` input gives ``(B, N/4, out)``."""

    def __init__(
        self, vision_dim: int, out_dim: int, kernel: tuple[int, int] = (2, 2), norm_eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.kernel = tuple(kernel)
        merged = vision_dim * self.kernel[0] * self.kernel[1]
        self.pre_norm = nn.LayerNorm(vision_dim, eps=norm_eps)
        self.in_proj = nn.Linear(merged, merged)
        self.act = nn.GELU()
        self.out_proj = nn.Linear(merged, out_dim)

    def forward(self, features: VisionFeatures) -> VisionFeatures:
        kh, kw = self.kernel
        if list(features.token_counts) != [h * w for h, w in features.grid_hw]:
            raise MmwbInputError(
                f"pixel_shuffle_mlp merges patch grids, but the tower gives {features.token_counts} tokens for grids "
                f"{features.grid_hw}: keep only patch tokens (drop_cls: true)"
            )
        packed = features.features.flatten(0, 1) if not features.packed else features.features  # (sum N, C)
        index = merge_index(features.grid_hw, self.kernel, packed.device)
        merged = self.pre_norm(packed)[index].flatten(1)  # (sum N/4, 4C)
        tokens = self.out_proj(self.act(self.in_proj(merged)))
        grids = [(h // kh, w // kw) for h, w in features.grid_hw]
        counts = [h * w for h, w in grids]
        if not features.packed:
            tokens = tokens.unflatten(0, (len(counts), -1))  # (B, N/4, out)
        return VisionFeatures(tokens, counts, grids)
