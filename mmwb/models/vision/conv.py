"""A small convolutional tower for small images, trained with the rest of the VLM.

At the size of mmwb's shapes models a ViT learns 3-4x slower per step than convolutions (issue 19's measurement:
after ~2000 steps caption exact match 0.54 against 0.93): convolution's locality and weight sharing are the prior
such a small model needs. The tower keeps the 2-D layout to the end: each stage is a strided 3x3 convolution,
BatchNorm and GELU, and the last feature map is read out as one token per cell, row by row, with learned row and
column embeddings added, so every token knows where it is (a CLS-pooled tower loses that, and with it "left of").
64 px in, strides 2, 2, 2, 1: an 8x8 grid = 64 tokens of ``channels[-1]`` features.

``coordinates`` also adds a learned linear map of each cell's centre (x, y in [-1, 1]) to its token, as CoordConv
(Liu et al., 2018) adds coordinate channels: a table gives each place an arbitrary vector, so "which of two objects
lies further left" is something the decoder must learn per pair of places; with the linear term, place is a
direction in the token whose value attention can carry and the decoder can compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mmwb.errors import MmwbConfigError
from mmwb.models.vision.base import (
    FixedSizeImageProcessor,
    ImageProcessor,
    PixelInputs,
    VisionFeatures,
    VisionTower,
)

# the shapes images are synthetic: centre [0, 1] on 0, no data statistics needed
SHAPES_MEAN = (0.5, 0.5, 0.5)
SHAPES_STD = (0.5, 0.5, 0.5)


@dataclass
class ConvTowerConfig:
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 96, 128)
    strides: tuple[int, ...] = (2, 2, 2, 1)
    mean: tuple[float, float, float] = SHAPES_MEAN
    std: tuple[float, float, float] = SHAPES_STD
    coordinates: bool = False  # add a learned linear map of each cell's (x, y) centre to its token

    def __post_init__(self) -> None:
        self.channels, self.strides = tuple(self.channels), tuple(self.strides)
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if not self.channels or len(self.channels) != len(self.strides):
            raise MmwbConfigError(
                f"conv tower: {len(self.channels)} channel counts for {len(self.strides)} strides"
            )
        if self.image_size % self.reduction:
            raise MmwbConfigError(
                f"conv tower: image_size {self.image_size} is not a multiple of the total stride {self.reduction}"
            )

    @property
    def reduction(self) -> int:
        """How many pixels one output cell spans along each side."""
        return math.prod(self.strides)

    @property
    def grid(self) -> int:
        """Rows (= columns) of the output grid."""
        return self.image_size // self.reduction


class ConvTower(VisionTower):
    """``(B, 3, S, S)`` -> ``(B, grid * grid, channels[-1])``, tokens row by row with 2-D position embeddings."""

    def __init__(self, config: ConvTowerConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = config.channels[-1]
        widths = (3, *config.channels)
        self.stages = nn.Sequential(
            *(_stage(c_in, c_out, stride) for c_in, c_out, stride in zip(widths, widths[1:], config.strides))
        )
        self.row_embed = nn.Parameter(torch.zeros(config.grid, self.hidden_size))
        self.col_embed = nn.Parameter(torch.zeros(config.grid, self.hidden_size))
        nn.init.normal_(self.row_embed, std=0.02)
        nn.init.normal_(self.col_embed, std=0.02)
        # (C, 2): a table computed from fixed centres, like the row and column tables (not a layer that
        # quantization would touch); drawn as nn.Linear(2, C) draws its weight
        self.register_parameter(
            "coord_embed", nn.Parameter(torch.empty(self.hidden_size, 2)) if config.coordinates else None
        )
        if self.coord_embed is not None:
            nn.init.kaiming_uniform_(self.coord_embed, a=math.sqrt(5))

    def encode(self, inputs: PixelInputs) -> VisionFeatures:
        maps = self.stages(inputs.pixel_values)  # (B, C, g, g)
        batch, channels, rows, cols = maps.shape
        position = self.row_embed[:rows, None, :] + self.col_embed[None, :cols, :]  # (g, g, C)
        if self.coord_embed is not None:
            position = position + cell_centres(rows, cols, maps) @ self.coord_embed.T  # (g, g, C)
        tokens = maps.permute(0, 2, 3, 1) + position  # (B, g, g, C)
        return VisionFeatures(tokens.reshape(batch, rows * cols, channels), [rows * cols] * batch,
                              [(rows, cols)] * batch)  # fmt: skip

    def image_processor(self) -> ImageProcessor:
        return FixedSizeImageProcessor(self.config.image_size, self.config.mean, self.config.std, "squash")


def cell_centres(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """``(rows, cols, 2)``: each cell's centre as (x, y), both in [-1, 1], left to right and top to bottom."""
    ys = (torch.arange(rows, device=like.device, dtype=like.dtype) + 0.5) / rows * 2 - 1
    xs = (torch.arange(cols, device=like.device, dtype=like.dtype) + 0.5) / cols * 2 - 1
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)


def _stage(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()
    )
