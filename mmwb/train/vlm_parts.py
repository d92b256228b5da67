"""What the VLM trainers share: the model (a VLM folder, or parts joined by a new projector), its image inputs
(cached tower features or pixels), and the loss.

Both stages train ``mmwb.models.vlm.VisionLanguageModel`` on ``<image>``-holding token sequences; the model widens
each image token to its image's projected features (``prepare_inputs``). The tower is frozen in both stages, so
its features can come from the on-disk cache (``vision_features=``) instead of the images.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import nn

from mmwb.data.captions import ImageTextDataset, ImageTextRecord
from mmwb.data.feature_cache import FeatureCache, describe_preprocessing, encoder_id, fill_cache
from mmwb.data.io import atomic_write_path, load_image
from mmwb.data.tokenizer import IMAGE, load_tokenizer
from mmwb.errors import MmwbConfigError, MmwbInputError
from mmwb.models.decoder import load_decoder
from mmwb.models.projectors.qformer import QFormerSize
from mmwb.models.vision.base import ImageProcessor, VisionFeatures
from mmwb.models.vlm import VisionLanguageModel, VLMConfig, load_any_vlm
from mmwb.pipelines.vlm_eval import EvaluationConfig, evaluate_vlm
from mmwb.train.config import TrainConfig
from mmwb.train.engine import Trainer
from mmwb.train.multimodal import IGNORE_INDEX, collate, drop_image_tokens

log = logging.getLogger(__name__)
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class FeatureCacheConfig:
    """Frozen-tower features computed once and read back by every epoch and run (see mmwb.data.feature_cache)."""

    enabled: bool = True
    root: Path = Path("runs/feature_cache")
    batch_size: int = 64  # images per tower call while filling the cache
    # entries read back are also kept in memory up to this size (per data-loading process)
    memory_mb: int = 1024


@dataclass
class Unregistered:
    """Holds a module without making it a sub-module of a trainer's module (not trained, synced or saved)."""

    vlm: VisionLanguageModel


def load_vlm(
    model_dir: Path | None,
    vision_dir: Path | None,
    decoder_dir: Path | None,
    projector: str = "mlp2x_gelu",
    select_layer: int = -2,
    drop_cls: bool = True,
    final_norm: bool = False,
    qformer: QFormerSize | None = None,
) -> VisionLanguageModel:
    """An mmwb VLM folder, or an open_clip tower folder + an mmwb decoder folder joined by a new projector (the
    tower's tokens: block ``select_layer``'s, with or without the CLS token, optionally through ``ln_post``;
    ``qformer`` shapes a new Q-Former)."""
    if model_dir is not None:
        return load_any_vlm(model_dir, device="cpu")
    if vision_dir is None or decoder_dir is None:
        raise MmwbConfigError("set model_dir (a VLM folder), or both vision_dir and decoder_dir")
    from mmwb.models.projectors import make_projector
    from mmwb.models.vision.open_clip import OpenClipTower
    from mmwb.models.vlm.parts import tower_spec

    tower = OpenClipTower.from_name(
        f"local-dir:{vision_dir}", select_layer=select_layer, drop_cls=drop_cls, final_norm=final_norm
    )
    open_clip_config = json.loads((Path(vision_dir) / "open_clip_config.json").read_text())["model_cfg"]
    decoder = load_decoder(decoder_dir)
    tokenizer = load_tokenizer(decoder_dir)
    dims = (
        tower.hidden_size,
        decoder.config.hidden_size,
        decoder.config.vocab_size,
        tokenizer.pad_token_id or 0,
    )
    return assemble(tower, make_projector(projector, *dims, qformer=qformer), decoder, tokenizer,
                    tower_spec(tower, open_clip_config))  # fmt: skip


