"""The training engine set up for a VLM over image-text records, and the evaluation of what it saved."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmwb.data.captions import ImageTextDataset, ImageTextRecord
from mmwb.data.io import atomic_write_path
from mmwb.errors import MmwbConfigError
from mmwb.models.vlm import VisionLanguageModel, load_any_vlm
from mmwb.pipelines.vlm_eval import EvaluationConfig, evaluate_vlm
from mmwb.train.config import TrainConfig
from mmwb.train.engine import Trainer
from mmwb.train.image_features import FeatureCacheConfig, image_loader
from mmwb.train.multimodal import collate
from mmwb.train.vlm_setup import place

log = logging.getLogger(__name__)


def trained_state(module: nn.Module, full: dict[str, torch.Tensor], prefix: str = "") -> OrderedDict:
    """The entries of ``module``'s state dict ``full`` that train (``requires_grad``): what a trainer module's
    checkpoints hold when the rest of the model is frozen (a resume checks keys against it)."""
    trained = {prefix + name for name, param in module.named_parameters() if param.requires_grad}
    return OrderedDict((key, value) for key, value in full.items() if key in trained)


@dataclass
class Unregistered:
    """Holds a module without making it a sub-module of a trainer's module (not trained, synced or saved)."""

    vlm: VisionLanguageModel


def vlm_trainer(
    module: nn.Module,
    vlm: VisionLanguageModel,
    records: Sequence[ImageTextRecord],
    data_dir: Path,
    encode: Callable[[ImageTextRecord], dict[str, torch.Tensor]],
    train: TrainConfig,
    cache: FeatureCacheConfig,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    shardable: bool = False,
) -> Trainer:
    """The engine for ``module(**batch) -> loss`` over ``records`` (anything with an ``image`` path): the VLM
    placed on the engine's device, the feature cache filled (every rank's share), and each item's image read from
    the cache or decoded. Items are collated by ``collate_fn`` (default: ``multimodal.collate``)."""
    data = ImageTextDataset(records, data_dir, _no_loader, encode)
    trainer = Trainer(
        module,
        lambda model, batch: model(**batch),
        data,
        train,
        collate_fn=collate_fn or (lambda items: collate(items, vlm.tokenizer.pad_token_id)),
        eval_fn=eval_fn,
        shardable=shardable,
    )
    acc = trainer.accelerator
    place(vlm, acc.device, acc.mixed_precision)
    data.load = image_loader(vlm, cache, [Path(data_dir) / r.image for r in records], acc, train.progress)
    return trainer


def _no_loader(path: Path) -> dict[str, torch.Tensor]:
    raise MmwbConfigError(f"{path}: the image loader was not set up")


def evaluate_saved(folder: Path, data_dir: Path, config: EvaluationConfig, vqa: bool) -> dict[str, Any]:
    """Metrics of the VLM saved in ``folder`` on ``data_dir``'s split (none when ``max_items`` is 0 or the split
    is missing); the predictions go to ``folder/<split>_predictions.jsonl`` beside it."""
    if config.max_items <= 0 or not (Path(data_dir) / f"{config.split}.jsonl").is_file():
        return {}
    vlm = load_any_vlm(folder, device="cpu")
    metrics, rows = evaluate_vlm(vlm, data_dir, config, vqa=vqa)
    with atomic_write_path(Path(folder) / f"{config.split}_predictions.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    log.info("%s: %s", folder, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics
