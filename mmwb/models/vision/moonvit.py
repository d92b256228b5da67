"""MoonViT: a native-resolution ViT (Kimi-VL / Kimi-K2.5's vision tower).

Images keep their aspect ratio and size (up to a patch budget): each becomes an ``h x w`` grid of patches, and all
images of a batch are packed into one sequence with block-diagonal attention, so there is no padding compute.
Positions are a learned ``(64, 64, C)`` table, bicubically resampled to each grid, plus a 2-D rotary embedding on
queries and keys (pairs of head channels alternate between the column and the row coordinate).

Module names follow Moonshot's original checkpoint layout (fused ``wqkv`` in interleaved-RoPE channel order,
``norm0/norm1``, ``mlp.fc0/fc1``, ``wo``), so original checkpoints load by stripping prefixes only;
``mmwb.models.vision.kimi_checkpoint`` also maps transformers' in-memory names onto these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmwb.errors import MmwbConfigError, MmwbInputError
from mmwb.models.vision.base import (
    ImageProcessor,
    PixelInputs,
    VisionFeatures,
    VisionTower,
    normalize,
    resize_uint8,
    rgb_uint8,
    to_unit_float,
)
from mmwb.models.vision.varlen import packed_attention

ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


@dataclass
class MoonViTConfig:
    patch_size: int = 14
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304
    pos_emb_height: int = 64
    pos_emb_width: int = 64
    rope_theta: float = 10000.0
    hidden_act: str = "gelu_pytorch_tanh"
    merge_kernel: tuple[int, int] = (2, 2)
    norm_eps: float = 1e-5
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_patches: int = 16384
    max_side_patches: int = 512

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise MmwbConfigError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise MmwbConfigError(
                f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a multiple of 4 "
                "(2-D RoPE splits each head into row and column halves of complex pairs)"
            )
        self.merge_kernel = tuple(self.merge_kernel)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class PatchEmbed(nn.Module):
    """Linear patch projection plus the learned position table resampled to each image's grid."""

    def __init__(self, config: MoonViTConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(3, config.hidden_size, kernel_size=p, stride=p)
        self.pos_emb = LearnedPositions(config)

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        # a stride-p conv on a p x p patch is a matmul: (N, 3, p, p) -> (N, 3*p*p) @ (3*p*p, C)
        hidden = F.linear(patches.flatten(1), self.proj.weight.flatten(1), self.proj.bias)
        return hidden + self.pos_emb(grids).to(hidden.dtype)


class LearnedPositions(nn.Module):
    def __init__(self, config: MoonViTConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.zeros(config.pos_emb_height, config.pos_emb_width, config.hidden_size)
        )

    def forward(self, grids: list[tuple[int, int]]) -> torch.Tensor:
        """``(sum h*w, C)`` positions; each distinct grid size is interpolated once."""
        resized = {grid: self._resize(grid) for grid in dict.fromkeys(grids)}
        return torch.cat([resized[grid] for grid in grids])

    def _resize(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid == tuple(self.weight.shape[:2]):
            return self.weight.flatten(0, 1)
        table = self.weight.permute(2, 0, 1)[None]  # (1, C, H0, W0)
        table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
        return table[0].permute(1, 2, 0).flatten(0, 1)  # (h*w, C)


def rope_angles(
    grids: list[tuple[int, int]], head_dim: int, theta: float, device: torch.device
) -> torch.Tensor:
    """``(sum h*w, head_dim/2)`` rotation angles; pair ``2k`` turns with the column, ``2k+1`` with the row."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 4, device=device, dtype=torch.float32) / head_dim)
    rows, cols = [], []
    for h, w in grids:
        r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        rows.append(r.flatten())
        cols.append(c.flatten())
    row, col = torch.cat(rows).float(), torch.cat(cols).float()
    # (N, D/4, 2) -> (N, D/2) ordered [col_0, row_0, col_1, row_1, ...]
    return torch.stack([col[:, None] * inv_freq, row[:, None] * inv_freq], dim=-1).flatten(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``(N, H, D)`` by ``(N, 1, D/2)`` angles, in fp32 like the reference."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (N, H, D/2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, config: MoonViTConfig) -> None:
        super().__init__()
        self.fc0 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc1 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.approximate = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate=self.approximate))


class MoonViTBlock(nn.Module):
    def __init__(self, config: MoonViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.norm0 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size)
        self.mlp = MLP(config)

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, token_counts: list[int]
    ) -> torch.Tensor:
        qkv = self.wqkv(self.norm0(hidden)).unflatten(-1, (3, self.num_heads, -1))  # (N, 3, H, D)
        query, key, value = qkv.unbind(1)
        attended = packed_attention(
            apply_rope(query, cos, sin), apply_rope(key, cos, sin), value, token_counts
        )
        hidden = hidden + self.wo(attended.flatten(1))
        return hidden + self.mlp(self.norm1(hidden))


class MoonViT(VisionTower):
    """Packed native-resolution ViT: ``PixelInputs(patches, grid_hw)`` -> packed ``(sum h*w, C)`` features."""

    _no_split_modules = ["MoonViTBlock"]  # gathered as one unit by sharded training

    def __init__(self, config: MoonViTConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList([MoonViTBlock(config) for _ in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def encode(self, inputs: PixelInputs) -> VisionFeatures:
        grids = _grids_of(inputs, self.config.patch_size)
        token_counts = [h * w for h, w in grids]
        hidden = self.patch_embed(inputs.pixel_values, grids)  # (sum h*w, C)
        angles = rope_angles(grids, self.config.head_dim, self.config.rope_theta, hidden.device)[:, None]
        cos, sin = angles.cos(), angles.sin()  # (N, 1, D/2)
        for block in self.blocks:
            hidden = block(hidden, cos, sin, token_counts)
        return VisionFeatures(self.final_layernorm(hidden), token_counts, grids)

    def image_processor(self) -> MoonViTImageProcessor:
        c = self.config
        return MoonViTImageProcessor(
            c.patch_size, c.merge_kernel, c.image_mean, c.image_std, c.max_patches, c.max_side_patches
        )


def _grids_of(inputs: PixelInputs, patch_size: int) -> list[tuple[int, int]]:
    if inputs.grid_hw is None:
        raise MmwbInputError("MoonViT needs packed patches with grid_hw; use MoonViT.image_processor()")
    grids = [(int(h), int(w)) for h, w in inputs.grid_hw.tolist()]
    expected = (sum(h * w for h, w in grids), 3, patch_size, patch_size)
    if tuple(inputs.pixel_values.shape) != expected:
        raise MmwbInputError(
            f"pixel_values has shape {tuple(inputs.pixel_values.shape)}, but grid_hw {grids} needs {expected}"
        )
    return grids


@dataclass
class MoonViTImageProcessor(ImageProcessor):
    """Keep each image's aspect ratio: shrink only to fit the patch budget, pad to whole merge blocks, patchify.

    Padding (black, at the bottom and right, as Kimi's processor does) makes each grid a multiple of the merge
    kernel so the pixel-shuffle projector can group 2x2 patches.
    """

    patch_size: int
    merge_kernel: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_patches: int = 16384
    max_side_patches: int = 512

    def __call__(self, images: Sequence[Image.Image]) -> PixelInputs:
        if not images:
            raise MmwbInputError("no images given to the image processor")
        patches, grids = zip(*(self._one(rgb_uint8(image), i) for i, image in enumerate(images)), strict=True)
        return PixelInputs(torch.cat(patches), torch.tensor(grids, dtype=torch.long))

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Resized ``(height, width)`` in pixels before padding; never upscales."""
        p = self.patch_size
        scale = min(
            1.0,
            math.sqrt(self.max_patches / ((height // p) * (width // p))),
            self.max_side_patches * p / height,
            self.max_side_patches * p / width,
        )
        return max(p, int(height * scale)), max(p, int(width * scale))

    def _one(self, pixels: torch.Tensor, index: int) -> tuple[torch.Tensor, tuple[int, int]]:
        _, height, width = pixels.shape
        p = self.patch_size
        if height < p or width < p:
            raise MmwbInputError(f"image {index} is {width}x{height} pixels, smaller than one {p}x{p} patch")
        size = self.target_size(height, width)
        if size != (height, width):
            pixels = resize_uint8(pixels, list(size))
        block_h, block_w = p * self.merge_kernel[0], p * self.merge_kernel[1]
        pad_h, pad_w = -size[0] % block_h, -size[1] % block_w
        pixels = normalize(to_unit_float(F.pad(pixels, (0, pad_w, 0, pad_h))), self.mean, self.std)
        rows, cols = pixels.shape[1] // p, pixels.shape[2] // p
        # (3, rows*p, cols*p) -> (rows*cols, 3, p, p) in raster order
        patches = pixels.unflatten(1, (rows, p)).unflatten(3, (cols, p)).permute(1, 3, 0, 2, 4).flatten(0, 1)
        return patches, (rows, cols)
