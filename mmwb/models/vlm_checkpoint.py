"""mmwb's own VLM folder: ``config.json`` (model_type ``mmwb_vlm``), ``model.safetensors``, tokenizer files.

The config holds one spec per part (tower, projector, language model) from which the modules are rebuilt with
random weights before the file's tensors are loaded into them. Tensor names: ``vision_tower.*``, ``projector.*``,
``language_model.*`` (the modules' own state-dict names below those prefixes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from mmwb.data.io import atomic_write_path, write_json
from mmwb.errors import MmwbCheckpointError, MmwbConfigError
from mmwb.models.decoder import DecoderConfig, DecoderForCausalLM
from mmwb.models.loading import read_config
from mmwb.models.vision.base import VisionTower
from mmwb.models.vlm import VisionLanguageModel, VLMConfig

MODEL_TYPE = "mmwb_vlm"
WEIGHTS_NAME = "model.safetensors"


# --- specs: what rebuilds each part ---


def tower_spec(tower: VisionTower, open_clip_config: dict | None = None) -> dict[str, Any]:
    """The tower's architecture and feature choice (layer, CLS, norm) as JSON; open_clip needs its model config."""
    from mmwb.models.vision.hf import HFVisionTower
    from mmwb.models.vision.moonvit import MoonViT
    from mmwb.models.vision.open_clip import OpenClipTower

    if isinstance(tower, MoonViT):
        return {"type": "moonvit", "config": dataclasses.asdict(tower.config)}
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
    raise MmwbCheckpointError(f"vision tower type {kind!r} is not one of ['hf', 'moonvit', 'open_clip']")


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
        from mmwb.models.hf_text import TransformersCausalLM

        return TransformersCausalLM.from_config(spec["config"])
    raise MmwbCheckpointError(
        f"language model type {spec.get('type')!r} is not one of ['mmwb', 'transformers']"
    )


# --- the folder ---


def save_vlm(model: VisionLanguageModel, path: Path) -> None:
    """Write config, weights and tokenizer; each file appears whole (atomic writes)."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    cfg.text = text_spec(model.language_model)
    cfg.projector = projector_spec(model.projector)
    if not cfg.vision or cfg.vision.get("type") != "open_clip":
        cfg.vision = tower_spec(model.vision_tower)
    config = {
        "model_type": MODEL_TYPE,
        "dtype": str(model.dtype).removeprefix("torch."),
        **dataclasses.asdict(cfg),
    }
    with atomic_write_path(path / WEIGHTS_NAME) as tmp:
        save_model(model, str(tmp), metadata={"format": "pt"}, force_contiguous=True)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(path)
    write_json(path / "config.json", config)


def load_vlm(path: str | Path, device=None, dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """Rebuild the parts from config.json and load model.safetensors (strict: every tensor must fit)."""
    from mmwb.data.tokenizer import folder_tokenizer
    from mmwb.runtime import resolve_device

    directory = Path(path)
    raw = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise MmwbCheckpointError(f"{directory}: {WEIGHTS_NAME} is missing")
    fields = {f.name for f in dataclasses.fields(VLMConfig)}
    try:
        cfg = VLMConfig(**{k: v for k, v in raw.items() if k in fields})
    except TypeError as err:
        raise MmwbCheckpointError(f"{directory}/config.json: {err}") from err
    model = VisionLanguageModel(
        cfg, build_tower(cfg.vision), build_projector(cfg.projector), build_text(cfg.text)
    )
    try:
        load_model(model, str(weights), strict=True)
    except (RuntimeError, SafetensorError) as err:
        raise MmwbCheckpointError(f"{weights}: tensors do not fit the model in config.json ({err})") from err
    model.tokenizer = folder_tokenizer(directory)
    _reset_rope(model)
    model = model.to(resolve_device(device), dtype or getattr(torch, raw.get("dtype", "float32")))
    return model.eval()


def _reset_rope(model: VisionLanguageModel) -> None:
    if isinstance(model.language_model, DecoderForCausalLM):
        model.language_model.reset_rope(torch.device("cpu"))


def load_any_vlm(path: str | Path, device=None, dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """``mmwb.from_pretrained`` for a folder that must hold a vision-language model."""
    from mmwb.models.loading import from_pretrained

    model = from_pretrained(path, device=device, dtype=dtype)
    if not isinstance(model, VisionLanguageModel):
        raise MmwbCheckpointError(f"{path}: holds a {type(model).__name__}, not a vision-language model")
    return model