def assemble(
    tower: nn.Module,
    projector: nn.Module,
    decoder: nn.Module,
    tokenizer: Any,
    vision_spec: dict | None = None,
) -> VisionLanguageModel:
    """A VLM from parts; ``vision_spec`` is needed to save an open_clip tower (see mmwb.models.vlm.parts.tower_spec)."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise MmwbInputError(f"the tokenizer has no {IMAGE!r} token")
    config = VLMConfig(image_token_id=int(token_id), vision=vision_spec or {})
    return VisionLanguageModel(config, tower, projector, decoder, tokenizer)


def freeze_all_but_projector(vlm: VisionLanguageModel) -> None:
    vlm.requires_grad_(False)
    vlm.vision_tower.eval()
    vlm.language_model.eval()
    vlm.projector.requires_grad_(True)


def place(vlm: VisionLanguageModel, device: torch.device, mixed_precision: str) -> None:
    """Trained tensors keep fp32 masters; frozen ones take no optimizer step, so under mixed precision they are
    stored in the half dtype."""
    frozen_dtype = _HALF.get(mixed_precision, torch.float32)
    for param in vlm.parameters():
        param.data = param.data.to(device, param.dtype if param.requires_grad else frozen_dtype)
    for name, buffer in vlm.named_buffers():
        owner, _, leaf = name.rpartition(".")
        setattr(vlm.get_submodule(owner) if owner else vlm, leaf, buffer.to(device))


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


def vlm_trainer(
    module: nn.Module,
    vlm: VisionLanguageModel,
    records: Sequence[ImageTextRecord],
    data_dir: Path,
    encode: Callable[[ImageTextRecord], dict[str, torch.Tensor]],
    train: TrainConfig,
    cache: FeatureCacheConfig,
) -> Trainer:
    """The engine for ``module(**batch) -> loss`` over ``records``: the VLM placed on the engine's device, the
    feature cache filled (every rank's share), and each item's image read from the cache or decoded."""
    data = ImageTextDataset(records, data_dir, _no_loader, encode)
    trainer = Trainer(
        module,
        lambda model, batch: model(**batch),
        data,
        train,
        collate_fn=lambda items: collate(items, vlm.tokenizer.pad_token_id),
    )
    acc = trainer.accelerator
    place(vlm, acc.device, acc.mixed_precision)
    data.load = image_loader(vlm, cache, [Path(data_dir) / r.image for r in records], acc, train.progress)
    return trainer


def _no_loader(path: Path) -> dict[str, torch.Tensor]:
    raise MmwbConfigError(f"{path}: the image loader was not set up")


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
        from mmwb.models.vision.base import PixelInputs

        return vlm.encode_images(PixelInputs(batch["pixel_values"], batch.get("grid_hw")))
    counts = batch["token_counts"].tolist()
    grids = [tuple(g) for g in batch["grid_hw"].tolist()]
    return VisionFeatures(batch["features"], counts, grids)


def sequence_losses(
    vlm: VisionLanguageModel, batch: dict[str, torch.Tensor], with_images: bool = True
) -> torch.Tensor:
    """(B,) mean next-token cross entropy over each sequence's labelled tokens (0 for a sequence with none).

    ``with_images=False`` is the text-only baseline: the same sequences with their ``<image>`` token removed."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if with_images:
        inputs = vlm.prepare_inputs(ids, mask, labels, vision_features=batch_features(vlm, batch))
    else:
        inputs = vlm.prepare_inputs(*drop_image_tokens(ids, mask, labels, vlm.config.image_token_id))
    targets = F.pad(inputs["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T): the next token's label
    # the LM head runs only from the first position any row has a target at: not over the image tokens
    labelled = (targets != IGNORE_INDEX).any(0).nonzero()
    start = int(labelled[0]) if len(labelled) else targets.shape[1] - 1
    out = vlm.language_model(
        inputs_embeds=inputs["inputs_embeds"],
        attention_mask=inputs["attention_mask"],
        logits_to_keep=targets.shape[1] - start,
    )
    logits, targets = out.logits.float(), targets[:, start:]  # (B, T - start, V), (B, T - start)
    loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return loss.sum(1) / (targets != IGNORE_INDEX).sum(1).clamp(min=1)


def multimodal_loss(vlm: VisionLanguageModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over sequences of their mean token loss on labelled tokens (captions or assistant turns).

    Every sequence weighs the same whatever its length, so a batch split over processes (each averaging its own
    sequences, DDP averaging the processes) gives the same gradient as one process holding it all; a token mean
    would weigh each process's tokens by its own count.
    """
    return sequence_losses(vlm, batch).mean()


@torch.no_grad()
def caption_losses(
    vlm: VisionLanguageModel, batch: dict[str, torch.Tensor], with_images: bool
) -> torch.Tensor:
    """(B,) per-sequence losses of ``vlm`` on a batch (moved to the projector's device)."""
    batch = send_to_device(batch, next(vlm.projector.parameters()).device)
    return sequence_losses(vlm, batch, with_images)
