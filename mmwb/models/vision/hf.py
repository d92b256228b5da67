"""transformers CLIP, SigLIP and InstructBLIP (EVA) vision towers from local checkpoint folders, features from a
chosen layer.

transformers runs the tower; mmwb only picks the hidden state (LLaVA: penultimate layer, CLS dropped; InstructBLIP:
the last layer through the final LayerNorm, CLS kept) and drops the blocks after it, so they cost nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPVisionModel, InstructBlipVisionModel, SiglipVisionModel

from mmwb.errors import MmwbCheckpointError, MmwbConfigError
from mmwb.models.vision.base import (
    FixedSizeImageProcessor,
    PixelInputs,
    VisionFeatures,
    VisionTower,
    hidden_state_index,
)

_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# model_type -> (model class, has a CLS token, default mean, default std, default resize mode); BLIP's processor
# stretches to a square (no crop) with CLIP's statistics
_FAMILIES = {
    "clip_vision_model": (CLIPVisionModel, True, _CLIP_MEAN, _CLIP_STD, "crop"),
    "siglip_vision_model": (SiglipVisionModel, False, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "squash"),
    "instructblip_vision_model": (InstructBlipVisionModel, True, _CLIP_MEAN, _CLIP_STD, "squash"),
}
VisionModel = CLIPVisionModel | SiglipVisionModel | InstructBlipVisionModel


def vision_model_from_config(config: dict, where: str) -> VisionModel:
    """A randomly initialised CLIP, SigLIP or InstructBLIP vision model from a config dict with its
    ``model_type``; ``where`` names the config in the error for any other type."""
    from transformers import AutoConfig

    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type not in _FAMILIES:
        raise MmwbCheckpointError(
            f"{where}: vision model_type {model_type!r} is not one of {sorted(_FAMILIES)}"
        )
    return _FAMILIES[model_type][0](AutoConfig.for_model(model_type, **config))


class HFVisionTower(VisionTower):
    """``(B, N, C)`` hidden states of one layer of a transformers CLIP/SigLIP/InstructBLIP vision model."""

    def __init__(
        self,
        model: VisionModel,
        select_layer: int = -2,
        drop_cls: bool = True,
        final_norm: bool = False,
        processor: FixedSizeImageProcessor | None = None,
    ) -> None:
        super().__init__()
        family = _FAMILIES[model.config.model_type]
        index = hidden_state_index(select_layer, len(model.encoder.layers))
        model.encoder.layers = model.encoder.layers[:index]  # later blocks would be computed and thrown away
        self.model = model
        self.has_cls = family[1]
        self.drop_cls = drop_cls and self.has_cls
        self.final_norm = final_norm
        self.hidden_size = model.config.hidden_size
        self.processor = processor or FixedSizeImageProcessor(
            model.config.image_size, family[2], family[3], family[4]
        )
        side = model.config.image_size // model.config.patch_size
        self.grid = (side, side)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        select_layer: int = -2,
        drop_cls: bool = True,
        final_norm: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> HFVisionTower:
        """Load a local ``clip_vision_model`` / ``siglip_vision_model`` / ``instructblip_vision_model`` folder;
        nothing is downloaded."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise MmwbCheckpointError(f"{path} has no config.json")
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type not in _FAMILIES:
            raise MmwbCheckpointError(
                f"{config_file}: model_type {model_type!r} is not one of {sorted(_FAMILIES)}"
            )
        model = _FAMILIES[model_type][0].from_pretrained(path, local_files_only=True, dtype=dtype)
        processor = processor_from_file(
            path / "preprocessor_config.json", model_type, model.config.image_size
        )
        tower = cls(model, select_layer, drop_cls, final_norm, processor)
        return tower.to(device or torch.device("cpu")).eval()

    def encode(self, inputs: PixelInputs) -> VisionFeatures:
        out = self.model(pixel_values=inputs.pixel_values, output_hidden_states=True)
        hidden = out.hidden_states[-1]  # (B, [1+]N, C), the chosen layer after truncation
        if self.final_norm:
            hidden = self.model.post_layernorm(hidden)
        if self.drop_cls:
            hidden = hidden[:, 1:]
        batch, count = hidden.shape[:2]
        return VisionFeatures(hidden, [count] * batch, [self.grid] * batch)

    def feature_settings(self) -> dict[str, bool | int | str]:
        return {"drop_cls": self.drop_cls, "final_norm": self.final_norm}

    def image_processor(self) -> FixedSizeImageProcessor:
        return self.processor


def processor_from_file(path: Path, model_type: str, image_size: int) -> FixedSizeImageProcessor | None:
    """Mean and std from the image processor saved in a checkpoint folder, if there is one (size and resizing are
    the tower's: its image size, its family's resize mode). ``path`` is its preprocessor_config.json; a
    transformers-5 processor keeps the same settings in processor_config.json's ``image_processor`` section."""
    section = path.with_name("processor_config.json")
    if path.is_file():
        saved, where = _read_json(path), path
    elif section.is_file():
        saved, where = _read_json(section).get("image_processor"), section
    else:
        return None
    if not isinstance(saved, dict):
        return None
    _, _, mean, std, mode = _FAMILIES[model_type]
    try:
        return FixedSizeImageProcessor(
            image_size, tuple(saved.get("image_mean", mean)), tuple(saved.get("image_std", std)), mode
        )
    except (TypeError, ValueError) as error:
        raise MmwbConfigError(f"{where}: unusable image_mean/image_std ({error})") from error


def _read_json(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MmwbConfigError(f"{path}: not valid JSON ({error})") from error
    return saved if isinstance(saved, dict) else {}
