"""scikit-learn's handwritten digits (1797 images, 8x8, 17 grey levels) as tensors for image score models.

The set ships inside scikit-learn, so it needs no download. Images can be upsampled (nearest neighbour, which
keeps the 17 discrete levels for bits/dim) or zero-padded to a size a UNet can halve; the train/test split is
stratified by a fixed seed, so every run sees the same split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn import functional as F

from mmwb.errors import MmwbInputError

NATIVE_SIZE = 8
NUM_LEVELS = 17  # pixel values are the integers 0..16
VALUE_RANGES = {"unit": (0.0, 1.0), "symmetric": (-1.0, 1.0)}
RESIZES = ("nearest", "pad")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Digits:
    """``images (N, 1, S, S)`` float in ``value_range``, ``levels`` the same as integers 0..16, ``labels (N,)``."""

    images: torch.Tensor
    levels: torch.Tensor
    labels: torch.Tensor
    value_range: tuple[float, float]

    num_levels = NUM_LEVELS


def _resize(levels: torch.Tensor, size: int, resize: str) -> torch.Tensor:
    """``(N, 1, 8, 8) -> (N, 1, size, size)`` by integer-factor nearest upsampling or centred zero padding."""
    if size == NATIVE_SIZE:
        return levels
    if resize == "nearest":
        if size % NATIVE_SIZE:
            raise MmwbInputError(f"digits: nearest resize needs a multiple of {NATIVE_SIZE}, got size {size}")
        return F.interpolate(levels.float(), scale_factor=size // NATIVE_SIZE, mode="nearest").to(
            levels.dtype
        )
    before = (size - NATIVE_SIZE) // 2
    after = size - NATIVE_SIZE - before
    return F.pad(levels, (before, after, before, after))


def load_digits_tensors(
    split: str = "train",
    size: int = NATIVE_SIZE,
    resize: str = "nearest",
    value_range: str = "unit",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Digits:
    """One split of the digits, scaled to ``[0, 1]`` (``"unit"``) or ``[-1, 1]`` (``"symmetric"``)."""
    if split not in SPLITS:
        raise MmwbInputError(f"digits: unknown split {split!r}; choose from {SPLITS}")
    if resize not in RESIZES:
        raise MmwbInputError(f"digits: unknown resize {resize!r}; choose from {RESIZES}")
    if value_range not in VALUE_RANGES:
        raise MmwbInputError(
            f"digits: unknown value_range {value_range!r}; choose from {sorted(VALUE_RANGES)}"
        )
    if size < NATIVE_SIZE:
        raise MmwbInputError(f"digits: size must be >= {NATIVE_SIZE}, got {size}")
    if not 0 < test_fraction < 1:
        raise MmwbInputError(f"digits: test_fraction must lie in (0, 1), got {test_fraction}")
    data = load_digits()
    train_idx, test_idx = train_test_split(
        range(len(data.target)), test_size=test_fraction, random_state=seed, stratify=data.target
    )
    idx = torch.as_tensor(train_idx if split == "train" else test_idx)
    levels = torch.as_tensor(data.images, dtype=torch.uint8)[idx, None]  # (N, 1, 8, 8)
    levels = _resize(levels, size, resize)
    lo, hi = VALUE_RANGES[value_range]
    images = lo + (hi - lo) * levels.float() / (NUM_LEVELS - 1)
    labels = torch.as_tensor(data.target, dtype=torch.long)[idx]
    return Digits(images, levels, labels, (lo, hi))
