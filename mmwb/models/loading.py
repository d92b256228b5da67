"""`mmwb.from_pretrained`: read config.json's model_type and hand the folder to the family that owns it."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from mmwb.errors import MmwbCheckpointError

# model_type -> "module:function(path, device=, dtype=, quantize=)"; imported lazily so one family never loads
# another.
LOADERS: dict[str, str] = {
    "mmwb_decoder": "mmwb.models.decoder.checkpoint:load_decoder",
    "deepseek_v3": "mmwb.models.decoder.checkpoint:load_decoder",
    "kimi_k2": "mmwb.models.decoder.checkpoint:load_decoder",
    "qwen3_moe": "mmwb.models.decoder.checkpoint:load_decoder",
    "mixtral": "mmwb.models.decoder.checkpoint:load_decoder",
    "mmwb_vlm": "mmwb.models.vlm.checkpoint:load_vlm",
    "kimi_k25": "mmwb.models.vlm.import_hf:load_kimi",
    "kimi_vl": "mmwb.models.vlm.import_hf:load_kimi",
    "llava": "mmwb.models.vlm.import_hf:load_llava",
    "instructblip": "mmwb.models.vlm.import_hf:load_instructblip",
}


def from_pretrained(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
    group_size: int = 64,
):
    """Load any checkpoint folder mmwb understands (see LOADERS) onto device in dtype; ``quantize`` ("int8" or
    "int4", groups of ``group_size``) then stores its linear layers and experts so (mmwb.models.quantize)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise MmwbCheckpointError(f"{directory}: not a checkpoint folder")
    config = read_config(directory)
    model_type = config.get("model_type")
    if model_type not in LOADERS:
        raise MmwbCheckpointError(
            f"{directory}/config.json: model_type {model_type!r} is not one of {sorted(LOADERS)}"
        )
    # lazy: quantize imports the decoder package, whose loaders import this module
    from mmwb.models.quantize import Quantization, check_request, quantize_model

    stored = config.get("quantization")
    if stored is not None and quantize is not None:
        raise MmwbCheckpointError(
            f"{directory}: already quantized ({stored['mode']}); load it without quantize"
        )
    if quantize is not None or stored is not None:
        device = "cpu" if device is None else device  # the quantized kernels run on the CPU
        check_request(quantize or stored["mode"], group_size if quantize else stored["group_size"], device)
    module, function = LOADERS[model_type].split(":")
    loader = getattr(importlib.import_module(module), function)
    request = None if quantize is None else Quantization(quantize, group_size)
    # the loader quantizes what it streams (MoE text models); the rest (towers, projectors, transformers' text
    # models) is quantized once loaded
    model = loader(directory, device=device, dtype=dtype, quantize=request)
    if request is not None:
        quantize_model(model, request.mode, request.group_size)
    return model


def read_config(directory: Path) -> dict:
    """config.json of a checkpoint folder as a dict, with errors that name the file."""
    config = directory / "config.json"
    if not config.is_file():
        raise MmwbCheckpointError(f"{directory}: no config.json")
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise MmwbCheckpointError(f"{config}: not valid JSON ({err})") from err
