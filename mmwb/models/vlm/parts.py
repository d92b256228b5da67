"""What rebuilds each part of an mmwb VLM from its config.json: one JSON spec per part (vision tower, projector,
language model), written by ``*_spec`` when saving and turned back into a module with random weights by
``build_*`` before the checkpoint's tensors are loaded into it."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from mmwb.errors import MmwbCheckpointError, MmwbConfigError
from mmwb.models.decoder import DecoderConfig, DecoderForCausalLM
from mmwb.models.vision.base import VisionTower


def tower_spec(tower: VisionTower, open_clip_config: dict | None = None) -> dict[str, Any]:
    """The tower's architecture and feature choice (layer, CLS, norm) as JSON; open_clip needs its model config."""
    from mmwb.models.vision.conv import ConvTower
    from mmwb.models.vision.hf import HFVisionTower
    from mmwb.models.vision.moonvit import MoonViT
    from mmwb.models.vision.open_clip import OpenClipTower

    if isinstance(tower, MoonViT):
        return {"type": "moonvit", "config": dataclasses.asdict(tower.config)}
    if isinstance(tower, ConvTower):
        return {"type": "conv", "config": dataclasses.asdict(tower.config)}
    if isinstance(tower, HFVisionTower):
        p = tower.processor
        return {
            "type": "hf",
            "config": tower.model.config.to_dict(),
            "select_layer": len(tower.model.encoder.layers),  # blocks kept = the chosen layer's index
            "drop_cls": tower.drop_cls,
            "final_norm": tower.final_norm,
            "processor": {"size": p.size, "mean": p.mean, "std": p.std, "resize_mode": p.resize_mode},
        }
    if isinstance(tower, OpenClipTower):
        if open_clip_config is None:
            raise MmwbConfigError("saving an open_clip tower needs its open_clip model config")
        return {
            "type": "open_clip",
            "model_cfg": open_clip_config,
            "preprocess_cfg": dict(tower.visual.preprocess_cfg),
            "select_layer": len(tower.visual.transformer.resblocks),
            "drop_cls": tower.drop_cls,
            "final_norm": tower.final_norm,
            "resize_mode": tower.resize_mode,
        }
    raise MmwbConfigError(f"cannot save a {type(tower).__name__} vision tower")


def build_tower(spec: dict[str, Any]) -> VisionTower:
    kind = spec.get("type")
    if kind == "conv":
        from mmwb.models.vision.conv import ConvTower, ConvTowerConfig

        return ConvTower(ConvTowerConfig(**spec["config"]))
    if kind == "moonvit":
        from mmwb.models.vision.moonvit import MoonViT, MoonViTConfig

        return MoonViT(MoonViTConfig(**spec["config"]))
    if kind == "hf":
        from mmwb.models.vision.base import FixedSizeImageProcessor
        from mmwb.models.vision.hf import HFVisionTower, vision_model_from_config

        p = spec["processor"]
        processor = FixedSizeImageProcessor(p["size"], tuple(p["mean"]), tuple(p["std"]), p["resize_mode"])
        model = vision_model_from_config(spec["config"], "config.json: vision")
        return HFVisionTower(model, spec["select_layer"], spec["drop_cls"], spec["final_norm"], processor)
    if kind == "open_clip":
        from open_clip.model import _build_vision_tower

        from mmwb.models.vision.open_clip import OpenClipTower

        cfg = spec["model_cfg"]
        visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False))
        visual.preprocess_cfg = spec["preprocess_cfg"]
        return OpenClipTower(
            visual, spec["select_layer"], spec["drop_cls"], spec["final_norm"], spec["resize_mode"]
        )
    raise MmwbCheckpointError(
        f"vision tower type {kind!r} is not one of ['conv', 'hf', 'moonvit', 'open_clip']"
    )


def projector_spec(projector: nn.Module) -> dict[str, Any]:
    from mmwb.models.projectors import MLP2xGelu, PixelShuffleMLP, QFormer

    if isinstance(projector, QFormer):
        return {"type": "qformer", "config": dataclasses.asdict(projector.config)}
    if isinstance(projector, PixelShuffleMLP):
        merged = projector.in_proj.in_features
        kh, kw = projector.kernel
        return {
            "type": "pixel_shuffle_mlp",
            "vision_dim": merged // (kh * kw),
            "out_dim": projector.out_proj.out_features,
            "kernel": [kh, kw],
            "norm_eps": projector.pre_norm.eps,
        }
    if isinstance(projector, MLP2xGelu):
        return {
            "type": "mlp2x_gelu",
            "vision_dim": projector.linear_1.in_features,
            "out_dim": projector.linear_2.out_features,
            "bias": projector.linear_1.bias is not None,
        }
    raise MmwbConfigError(f"cannot save a {type(projector).__name__} projector")


def build_projector(spec: dict[str, Any]) -> nn.Module:
    from mmwb.models.projectors import MLP2xGelu, PixelShuffleMLP, QFormer, QFormerConfig

    kind = spec.get("type")
    if kind == "qformer":
        return QFormer(QFormerConfig(**spec["config"]))
    if kind == "pixel_shuffle_mlp":
        return PixelShuffleMLP(spec["vision_dim"], spec["out_dim"], tuple(spec["kernel"]), spec["norm_eps"])
    if kind == "mlp2x_gelu":
        projector = MLP2xGelu(spec["vision_dim"], spec["out_dim"])
        if not spec.get("bias", True):
            projector.linear_1 = nn.Linear(spec["vision_dim"], spec["out_dim"], bias=False)
            projector.linear_2 = nn.Linear(spec["out_dim"], spec["out_dim"], bias=False)
        return projector
    raise MmwbCheckpointError(
        f"projector type {kind!r} is not one of ['mlp2x_gelu', 'pixel_shuffle_mlp', 'qformer']"
    )


def text_spec(language_model: nn.Module) -> dict[str, Any]:
    if isinstance(language_model, DecoderForCausalLM):
        return {"type": "mmwb", "decoder": language_model.config.to_dict()}
    return {"type": "transformers", "config": language_model.model.config.to_dict()}


def build_text(spec: dict[str, Any]) -> nn.Module:
    if spec.get("type") == "mmwb":
        return DecoderForCausalLM(DecoderConfig.from_dict(spec["decoder"]))
    if spec.get("type") == "transformers":
        from mmwb.models.vlm.hf_text import TransformersCausalLM

        return TransformersCausalLM.from_config(spec["config"])
    raise MmwbCheckpointError(
        f"language model type {spec.get('type')!r} is not one of ['mmwb', 'transformers']"
    )
