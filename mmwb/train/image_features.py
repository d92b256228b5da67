"""What a VLM trainer feeds the model for each image: the frozen tower's features from the feature cache (filled
once, every rank its share), or the image processor's pixels when the cache is off."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmwb.data.feature_cache import FeatureCache, describe_preprocessing, encoder_id, fill_cache
from mmwb.data.io import load_image
from mmwb.errors import MmwbInputError
from mmwb.models.vision.base import ImageProcessor, PixelInputs, VisionFeatures
from mmwb.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)


@dataclass
class FeatureCacheConfig:
    """Frozen-tower features computed once and read back by every epoch and run (see mmwb.data.feature_cache)."""

    enabled: bool = True
    root: Path = Path("runs/feature_cache")
    batch_size: int = 64  # images per tower call while filling the cache
    # entries read back are also kept in memory up to this size (per data-loading process)
    memory_mb: int = 1024


class CachedFeatures:
    """Dataset image loader: the cached tower features of an image file, by its content hash.

    The first ``memory_bytes`` of entries read stay in memory, so later epochs of a small data set skip opening
    a file per item (a fixed set, not an LRU: under shuffled epochs every entry is as likely to come back)."""

    def __init__(self, cache: FeatureCache, hashes: dict[Path, str | None], memory_bytes: int = 0) -> None:
        self.cache = cache
        self.hashes = hashes
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        self.room = memory_bytes

    def __call__(self, path: Path) -> dict[str, torch.Tensor]:
        image_hash = self.hashes.get(path)
        if image_hash in self.memory:
            return self.memory[image_hash]
        entry = self.cache.get(image_hash) if image_hash is not None else None
        if entry is None:
            raise MmwbInputError(f"{path}: missing or unreadable image (no cached features)")
        size = sum(t.numel() * t.element_size() for t in entry.values())
        if size <= self.room:
            self.memory[image_hash] = entry
            self.room -= size
        return entry


class ProcessedPixels:
    """Dataset image loader without a cache: decode the file and run the tower's image processor."""

    def __init__(self, processor: ImageProcessor) -> None:
        self.processor = processor

    def __call__(self, path: Path) -> dict[str, torch.Tensor]:
        inputs = self.processor([load_image(path)])
        item = {"pixel_values": inputs.pixel_values}
        if inputs.grid_hw is not None:
            item["grid_hw"] = inputs.grid_hw[0]
        return item


def image_loader(
    vlm: VisionLanguageModel, config: FeatureCacheConfig, paths: list[Path], accelerator: Any, progress: bool
) -> Callable[[Path], dict[str, torch.Tensor]]:
    """The per-item image loader: fills the feature cache first (ranks share the work) when it is enabled."""
    processor = vlm.image_processor()
    if not config.enabled:
        return ProcessedPixels(processor)
    tower = vlm.vision_tower
    dtype = next(tower.parameters()).dtype
    cache = FeatureCache(config.root, encoder_id(tower, dtype), describe_preprocessing(processor))
    rank, world = (
        (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    )
    hashes = fill_cache(
        cache,
        paths,
        tower,
        processor,
        batch_size=config.batch_size,
        rank=rank,
        world_size=world,
        progress=progress,
    )
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every rank reads entries the others wrote
    log.info("feature cache %s: %d images hit, %d computed", cache.folder, cache.hits, cache.misses)
    return CachedFeatures(cache, hashes, config.memory_mb * 2**20)


def batch_features(vlm: VisionLanguageModel, batch: dict[str, torch.Tensor]) -> VisionFeatures:
    """The tower features of a collated batch: read from the cache, or computed (no gradient) from pixels."""
    if "features" not in batch:
        return vlm.encode_images(PixelInputs(batch["pixel_values"], batch.get("grid_hw")))
    counts = batch["token_counts"].tolist()
    grids = [tuple(g) for g in batch["grid_hw"].tolist()]
    return VisionFeatures(batch["features"], counts, grids)
