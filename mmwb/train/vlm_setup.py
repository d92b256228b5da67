"""The VLM a training run trains: where it starts from (a saved VLM, or a tower and a decoder joined by a new
projector), which of its parts train, and where its tensors live."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mmwb.data.tokenizer import IMAGE, load_tokenizer
from mmwb.errors import MmwbConfigError, MmwbInputError
from mmwb.models.decoder import load_decoder
from mmwb.models.projectors import make_projector
from mmwb.models.projectors.qformer import QFormerSize
from mmwb.models.vision.open_clip import OpenClipTower
from mmwb.models.vlm import VisionLanguageModel, VLMConfig, load_any_vlm
from mmwb.models.vlm.parts import build_tower, tower_spec

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def starting_vlm(
    model_dir: Path | None,
    vision_dir: Path | None,
    decoder_dir: Path | None,
    projector: str = "mlp2x_gelu",
    select_layer: int = -2,
    drop_cls: bool = True,
    final_norm: bool = False,
    qformer: QFormerSize | None = None,
    new_tower: dict[str, Any] | None = None,
) -> VisionLanguageModel:
    """An mmwb VLM folder, or a tower + an mmwb decoder folder joined by a new projector. The tower is an open_clip
    folder (its tokens: block ``select_layer``'s, with or without the CLS token, optionally through ``ln_post``),
    or ``new_tower``, a tower spec (``{"type": "conv", "config": {...}}``, see mmwb.models.vlm.parts) built with
    fresh weights to be trained with the rest; ``qformer`` shapes a new Q-Former."""
    if model_dir is not None:
        return load_any_vlm(model_dir, device="cpu")
    if (vision_dir is None) == (new_tower is None) or decoder_dir is None:
        raise MmwbConfigError(
            "set model_dir (a VLM folder), or decoder_dir and one of vision_dir (a tower folder) or tower (a new one)"
        )
    if new_tower is not None:
        tower, open_clip_config = build_tower(new_tower), None
    else:
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
        if isinstance(param, DTensor):  # sharded by the engine, which placed it: FSDP owns its storage
            continue
        param.data = param.data.to(device, param.dtype if param.requires_grad else frozen_dtype)
    for name, buffer in vlm.named_buffers():
        owner, _, leaf = name.rpartition(".")
        setattr(vlm.get_submodule(owner) if owner else vlm, leaf, buffer.to(device))
