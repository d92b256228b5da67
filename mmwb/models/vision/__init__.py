"""Vision towers behind one interface: ``tower.encode(PixelInputs) -> VisionFeatures``."""

from mmwb.models.vision.base import (
    FixedSizeImageProcessor,
    ImageProcessor,
    PixelInputs,
    VisionFeatures,
    VisionTower,
)
from mmwb.models.vision.moonvit import MoonViT, MoonViTConfig, MoonViTImageProcessor

__all__ = [
    "FixedSizeImageProcessor",
    "ImageProcessor",
    "MoonViT",
    "MoonViTConfig",
    "MoonViTImageProcessor",
    "PixelInputs",
    "VisionFeatures",
    "VisionTower",
]
