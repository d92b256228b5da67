"""ControlNet training data: JSONL records of (image, conditioning_image, caption) under an image root.

One record per line, paths relative to the image root::

    {"image": "train/000001.png", "conditioning_image": "canny/train/000001.png", "caption": "a red circle"}

``build_canny_jsonl`` turns the output of ``mmwb data shapes`` into this layout, drawing each conditioning image
with the same canny preprocessor ``mmwb generate`` applies at inference, so training and generation agree on what
an edge map looks like. A record whose files are missing or unreadable raises ``MmwbInputError`` when loaded, so
the training engine skips and counts it instead of stopping.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mmwb.data.conditions import ConditionOptions, fit_image, prepare_condition
from mmwb.data.io import atomic_write_path, load_image
from mmwb.errors import MmwbInputError


@dataclass(frozen=True)
class ControlRecord:
    image: str
    conditioning_image: str | None  # None: the line had no such key (the item is skipped when loaded)
    caption: str


def read_records(path: str | Path) -> list[ControlRecord]:
    """Parse a ControlNet JSONL file; a malformed line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise MmwbInputError(f"{path}: ControlNet data file not found")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise MmwbInputError(f"{path}:{number}: not valid JSON ({err})") from err
        if not isinstance(data, dict) or "image" not in data or "caption" not in data:
            raise MmwbInputError(f"{path}:{number}: a record needs 'image' and 'caption' keys")
        records.append(
            ControlRecord(str(data["image"]), data.get("conditioning_image"), str(data["caption"]))
        )
    if not records:
        raise MmwbInputError(f"{path}: no records")
    return records


class ControlNetDataset(Dataset):
    """Items ``{"pixel_values": (3, S, S) in [-1, 1], "conditioning_pixel_values": (3, S, S) in [0, 1],
    "input_ids": (L,)}``, the value ranges diffusers' VAE and ControlNet expect."""

    def __init__(
        self, jsonl: str | Path, image_root: str | Path, tokenize: Callable[[str], torch.Tensor], size: int
    ) -> None:
        self.records = read_records(jsonl)
        self.root = Path(image_root)
        self.tokenize = tokenize
        self.size = size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        if not record.conditioning_image:
            raise MmwbInputError(f"record {index} ({record.image}): no conditioning_image")
        image = self._load(record.image)
        condition = self._load(record.conditioning_image)
        return {
            "pixel_values": image * 2 - 1,
            "conditioning_pixel_values": condition,
            "input_ids": self.tokenize(record.caption),
        }

    def _load(self, name: str) -> torch.Tensor:
        """(3, S, S) float in [0, 1], centre-cropped to the training size as ``mmwb generate`` crops."""
        image = fit_image(load_image(self.root / name), (self.size, self.size), "crop")
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(
            2, 0, 1
        )  # (H, W, 3) -> (3, H, W)


def build_canny_jsonl(
    shapes_dir: str | Path, split: str, options: ConditionOptions | None = None, progress: bool = True
) -> Path:
    """Write ``canny/<split>/*.png`` and ``<split>_controlnet.jsonl`` into a ``mmwb data shapes`` folder."""
    root = Path(shapes_dir)
    index = root / f"{split}.jsonl"
    if not index.is_file():
        raise MmwbInputError(f"{index}: not found; make the data with 'mmwb data shapes --out {root}'")
    lines = []
    for line in tqdm(
        index.read_text(encoding="utf-8").splitlines(), desc=f"canny {split}", disable=not progress
    ):
        record: dict[str, Any] = json.loads(line)
        image = load_image(root / record["image"])
        name = f"canny/{record['image']}"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        prepare_condition(image, "canny", image.size, options=options).save(root / name)
        lines.append(
            json.dumps({"image": record["image"], "conditioning_image": name, "caption": record["caption"]})
        )
    out = root / f"{split}_controlnet.jsonl"
    with atomic_write_path(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
