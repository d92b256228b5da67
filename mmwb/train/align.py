"""LLaVA stage 1: train the projector on image-caption pairs with the vision tower and the decoder frozen.

The engine sees only ``ProjectorTraining``, whose one registered module is the projector: it is all that AdamW
updates, DDP synchronises and checkpoints hold (a few MB, not the whole VLM). Tower and decoder ride along as plain
attributes, frozen and in eval mode. Because the tower is frozen its features are computed once into the on-disk
``FeatureCache`` and each item then reads its image's features instead of the image (``feature_cache.enabled:
false`` / ``--no-feature-cache`` decodes and encodes every image every step instead).

At the end an alignment health report compares the caption loss with a text-only baseline (the same decoder with
the image removed) and measures caption-to-image retrieval from the projected features: a run whose captions are
no better predicted with the image than without it has learned nothing from the images, and is flagged.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmwb.data.captions import ImageTextRecord, read_records
from mmwb.data.io import atomic_write_path
from mmwb.errors import MmwbConfigError, MmwbInputError
from mmwb.models.projectors.qformer import QFormerSize
from mmwb.models.vlm import VisionLanguageModel
from mmwb.models.vlm.prompt import make_encoder, model_tokens
from mmwb.pipelines.vlm_eval import EvaluationConfig
from mmwb.runtime import seed_everything
from mmwb.train.checkpoint import save_model_folder
from mmwb.train.config import TrainConfig
from mmwb.train.engine import TrainResult, load_run_weights
from mmwb.train.image_features import FeatureCacheConfig, ProcessedPixels
from mmwb.train.multimodal import collate
from mmwb.train.recipes import write_metrics
from mmwb.train.vlm_loss import caption_losses, multimodal_loss
from mmwb.train.vlm_setup import freeze_all_but_projector, place, starting_vlm
from mmwb.train.vlm_trainer import Unregistered, evaluate_saved, vlm_trainer

log = logging.getLogger(__name__)
HEALTH_FILE = "alignment_health.json"


@dataclass
class HealthConfig:
    """The end-of-run check. A run counts as having learned from the images when the image lowers the caption
    loss by at least ``min_gain`` nats against the text-only baseline and retrieval beats 1.5x chance."""

    max_items: int = 256  # evaluation records (from data.val, else the first training records)
    batch_size: int = 32
    retrieval_group: int = 16  # captions are matched against this many images at a time (chance: 1/group)
    min_gain: float = 0.05


@dataclass
class AlignConfig:
    """One stage-1 run. Data: LLaVA JSON or caption JSONL under ``data_dir``; model: a VLM folder, or parts."""

    data_dir: Path = Path("data/shapes")  # image root; the records files below are relative to it
    train_file: str = "train.jsonl"
    val_file: str | None = "val.jsonl"  # for the health report; None: the first training records
    model_dir: Path | None = None  # an mmwb VLM folder whose projector is (re)trained
    vision_dir: Path | None = None  # or: an open_clip local-dir folder (the frozen tower) ...
    decoder_dir: Path | None = (
        None  # ... and an mmwb decoder folder with its tokenizer, joined by a new projector
    )
    projector: str = "mlp2x_gelu"
    select_layer: int = -2  # tower block whose tokens the projector reads (LLaVA: the penultimate)
    drop_cls: bool = True  # LLaVA drops the CLS token; a tiny tower's last-layer CLS summarises the image
    final_norm: bool = False  # pass the tokens through the tower's final LayerNorm (ln_post)
    # the shape of a new Q-Former (projector: qformer)
    qformer: QFormerSize = field(default_factory=QFormerSize)
    max_length: int = 64  # text tokens per sequence (the image's tokens come on top)
    out_dir: Path = Path("runs/align/model")  # the aligned VLM folder (+ alignment_health.json)
    feature_cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    evaluation: EvaluationConfig = field(
        default_factory=EvaluationConfig
    )  # captions of the test split, if any
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir=Path("runs/align")))


AlignStageConfig = AlignConfig  # stage 3 of the tiny-shapes recipe


class ProjectorTraining(nn.Module):
    """The engine's model: the VLM's projector (registered, trained); the rest of the VLM rides along frozen."""

    def __init__(self, vlm: VisionLanguageModel) -> None:
        super().__init__()
        self.projector = vlm.projector  # the same module the VLM runs
        self.held = Unregistered(vlm)

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return multimodal_loss(self.held.vlm, batch)


def align_records(config: AlignConfig) -> tuple[list[ImageTextRecord], list[ImageTextRecord]]:
    """Training records and (at most ``health.max_items``) evaluation records."""
    data = Path(config.data_dir)
    train = read_records(data / config.train_file)
    val = read_records(data / config.val_file) if config.val_file else train
    return train, val[: config.health.max_items]


def train_align(
    config: AlignConfig, vlm: VisionLanguageModel | None = None
) -> tuple[TrainResult, dict[str, Any]]:
    """Train the projector of ``vlm`` (default: loaded as ``config`` says); returns the engine's result and the
    health report (also saved beside the aligned VLM in ``out_dir``)."""
    seed_everything(config.train.seed)
    if vlm is not None and config.train.sharding != "none":
        raise MmwbConfigError("sharded alignment builds its VLM from the config: pass none")
    if vlm is None:
        vlm = _starting(config)
    else:
        freeze_all_but_projector(vlm)
    train_records, val_records = align_records(config)
    encode = caption_encoder(vlm, config.max_length)
    trainer = vlm_trainer(
        ProjectorTraining(vlm),
        vlm,
        train_records,
        config.data_dir,
        encode,
        config.train,
        config.feature_cache,
        shardable=True,
    )
    result = trainer.run()
    report: dict[str, Any] = {}
    if trainer.accelerator.is_main_process:
        if (
            result.sharded
        ):  # the trained projector stays split across processes: build it again from the checkpoint
            vlm = _starting(config)
            caption_encoder(vlm, config.max_length)  # the template the saved model answers in
            load_run_weights(ProjectorTraining(vlm), result)
            place(vlm, trainer.accelerator.device, trainer.accelerator.mixed_precision)  # as the run kept it
        report = health_report(vlm, val_records, config, result)
        save_model_folder(vlm, Path(config.out_dir))
        with atomic_write_path(Path(config.out_dir) / HEALTH_FILE) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        print_report(report)
    return result, report


def _starting(config: AlignConfig) -> VisionLanguageModel:
    """The VLM alignment starts from, everything but the projector frozen."""
    vlm = starting_vlm(
        config.model_dir,
        config.vision_dir,
        config.decoder_dir,
        config.projector,
        config.select_layer,
        config.drop_cls,
        config.final_norm,
        config.qformer,
    )
    freeze_all_but_projector(vlm)
    return vlm


def caption_encoder(vlm: VisionLanguageModel, max_length: int):
    """Alignment's prompts, set as the model's template: mmwb's ``plain`` (the caption straight after the image)
    or an imported InstructBLIP's own (its caption instruction first), in the model's own special tokens."""
    if vlm.config.template != "instructblip":
        vlm.config.template = "plain"
    tokens = model_tokens(vlm.tokenizer, vlm.config.image_token_id)
    return make_encoder(vlm.tokenizer, vlm.config.template, max_length, **tokens)


@torch.no_grad()
def health_report(
    vlm: VisionLanguageModel, records: list[ImageTextRecord], config: AlignConfig, result: TrainResult
) -> dict[str, Any]:
    """Caption loss with and without the image, and caption-to-image retrieval accuracy, on ``records``."""
    vlm.projector.eval()
    items = evaluation_items(vlm, records, config)
    size = config.health.batch_size
    with_image, text_only = [], []
    for start in range(0, len(items), size):
        batch = collate(items[start : start + size], vlm.tokenizer.pad_token_id)
        with_image.append(caption_losses(vlm, batch, with_images=True))
        text_only.append(caption_losses(vlm, batch, with_images=False))
    loss = torch.cat(with_image).mean().item()
    baseline = torch.cat(text_only).mean().item()
    group = min(config.health.retrieval_group, len(items))
    accuracy = retrieval_accuracy(vlm, items, group, size)
    gain = baseline - loss
    learned = gain >= config.health.min_gain and accuracy > 1.5 / group
    return {
        "steps": result.step,
        "eval_items": len(items),
        "caption_loss": loss,
        "text_only_loss": baseline,
        "image_gain_nats": gain,
        "retrieval_top1": accuracy,
        "retrieval_group": group,
        "retrieval_chance": 1.0 / group,
        "learned_from_images": learned,
        "verdict": (
            "healthy: captions are predicted better with the image, and captions find their image"
            if learned
            else "FLAGGED: the run learned (almost) nothing from the images: the image lowers the caption loss by "
            f"{gain:.3f} nats (needs {config.health.min_gain}) and retrieval is {accuracy:.2f} vs chance "
            f"{1 / group:.2f}; train longer, raise the lr, or check that images and captions match"
        ),
    }


def evaluation_items(
    vlm: VisionLanguageModel, records: list[ImageTextRecord], config: AlignConfig
) -> list[dict[str, Any]]:
    """Pixels and tokens of the (few) evaluation records; unreadable images are logged and left out."""
    encode = caption_encoder(vlm, config.max_length)
    load = ProcessedPixels(vlm.image_processor())
    items = []
    for record in records:
        try:
            items.append({**load(Path(config.data_dir) / record.image), **encode(record)})
        except MmwbInputError as err:
            log.warning("health report: skipping %s", err)
    return items


def retrieval_accuracy(
    vlm: VisionLanguageModel, items: list[dict[str, Any]], group: int, batch_size: int
) -> float:
    """Top-1 caption-to-image retrieval: each caption scored (its loss) against every image of its group."""
    hits, total = 0, 0
    for start in range(0, len(items) - group + 1, group):
        chunk = items[start : start + group]
        pairs = [
            {**image, "input_ids": text["input_ids"], "labels": text["labels"]}
            for text in chunk
            for image in chunk
        ]
        losses = torch.cat(
            [
                caption_losses(vlm, collate(pairs[i : i + batch_size], vlm.tokenizer.pad_token_id), True)
                for i in range(0, len(pairs), batch_size)
            ]
        )
        by_caption = losses.view(group, group)  # (caption, image)
        hits += int((by_caption.argmin(dim=1) == torch.arange(group, device=losses.device)).sum())
        total += group
    return hits / max(total, 1)


def print_report(report: dict[str, Any]) -> None:
    log.info(
        "alignment health: caption loss %.4f vs text-only %.4f (gain %.4f nats); retrieval top-1 %.3f "
        "(chance %.3f) -> %s",
        report["caption_loss"],
        report["text_only_loss"],
        report["image_gain_nats"],
        report["retrieval_top1"],
        report["retrieval_chance"],
        report["verdict"],
    )


def run_align_stage(config: AlignConfig) -> dict[str, Any]:
    """The tiny-shapes recipe's stage 3: align, caption the test split, and save the metrics beside the model."""
    started = time.perf_counter()
    result, report = train_align(config)
    metrics = {"stage": "align", "steps": result.step, "last_loss": result.last_loss}
    metrics |= {f"val_{k}": v for k, v in report.items() if isinstance(v, float)}
    metrics["learned_from_images"] = report.get("learned_from_images")
    metrics |= evaluate_saved(Path(config.out_dir), config.data_dir, config.evaluation, vqa=False)
    metrics["seconds"] = time.perf_counter() - started
    write_metrics(metrics, Path(config.out_dir))
    return metrics
