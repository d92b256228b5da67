"""Load Stable Diffusion (1.x, 2.x, XL) with one or several ControlNets from local files only.

A model is a diffusers folder (``model_index.json`` plus one sub-folder per part) or one ``.safetensors`` file
from the original Stable Diffusion code base. A single file holds weights but no configs, so diffusers needs a
diffusers folder of the same base model for them: ``config`` if given, else the one diffusers would download,
taken from the local Hugging Face cache only. Nothing is ever downloaded, and every missing part is named.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    ControlNetModel,
    DiffusionPipeline,
    MultiControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
)

from mmwb.errors import MmwbCheckpointError

# model_index.json "_class_name" of a base model -> the ControlNet pipeline that wraps it
PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "StableDiffusionPipeline": StableDiffusionControlNetPipeline,
    "StableDiffusionControlNetPipeline": StableDiffusionControlNetPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLControlNetPipeline,
    "StableDiffusionXLControlNetPipeline": StableDiffusionXLControlNetPipeline,
}
REQUIRED_PARTS: dict[type[DiffusionPipeline], tuple[str, ...]] = {
    StableDiffusionControlNetPipeline: ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    StableDiffusionXLControlNetPipeline: (
        "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
    ),
}  # fmt: skip
WEIGHTED_PARTS = frozenset(
    {"unet", "vae", "text_encoder", "text_encoder_2"}
)  # configs-only: tokenizer, scheduler
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
CONFIG_PATTERNS = ["*.json", "*/*.json", "*/*.txt"]  # what a single file needs from its base model's folder
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError)


def load_controlnet_pipeline(
    model: str | Path,
    controlnets: Sequence[str | Path],
    config: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> DiffusionPipeline:
    """The diffusers ControlNet pipeline for ``model`` with ``controlnets`` (one, or several as a multi-ControlNet).

    ``config`` is a local diffusers folder of the base model, used only when ``model`` is a single file.
    """
    if not controlnets:
        raise MmwbCheckpointError("at least one ControlNet is needed (--controlnet PATH)")
    nets = [load_controlnet(path, dtype) for path in controlnets]
    controlnet = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
    model = Path(model)
    if model.is_dir():
        pipe = _load_folder(model, controlnet, dtype)
    elif model.is_file():
        pipe = _load_single_file(model, controlnet, config, dtype)
    else:
        raise MmwbCheckpointError(
            f"{model}: model not found (expected a diffusers folder or a .safetensors file)"
        )
    for path, net in zip(controlnets, nets, strict=True):
        check_compatible(net, pipe.unet, Path(path), model)
    return pipe


def load_controlnet(path: str | Path, dtype: torch.dtype = torch.float32) -> ControlNetModel:
    """A ControlNet from a diffusers folder, or from one ``.safetensors`` file with its config.json beside it
    (else the config diffusers would download for it, from the local Hugging Face cache)."""
    path = Path(path)
    if path.is_dir():
        _check_part(path, "ControlNet", weights=True, config="config.json")
        load = partial(ControlNetModel.from_pretrained, path, use_safetensors=True)
    elif path.is_file():
        _check_safetensors_file(path, "ControlNet")
        beside = path.parent / "config.json"
        config = (
            path.parent
            if beside.is_file()
            else _cached_config_folder(path, f"put its config.json in {path.parent}")
        )
        load = partial(ControlNetModel.from_single_file, str(path), config=str(config))
    else:
        raise MmwbCheckpointError(
            f"{path}: ControlNet not found (expected a diffusers folder or a .safetensors file)"
        )
    try:
        return load(dtype=dtype, local_files_only=True)
    except LOAD_ERRORS as err:
        raise MmwbCheckpointError(f"{path}: cannot load this ControlNet ({err})") from err


def check_compatible(controlnet: ControlNetModel, unet: torch.nn.Module, path: Path, model: Path) -> None:
    """Refuse a ControlNet made for another base model (an SD 1.5 ControlNet on SD 2.1, say) before it fails
    with a shape error deep inside a UNet block."""
    for key in ("cross_attention_dim", "block_out_channels"):
        mine, theirs = controlnet.config[key], unet.config[key]
        if list(_as_tuple(mine)) != list(_as_tuple(theirs)):
            raise MmwbCheckpointError(
                f"{path}: this ControlNet has {key}={mine} but the model {model} has {theirs}; "
                "use a ControlNet trained for this base model"
            )


def pipeline_class_for(folder: Path) -> type[DiffusionPipeline]:
    """The ControlNet pipeline class for the base model described by ``folder/model_index.json``."""
    index = read_model_index(folder)
    name = index.get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise MmwbCheckpointError(
            f"{folder}: model_index.json describes a {name!r}; mmwb runs ControlNets on "
            f"{', '.join(sorted(PIPELINE_CLASSES))}"
        )
    return PIPELINE_CLASSES[name]


def read_model_index(folder: Path) -> dict[str, Any]:
    path = folder / "model_index.json"
    if not path.is_file():
        raise MmwbCheckpointError(
            f"{folder}: no model_index.json, so this is not a diffusers pipeline folder"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MmwbCheckpointError(f"{path}: not valid JSON ({err})") from err


def _load_folder(folder: Path, controlnet: torch.nn.Module, dtype: torch.dtype) -> DiffusionPipeline:
    cls = pipeline_class_for(folder)
    index = read_model_index(folder)
    for part in REQUIRED_PARTS[cls]:
        if not isinstance(index.get(part), list) or index[part][0] is None:
            raise MmwbCheckpointError(f"{folder}: model part {part!r} is not listed in model_index.json")
        _check_part(folder / part, f"model part {part!r}", weights=part in WEIGHTED_PARTS)
    try:
        return cls.from_pretrained(
            folder, controlnet=controlnet, dtype=dtype, local_files_only=True, use_safetensors=True
        )
    except LOAD_ERRORS as err:
        raise MmwbCheckpointError(f"{folder}: cannot load this model ({err})") from err


def _load_single_file(
    path: Path, controlnet: torch.nn.Module, config: str | Path | None, dtype: torch.dtype
) -> DiffusionPipeline:
    _check_safetensors_file(path, "model")
    hint = "pass --config DIR, a local diffusers folder of that base model (only its configs and tokenizers are read)"
    folder = Path(config) if config is not None else _cached_config_folder(path, hint)
    if not folder.is_dir():
        raise MmwbCheckpointError(
            f"{folder}: config folder not found (it should be a diffusers model folder)"
        )
    cls = pipeline_class_for(folder)
    try:
        return cls.from_single_file(
            str(path), config=str(folder), controlnet=controlnet, dtype=dtype, local_files_only=True
        )
    except LOAD_ERRORS as err:
        raise MmwbCheckpointError(
            f"{path}: cannot load this checkpoint with configs from {folder} ({err})"
        ) from err


def _cached_config_folder(path: Path, hint: str) -> Path:
    """The diffusers folder diffusers would download configs from for ``path``, found in the local cache only."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, load_single_file_checkpoint
    from huggingface_hub import snapshot_download

    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
        repo = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
    except LOAD_ERRORS as err:
        raise MmwbCheckpointError(f"{path}: cannot read this checkpoint ({err})") from err
    try:
        return Path(snapshot_download(repo, local_files_only=True, allow_patterns=CONFIG_PATTERNS))
    except Exception as err:  # huggingface_hub raises several unrelated types for "not in the cache"
        raise MmwbCheckpointError(
            f"{path}: a single-file checkpoint needs the configs of its base model; diffusers identifies it as "
            f"{repo!r}, which is not in the local Hugging Face cache: {hint}"
        ) from err


def _check_part(folder: Path, what: str, weights: bool, config: str | None = None) -> None:
    if not folder.is_dir():
        raise MmwbCheckpointError(f"{folder}: {what} is missing (no such folder)")
    if config is not None and not (folder / config).is_file():
        raise MmwbCheckpointError(f"{folder}: {what} has no {config}")
    if weights and not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise MmwbCheckpointError(
            f"{folder}: {what} has no .safetensors weights (mmwb does not load pickled .bin files; "
            "convert them to safetensors first)"
        )


def _check_safetensors_file(path: Path, what: str) -> None:
    if path.suffix != ".safetensors":
        raise MmwbCheckpointError(
            f"{path}: a single-file {what} must be a .safetensors file (pickled .ckpt/.bin files are refused)"
        )


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, list | tuple) else (value,)
