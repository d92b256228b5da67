"""Contrastive pretraining of a small open_clip model on image-caption pairs (stage 1 of tiny-shapes).

open_clip does the modelling: its own ``CLIP`` class (``VisionTransformer`` + ``TextTransformer``) built from a
custom config, its own ``ClipLoss`` and its own zero-shot classifier builder; mmwb adds the data, the shared engine
and the output folder. That folder is an open_clip ``local-dir:`` model (``open_clip_config.json`` +
``open_clip_model.safetensors`` + tokenizer files), so ``open_clip.create_model``, ``open_clip.get_tokenizer`` and
mmwb's ``OpenClipTower.from_name`` load it as it is.

The text tower reads mmwb's BPE tokenizer (the one the decoder uses), not open_clip's 49k-token CLIP BPE: the
shapes text needs a few hundred tokens, so the embedding table stays tiny and both towers and the decoder split
words the same way. That tokenizer pads on the left and has no end-of-text token, so the text tower pools the
last position (``pool_type: last``), which under the causal mask has read the whole caption.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.distributed as dist
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.loss import ClipLoss
from open_clip.model import CLIP
from open_clip.tokenizer import HFTokenizer
from safetensors.torch import save_file
from torch.utils.data import TensorDataset
from transformers import PreTrainedTokenizerBase

from mmwb.data.io import load_image
from mmwb.data.shapes import (
    COLOURS,
    SHAPES,
    SIZES,
    Shape,
    caption,
    read_index,
    record_texts,
    render,
    swapped_scene,
)
from mmwb.data.tokenizer import train_bpe_tokenizer
from mmwb.errors import MmwbConfigError
from mmwb.models.vision.base import normalize, rgb_uint8, to_unit_float
from mmwb.runtime import seed_everything
from mmwb.train import checkpoint as ckpt
from mmwb.train.config import TrainConfig
from mmwb.train.engine import train
from mmwb.train.recipes import publish_stage

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# open_clip.get_tokenizer uses an HF tokenizer when text_cfg names one; for a local-dir folder it always loads
# the tokenizer files of that folder, so the name only has to be non-empty
TOKENIZER_NAME = "mmwb-bpe"
MAX_LOGIT_SCALE = math.log(100.0)  # open_clip's training loop clamps the temperature there after every step
# zero-shot classes: every object one caption can describe ("a small red circle"); position plays no part
OBJECT_CLASSES = tuple(
    Shape(shape, colour, size, 0.5, 0.5) for size in SIZES for colour in COLOURS for shape in SHAPES
)


@dataclass
class ClipModelConfig:
    """The knobs of a tiny open_clip ViT + text transformer; vocabulary and padding come from the tokenizer."""

    embed_dim: int = 64
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 96
    vision_layers: int = 3
    vision_head_width: int = 32
    vision_pool: str = "tok"  # open_clip pool_type: "tok" (CLS token) or "avg" (mean of the patch tokens)
    vision_pos_embed: str = "learnable"  # open_clip pos_embed_type: "learnable" or "sin_cos_2d" (fixed)
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 24


@dataclass
class ClipStageConfig:
    """One contrastive run: shapes data in, an open_clip local-dir folder (with the BPE tokenizer) out."""

    data_dir: Path = Path("data/shapes")
    out_dir: Path = Path(
        "runs/tiny-shapes/stage1_clip"
    )  # the model folder; the engine's run is train.out_dir
    vocab_size: int = 512  # BPE vocabulary, trained on the training split's captions and QA text
    eval_batch_size: int = 256
    # each training image comes with its swapped twin (the objects' looks moved between places, its own caption)
    # in the same batch: in-batch negatives that differ only in which object is which
    hard_negatives: bool = False
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def open_clip_model_cfg(cfg: ClipModelConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """open_clip's ``model_cfg`` (the ``open_clip_config.json`` layout) for ``cfg`` and ``tokenizer``."""
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "width": cfg.vision_width,
            "layers": cfg.vision_layers,
            "head_width": cfg.vision_head_width,
            "pool_type": cfg.vision_pool,
            "pos_embed_type": cfg.vision_pos_embed,
        },
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": len(tokenizer),
            "width": cfg.text_width,
            "heads": cfg.text_heads,
            "layers": cfg.text_layers,
            "pad_id": tokenizer.pad_token_id,
            "pool_type": "last",
            "hf_tokenizer_name": TOKENIZER_NAME,
        },
    }


