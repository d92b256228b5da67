"""Tiny shapes data and random tiny VLM parts for the alignment / instruction-tuning tests."""

from __future__ import annotations

import json
from pathlib import Path

import mmwb
from mmwb.data.shapes import read_index, write_dataset
from mmwb.pipelines.vlm import VLMPipeline
from mmwb.pipelines.vlm_eval import normalize
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


def check_recipe_model_answers_as_recorded(out: Path, stage: str, metrics: dict) -> None:
    """A recipe stage's saved VLM answers the first test question as its predictions file says, and the caption
    exact match of that file is the stage's recorded metric."""
    vlm = mmwb.from_pretrained(out / stage)
    rows = [json.loads(line) for line in (out / stage / "test_predictions.jsonl").read_text().splitlines()]
    record = read_index(out / "data", "test")[0]
    answer = VLMPipeline(vlm)(out / "data" / record["image"], record["qa"][0]["question"], max_new_tokens=32)
    assert answer == rows[0]["qa"][0]["prediction"]
    exact = sum(normalize(r["caption"]) == r["reference"] for r in rows) / len(rows)
    assert exact == metrics["test_caption_exact_match"]
