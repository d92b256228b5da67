"""An on-disk cache of frozen vision-tower features: computed once, reused by every epoch and every later run.

A frozen tower maps the same image to the same features, so stage-1 alignment (and any stage that keeps the tower
frozen) needs each image encoded once, not once per epoch. A cached entry is one safetensors file per image at
``root/<setting>/<hh>/<image hash>.safetensors``, where ``<setting>`` hashes the encoder id (class, weights and
compute dtype) with the preprocessing description (the image processor's settings), and ``<image hash>`` is the
SHA-256 of the file's bytes. Changing the tower's weights, its dtype, or how images are resized/normalised
therefore lands in another folder (a miss), while renaming or copying an image still hits. Files are written
atomically (temporary file + rename), so concurrent ranks or a killed run never leave a torn entry behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from mmwb.data.io import atomic_write_path, load_image
from mmwb.errors import MmwbInputError

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


def content_hash(path: Path) -> str:
    """SHA-256 of a file's bytes; ``MmwbInputError`` naming the file when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError as err:
        raise MmwbInputError(f"{path}: cannot read the image ({err.strerror or err})") from err
    return digest.hexdigest()


def encoder_id(tower: nn.Module, dtype: torch.dtype) -> str:
    """Identify a tower by its class, its feature settings (``drop_cls``, ...), every weight (name, shape, dtype,
    bytes) and the dtype it computes in."""
    digest = hashlib.sha256(f"{type(tower).__module__}.{type(tower).__qualname__}|{dtype}".encode())
    settings = tower.feature_settings() if hasattr(tower, "feature_settings") else {}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in tower.state_dict().items():
        digest.update(f"|{name}:{tuple(tensor.shape)}:{tensor.dtype}|".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return f"{type(tower).__name__}-{digest.hexdigest()[:24]}"


def describe_preprocessing(processor: object) -> str:
    """A stable text of everything the image processor does to pixels (its dataclass fields, else its repr)."""
    fields = (
        dataclasses.asdict(processor) if dataclasses.is_dataclass(processor) else {"repr": repr(processor)}
    )
    return json.dumps({"class": type(processor).__qualname__, **fields}, sort_keys=True, default=str)


class FeatureCache:
    """Per-image tower features under ``root`` for one (encoder, preprocessing) setting; counts hits and misses."""

    def __init__(self, root: str | Path, encoder: str, preprocessing: str) -> None:
        setting = hashlib.sha256(f"{encoder}\n{preprocessing}".encode()).hexdigest()[:16]
        self.folder = Path(root) / setting
        self.encoder = encoder
        self.preprocessing = preprocessing
        self.hits = 0
        self.misses = 0

    def path(self, image_hash: str) -> Path:
        return self.folder / image_hash[:2] / f"{image_hash}.safetensors"

    def get(self, image_hash: str) -> dict[str, torch.Tensor] | None:
        """``{"features": (N, C), "grid_hw": (2,)}`` of one image, or None (a damaged file is a miss)."""
        path = self.path(image_hash)
        if path.is_file():
            try:
                entry = load_file(path)
                self.hits += 1
                return entry
            except (SafetensorError, OSError) as err:  # writes are atomic: only disk damage gets here
                log.warning(
                    "%s: unreadable cache entry, removed so the next run recomputes it (%s)", path, err
                )
                path.unlink(missing_ok=True)
        self.misses += 1
        return None

    def put(self, image_hash: str, features: torch.Tensor, grid_hw: tuple[int, int]) -> None:
        path = self.path(image_hash)
        if not (self.folder / "setting.json").is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_write_path(self.folder / "setting.json") as tmp:
                tmp.write_text(
                    json.dumps({"encoder": self.encoder, "preprocessing": self.preprocessing}, indent=2)
                )
        entry = {"features": features.detach().contiguous().cpu(), "grid_hw": torch.tensor(grid_hw)}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write_path(path) as tmp:
            save_file(entry, tmp)


@torch.no_grad()
def fill_cache(
    cache: FeatureCache,
    paths: Sequence[Path],
    tower: nn.Module,
    processor: object,
    *,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> dict[Path, str | None]:
    """Encode every image of ``paths`` not yet cached (this rank's share of them); returns path -> image hash.

    The hash is None for a file that cannot be read or decoded: it is logged by name here and its items are
    skipped (and counted) by training. Every rank hashes all paths, so each gets the full map without a gather;
    callers wait for all ranks before reading entries another rank wrote. Ranks split the images, not the missing
    ones: which entries exist changes while the other ranks write, so a split of those could leave some to none.
    Counts are this rank's: its share of the images, found (hits) or computed (misses).
    """
    hashes: dict[Path, str | None] = {}
    for path in dict.fromkeys(paths):
        try:
            hashes[path] = content_hash(path)
        except MmwbInputError as err:
            log.warning("skipping an image: %s", err)
            hashes[path] = None
    unique = list(dict((h, p) for p, h in hashes.items() if h is not None).items())  # (hash, path), each once
    share = unique[rank::world_size]
    todo = [(h, p) for h, p in share if not cache.path(h).is_file()]
    cache.hits += len(share) - len(todo)
    device, dtype = _device_dtype(tower)
    batches = range(0, len(todo), batch_size)
    for start in tqdm(batches, desc="feature cache", unit="batch", disable=not progress or not todo):
        chunk = todo[start : start + batch_size]
        images, kept = [], []
        for image_hash, path in chunk:
            try:
                images.append(load_image(path))
                kept.append(image_hash)
            except MmwbInputError as err:
                log.warning("skipping an image: %s", err)
                hashes = {p: (None if h == image_hash else h) for p, h in hashes.items()}
        if not images:
            continue
        out = tower.encode(processor(images).to(device, dtype))  # type: ignore[operator]
        for image_hash, features, grid in zip(kept, out.per_image(), out.grid_hw):
            cache.put(image_hash, features, tuple(grid))
        cache.misses += len(kept)
    return hashes


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(module.parameters())
    return param.device, param.dtype