def preprocess_cfg(image_size: int) -> dict[str, Any]:
    """What open_clip (and ``OpenClipTower.image_processor``) apply to images before this model."""
    return {"size": image_size, "mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)}


def load_pixels(data_dir: Path, records: Sequence[dict], image_size: int) -> torch.Tensor:
    """Every record's image as uint8 ``(N, 3, S, S)``: 12 KB an image, so a whole split stays in memory."""
    pixels = torch.stack([rgb_uint8(load_image(data_dir / r["image"])) for r in records])
    if pixels.shape[-2:] != (image_size, image_size):
        raise MmwbConfigError(
            f"{data_dir}: images are {pixels.shape[-1]} px, model.image_size is {image_size}; "
            f"make the data with --size {image_size}"
        )
    return pixels


def model_inputs(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to the normalised floats the vision tower takes."""
    return normalize(to_unit_float(pixels), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


def tokenize_captions(tokenizer: HFTokenizer, captions: Sequence[str], context_length: int) -> torch.Tensor:
    """``(N, context_length)`` ids; a caption longer than the context is a config error, not a silent cut."""
    longest = max(len(tokenizer.tokenizer(c).input_ids) for c in captions)
    if longest > context_length:
        raise MmwbConfigError(
            f"model.context_length={context_length} is shorter than the longest caption ({longest} tokens)"
        )
    return tokenizer(list(captions))


@functools.cache
def _clip_loss() -> ClipLoss:
    """open_clip's loss, built on first use: by then accelerate has set up the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        return ClipLoss(
            local_loss=True, gather_with_grad=True, rank=dist.get_rank(), world_size=dist.get_world_size()
        )
    return ClipLoss()


def contrastive_loss(
    model: torch.nn.Module, batch: list[torch.Tensor]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Symmetric InfoNCE over the batch (images against captions), open_clip's ClipLoss. Items may come in
    groups (pixels ``(B, G, 3, S, S)``, tokens ``(B, G, L)``): each group's members are negatives of each other."""
    pixels, tokens = batch
    if pixels.ndim == 5:
        pixels, tokens = pixels.flatten(0, 1), tokens.flatten(0, 1)  # (B*G, 3, S, S), (B*G, L)
    image_features, text_features, logit_scale = model(model_inputs(pixels), tokens)
    return _clip_loss()(image_features, text_features, logit_scale), {"logit_scale": logit_scale.detach()}


@torch.no_grad()
def zero_shot_predict(
    model: CLIP,
    tokenizer: HFTokenizer,
    images: torch.Tensor,
    classnames: Sequence[str],
    templates: Sequence[str] = ("{}",),
    batch_size: int = 256,
) -> torch.Tensor:
    """The class of each image (model inputs): the nearest embedding of open_clip's zero-shot classifier."""
    classifier = open_clip.build_zero_shot_classifier(
        model, tokenizer, classnames, templates, num_classes_per_batch=None, device=images.device
    )  # (D, C)
    scores = [model.encode_image(chunk, normalize=True) @ classifier for chunk in images.split(batch_size)]
    return torch.cat(scores).argmax(-1).cpu()


def zero_shot_scores(predicted: Sequence[Shape], truth: Sequence[Shape]) -> dict[str, float]:
    """Accuracy of each attribute of the predicted objects, and of all three at once (the whole caption)."""
    n = len(truth)
    scores = {
        f"zero_shot_{name}_acc": sum(getattr(p, name) == getattr(t, name) for p, t in zip(predicted, truth))
        / n
        for name in ("shape", "colour", "size")
    }
    scores["zero_shot_caption_acc"] = sum(p.phrase == t.phrase for p, t in zip(predicted, truth)) / n
    return scores


def swapped_twins(pixels: torch.Tensor, records: Sequence[dict], seed: int) -> tuple[torch.Tensor, list[str]]:
    """Each image's hard negative ``(N, 3, S, S)`` (``swapped_scene`` drawn on its background) and caption."""
    rng = np.random.default_rng(seed)
    twins, captions = [], []
    for image, record in zip(pixels, records):
        scene = swapped_scene(record, tuple(int(v) for v in image[:, 0, 0]), rng)
        twins.append(rgb_uint8(render(scene, image.shape[-1], rng)))
        captions.append(caption(scene))
    return torch.stack(twins), captions


@torch.no_grad()
def binding_accuracy(
    model: CLIP, tokenizer: HFTokenizer, pixels: torch.Tensor, records: Sequence[dict], seed: int = 0
) -> float | None:
    """How often a many-object image is closer to its caption than to its swapped twin's (chance: 0.5);
    ``None`` without such images."""
    multi = [i for i, r in enumerate(records) if len(r["objects"]) > 1]
    if not multi:
        return None
    rng = np.random.default_rng(seed)
    twins = [caption(swapped_scene(records[i], (0, 0, 0), rng)) for i in multi]
    device = next(model.parameters()).device
    image = model.encode_image(model_inputs(pixels[multi]).to(device), normalize=True)
    right = model.encode_text(tokenizer([records[i]["caption"] for i in multi]).to(device), normalize=True)
    wrong = model.encode_text(tokenizer(twins).to(device), normalize=True)
    return float(((image * right).sum(-1) > (image * wrong).sum(-1)).float().mean())


def zero_shot_metrics(
    model: CLIP, tokenizer: HFTokenizer, pixels: torch.Tensor, records: Sequence[dict], batch_size: int = 256
) -> dict[str, float]:
    """Zero-shot shape, colour and size accuracy on the images with one object (the ones with a single label).

    The classes are every one-object caption, and a prediction's attributes are read off the best one. CLIP's
    prompt ensembling (one class per shape, its prompts averaged over colours and sizes) fails here: the one
    prompt of the right colour and size is drowned by the eleven that describe another object.
    """
    single = [i for i, r in enumerate(records) if len(r["objects"]) == 1]
    if not single:
        return {"zero_shot_images": 0}
    device = next(model.parameters()).device
    images = model_inputs(pixels[single]).to(device)
    predicted = zero_shot_predict(
        model, tokenizer, images, [c.phrase for c in OBJECT_CLASSES], batch_size=batch_size
    )
    truth = [Shape(**records[i]["objects"][0]) for i in single]
    binding = binding_accuracy(model, tokenizer, pixels, records)
    return {
        **zero_shot_scores([OBJECT_CLASSES[k] for k in predicted.tolist()], truth),
        "zero_shot_images": len(single),
        **({"binding_acc": binding} if binding is not None else {}),
    }


def run_clip_stage(config: ClipStageConfig) -> dict[str, Any]:
    """Tokenizer, contrastive training, then the model folder published whole; returns (and saves) the metrics."""
    started = time.perf_counter()
    data, out = Path(config.data_dir), Path(config.out_dir)
    records = {split: read_index(data, split) for split in ("train", "val", "test")}
    staging = ckpt.begin(out)
    bpe = train_bpe_tokenizer((t for r in records["train"] for t in record_texts(r)), config.vocab_size)
    bpe.save_pretrained(staging)
    tokenizer = HFTokenizer(str(staging), context_length=config.model.context_length)
    size = config.model.image_size
    pixels = {split: load_pixels(data, recs, size) for split, recs in records.items()}
    tokens = tokenize_captions(
        tokenizer, [r["caption"] for r in records["train"]], config.model.context_length
    )
    model_cfg = open_clip_model_cfg(config.model, bpe)
    seed_everything(config.train.seed)
    model = CLIP(**model_cfg)

    def clamp_temperature(_step: int, _record: dict[str, Any]) -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    items = TensorDataset(pixels["train"], tokens)
    if config.hard_negatives:
        twins, captions = swapped_twins(pixels["train"], records["train"], config.train.seed)
        twin_tokens = tokenize_captions(tokenizer, captions, config.model.context_length)
        items = TensorDataset(
            torch.stack([pixels["train"], twins], 1), torch.stack([tokens, twin_tokens], 1)
        )  # (N, 2, 3, S, S), (N, 2, L): each image beside its twin
    result = train(
        model,
        contrastive_loss,
        items,
        config.train,
        eval_fn=lambda evaluated: zero_shot_metrics(
            evaluated, tokenizer, pixels["val"], records["val"], config.eval_batch_size
        ),
        on_step=clamp_temperature,
    )
    model.eval()
    metrics = {
        "stage": "clip",
        "steps": result.step,
        "last_loss": result.last_loss,
        "vocab_size": len(bpe),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    for split in ("val", "test"):
        scores = zero_shot_metrics(model, tokenizer, pixels[split], records[split], config.eval_batch_size)
        metrics |= {f"{split}_{k}": v for k, v in scores.items()}
    save_clip_folder(model, model_cfg, staging)
    metrics["seconds"] = time.perf_counter() - started
    publish_stage(staging, out, metrics)
    return metrics


def save_clip_folder(model: CLIP, model_cfg: dict[str, Any], folder: Path) -> None:
    """The weights and ``open_clip_config.json`` of an open_clip local-dir model, into a staging ``folder``."""
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(model_cfg["vision_cfg"]["image_size"])}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / WEIGHTS_FILE, metadata={"format": "pt"})
