"""Tiny shapes data and random tiny VLM parts for the alignment / instruction-tuning tests."""

from __future__ import annotations

from pathlib import Path

from mmwb.data.shapes import write_dataset
from mmwb.testing.tiny_vlm import make_tiny_parts
from mmwb.train.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"


def make_setup(root: Path, n: int = 32) -> dict[str, Path]:
    """``data`` (shapes, 32 px) and ``vision`` / ``decoder`` folders of random tiny parts under ``root``."""
    data = root / "data"
    write_dataset(data, n, seed=0, size=32, n_eval=16, progress=False)
    vision, decoder = make_tiny_parts(root / "parts", data)
    return {"data": data, "vision": vision, "decoder": decoder}


def tiny_train(out: Path, **overrides) -> TrainConfig:
    """A few fp32 CPU steps, no progress bar."""
    options = {
        "max_steps": 3,
        "batch_size": 8,
        "lr": 3e-3,
        "warmup_steps": 0,
        "device": "cpu",
        "progress": False,
    }
    return TrainConfig(out_dir=out, **(options | overrides))
