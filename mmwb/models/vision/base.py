"""The one interface every vision tower speaks: images in, ``(B, N, C)`` or packed ``(sum N, C)`` features out.

A fixed-resolution tower (CLIP, SigLIP, open_clip) returns a dense ``(B, N, C)`` batch; a native-resolution tower
(MoonViT) returns one packed sequence, because its images have different token counts and padding them to a common
length would waste compute. ``token_counts`` and ``grid_hw`` tell the projector and the VLM where each image is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as tvf

from mmwb.errors import MmwbConfigError, MmwbInputError


@dataclass
class PixelInputs:
    """What an image processor hands a tower.

    ``pixel_values`` is ``(B, 3, H, W)`` for fixed-size towers, or ``(sum N, 3, p, p)`` patches for native-resolution
    towers, in which case ``grid_hw`` holds each image's ``(rows, cols)`` patch grid as a ``(B, 2)`` long tensor.
    """

    pixel_values: torch.Tensor
    grid_hw: torch.Tensor | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> PixelInputs:
        grid = None if self.grid_hw is None else self.grid_hw.to(device)
        return PixelInputs(self.pixel_values.to(device=device, dtype=dtype), grid)


@dataclass
class VisionFeatures:
    """Tower (or projector) output: dense ``(B, N, C)`` or packed ``(sum N, C)`` with per-image token counts."""

    features: torch.Tensor
    token_counts: list[int]
    grid_hw: list[tuple[int, int]]

    @property
    def packed(self) -> bool:
        return self.features.dim() == 2

    def per_image(self) -> list[torch.Tensor]:
        """One ``(N_i, C)`` tensor per image, views where possible."""
        if self.packed:
            return list(torch.split(self.features, self.token_counts))
        return list(self.features.unbind(0))

    def with_features(self, features: torch.Tensor) -> VisionFeatures:
        """Same layout, new values (for token-wise maps such as an MLP projector)."""
        return VisionFeatures(features, self.token_counts, self.grid_hw)


class VisionTower(nn.Module, ABC):
    """A vision encoder: ``encode(PixelInputs) -> VisionFeatures`` with ``hidden_size`` channels."""

    hidden_size: int

    @abstractmethod
    def encode(self, inputs: PixelInputs) -> VisionFeatures: ...

    @abstractmethod
    def image_processor(self) -> ImageProcessor:
        """The processor that turns PIL images into this tower's ``PixelInputs``."""

    def feature_settings(self) -> dict[str, bool | int | str]:
        """Settings outside the weights that change the features (which tokens are kept, a final norm); a
        feature cache keys on them beside the weights."""
        return {}

    def forward(self, inputs: PixelInputs) -> VisionFeatures:
        return self.encode(inputs)


class ImageProcessor(ABC):
    """PIL images -> ``PixelInputs``; one per tower, because resizing and normalisation belong to the weights."""

    @abstractmethod
    def __call__(self, images: Sequence[Image.Image]) -> PixelInputs: ...


def rgb_uint8(image: Image.Image) -> torch.Tensor:
    """A PIL image as a ``(3, H, W)`` uint8 tensor; resizing stays in uint8 so results match PIL-based processors."""
    if not isinstance(image, Image.Image):
        raise MmwbInputError(f"expected a PIL image, got {type(image).__name__}")
    return tvf.pil_to_tensor(image.convert("RGB"))


def resize_uint8(pixels: torch.Tensor, size: int | list[int]) -> torch.Tensor:
    """Bicubic, antialiased resize of a uint8 image (``size``: short side, or ``[height, width]``)."""
    return tvf.resize(pixels, size, interpolation=tvf.InterpolationMode.BICUBIC, antialias=True)


def to_unit_float(pixels: torch.Tensor) -> torch.Tensor:
    return tvf.to_dtype(pixels, torch.float32, scale=True)


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    return tvf.normalize(pixels, list(mean), list(std))


RESIZE_MODES = ("squash", "pad", "crop")


@dataclass
class FixedSizeImageProcessor(ImageProcessor):
    """Resize every image to ``size x size`` for CLIP-like towers.

    ``resize_mode``: ``squash`` stretches; ``pad`` pads to a square with the mean colour first (LLaVA-1.5's
    ``pad``), so nothing is cropped or distorted; ``crop`` resizes the short side and centre-crops (CLIP's own).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "crop"

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise MmwbConfigError(f"resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")

    def __call__(self, images: Sequence[Image.Image]) -> PixelInputs:
        if not images:
            raise MmwbInputError("no images given to the image processor")
        return PixelInputs(torch.stack([self._one(rgb_uint8(image)) for image in images]))

    def _one(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.resize_mode == "pad":
            # int(), not round(): LLaVA's expand2square truncates (CLIP's mean pads with (122, 116, 104))
            pixels = _pad_to_square(pixels, [int(255 * m) for m in self.mean])
        if self.resize_mode == "crop":
            pixels = resize_uint8(pixels, self.size)
            # floor the margins like transformers' CLIPImageProcessor (torchvision's center_crop rounds them)
            top, left = (pixels.shape[1] - self.size) // 2, (pixels.shape[2] - self.size) // 2
            pixels = tvf.crop(pixels, top, left, self.size, self.size)
        else:
            pixels = resize_uint8(pixels, [self.size, self.size])
        return normalize(to_unit_float(pixels), self.mean, self.std)


def _pad_to_square(pixels: torch.Tensor, fill: Sequence[int]) -> torch.Tensor:
    """Centre a uint8 image on a square canvas of colour ``fill`` (``(3, S, S)``)."""
    _, height, width = pixels.shape
    side = max(height, width)
    canvas = torch.tensor(list(fill), dtype=pixels.dtype).view(3, 1, 1).expand(3, side, side).clone()
    top, left = (side - height) // 2, (side - width) // 2
    canvas[:, top : top + height, left : left + width] = pixels
    return canvas


def hidden_state_index(select_layer: int, num_layers: int) -> int:
    """Index into transformers-style hidden states ``[embeddings, block_1, ..., block_L]``.

    LLaVA picks ``-2`` (the penultimate block's output); ``0`` is the embeddings and ``L`` / ``-1`` the last block.
    """
    index = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    if not 0 <= index <= num_layers:
        raise MmwbConfigError(f"select_layer={select_layer} is outside a tower with {num_layers} layers")
    return index
