"""Loading mmwb's own VLM folder (see ``save``): the parts rebuilt from config.json, then every tensor of
``model.safetensors`` loaded into them (strict: all must fit)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model

from mmwb.data.tokenizer import folder_tokenizer
from mmwb.errors import MmwbCheckpointError
from mmwb.models.decoder import DecoderForCausalLM
from mmwb.models.loading import from_pretrained, read_config
from mmwb.models.quantize import Quantization, quantize_model
from mmwb.models.vlm.model import VisionLanguageModel, VLMConfig
from mmwb.models.vlm.parts import build_projector, build_text, build_tower
from mmwb.models.vlm.save import QFORMER_TOKENIZER_DIR, WEIGHTS_NAME
from mmwb.runtime import resolve_device


def load_vlm(
    path: str | Path, device=None, dtype: torch.dtype | None = None, quantize: Quantization | None = None
) -> VisionLanguageModel:
    """Rebuild the parts from config.json and load model.safetensors (strict: every tensor must fit). Small
    models: ``quantize`` is left to the caller (``mmwb.from_pretrained`` quantizes the loaded model)."""
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
    if "quantization" in raw:  # an exported int8/int4 folder: the stored bytes replace the new layers' own
        quantize_model(model, **raw["quantization"], empty=True)
    try:
        load_model(model, str(weights), strict=True)
    except (RuntimeError, SafetensorError) as err:
        raise MmwbCheckpointError(f"{weights}: tensors do not fit the model in config.json ({err})") from err
    model.tokenizer = folder_tokenizer(directory)
    model.qformer_tokenizer = folder_tokenizer(directory / QFORMER_TOKENIZER_DIR)
    _reset_rope(model)
    model = model.to(resolve_device(device), dtype or getattr(torch, raw.get("dtype", "float32")))
    return model.eval()


def _reset_rope(model: VisionLanguageModel) -> None:
    if isinstance(model.language_model, DecoderForCausalLM):
        model.language_model.reset_rope(torch.device("cpu"))


def load_any_vlm(
    path: str | Path,
    device=None,
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
    group_size: int = 64,
) -> VisionLanguageModel:
    """``mmwb.from_pretrained`` for a folder that must hold a vision-language model."""
    model = from_pretrained(path, device=device, dtype=dtype, quantize=quantize, group_size=group_size)
    if not isinstance(model, VisionLanguageModel):
        raise MmwbCheckpointError(f"{path}: holds a {type(model).__name__}, not a vision-language model")
    return model
