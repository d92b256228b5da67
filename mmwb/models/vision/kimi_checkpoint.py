"""Read the vision tower and projector of a ``kimi_k25`` or ``kimi_vl`` checkpoint into MoonViT / PixelShuffleMLP
names.

Three layouts exist: Moonshot's as published, for Kimi-K2.5 (``vision_tower.encoder.blocks.N.wqkv`` with
interleaved-RoPE channel order, ``mm_projector.proj.0/2``) and for Kimi-VL (the same tower,
``multi_modal_projector.linear_1/linear_2``), and transformers' in-memory one for kimi_k25
(``model.vision_tower.layers.N.attn.q_proj`` in rotate-half order, ``model.mm_projector.in_proj``). MoonViT keeps
Moonshot's layout, so the first two need prefixes stripped and the third is permuted back. Kimi-VL's projector is
the same computation as Kimi-K2.5's: LayerNorm over each 1152-wide patch, the 2x2 merge, linear, exact GELU,
linear.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from mmwb.errors import MmwbCheckpointError
from mmwb.models.projectors.pixel_shuffle import PixelShuffleMLP
from mmwb.models.vision.moonvit import MoonViT, MoonViTConfig

# transformers' in-memory block names -> MoonViT's (original) names
_HF_BLOCK_RENAMES = {
    "norm1": "norm0",
    "norm2": "norm1",
    "mlp.fc1": "mlp.fc0",
    "mlp.fc2": "mlp.fc1",
    "attn.proj": "wo",
}
_ORIGINAL_PROJECTOR_RENAMES = {"pre_norm": "pre_norm", "proj.0": "in_proj", "proj.2": "out_proj"}
_KIMI_VL_PROJECTOR_RENAMES = {"pre_norm": "pre_norm", "linear_1": "in_proj", "linear_2": "out_proj"}
MODEL_TYPES = ("kimi_k25", "kimi_vl")

# Moonshot's own config.json names for the vision settings, next to transformers' names
_VISION_CONFIG_KEYS = {
    "patch_size": ("patch_size",),
    "hidden_size": ("hidden_size", "vt_hidden_size"),
    "num_layers": ("num_hidden_layers", "vt_num_hidden_layers"),
    "num_heads": ("num_attention_heads", "vt_num_attention_heads"),
    "intermediate_size": ("intermediate_size", "vt_intermediate_size"),
    "pos_emb_height": ("pos_emb_height", "init_pos_emb_height"),
    "pos_emb_width": ("pos_emb_width", "init_pos_emb_width"),
    "hidden_act": ("hidden_act",),
    "merge_kernel": ("merge_kernel_size",),
}


@dataclass
class KimiVision:
    """What a VLM needs from a kimi_k25 checkpoint's image side."""

    config: MoonViTConfig
    projector_out_dim: int
    projector_norm_eps: float
    tower_state: dict[str, torch.Tensor]
    projector_state: dict[str, torch.Tensor]


def moonvit_config_from_dict(config: Mapping) -> MoonViTConfig:
    """A ``kimi_k25`` config.json (transformers' or Moonshot's key names) -> MoonViTConfig."""
    vision = config.get("vision_config")
    if not isinstance(vision, Mapping):
        raise MmwbCheckpointError("config.json has no vision_config section")
    kwargs = {}
    for field, names in _VISION_CONFIG_KEYS.items():
        found = [vision[name] for name in names if name in vision]
        if found:
            kwargs[field] = found[0]
    rope = vision.get("rope_parameters") or {}
    if "rope_theta" in rope:
        kwargs["rope_theta"] = float(rope["rope_theta"])
    return MoonViTConfig(**kwargs)


def read_kimi_vision(path: str | Path) -> KimiVision:
    """Config, tower and projector tensors of a local kimi_k25 or kimi_vl checkpoint directory (any layout)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MmwbCheckpointError(f"{path} has no config.json")
    config = json.loads(config_file.read_text())
    if config.get("model_type") not in MODEL_TYPES:
        raise MmwbCheckpointError(
            f"{config_file}: model_type is {config.get('model_type')!r}, not one of {MODEL_TYPES}"
        )
    vision_config = moonvit_config_from_dict(config)
    text_hidden = (config.get("text_config") or {}).get("hidden_size")
    if text_hidden is None:
        raise MmwbCheckpointError(f"{config_file}: text_config.hidden_size is missing")
    prefixes = ("vision_tower.", "mm_projector.", "multi_modal_projector.", "model.vision_tower.")
    tensors = _read_safetensors(path, prefixes=(*prefixes, "model.mm_projector."))
    tower, projector = split_kimi_state(tensors, vision_config.num_heads)
    eps = config.get("projection_layer_norm_eps", config["vision_config"].get("projector_ln_eps", 1e-5))
    return KimiVision(vision_config, int(text_hidden), float(eps), tower, projector)


def build_kimi_vision(
    kimi: KimiVision, device: torch.device, dtype: torch.dtype
) -> tuple[MoonViT, PixelShuffleMLP]:
    """MoonViT and its projector holding the checkpoint's tensors (built on the meta device, then assigned)."""
    with torch.device("meta"):
        tower = MoonViT(kimi.config)
        projector = PixelShuffleMLP(
            kimi.config.hidden_size, kimi.projector_out_dim, kimi.config.merge_kernel, kimi.projector_norm_eps
        )
    for name, module, state in (
        ("vision tower", tower, kimi.tower_state),
        ("projector", projector, kimi.projector_state),
    ):
        state = {key: tensor.to(device=device, dtype=dtype) for key, tensor in state.items()}
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as error:
            raise MmwbCheckpointError(f"Kimi {name} tensors do not fit: {error}") from error
    return tower.eval(), projector.eval()


def split_kimi_state(
    state: Mapping[str, torch.Tensor], num_heads: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full-model tensors (either layout) -> (MoonViT state dict, PixelShuffleMLP state dict)."""
    if any(key.startswith("model.vision_tower.") for key in state):
        return _from_transformers(state, num_heads)
    if any(key.startswith("vision_tower.") for key in state):
        return _from_original(state)
    raise MmwbCheckpointError("no vision_tower tensors found (neither Moonshot's nor transformers' names)")


def _from_original(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    tower, projector = {}, {}
    for key, tensor in state.items():
        if key.startswith("vision_tower."):
            tower[key.removeprefix("vision_tower.").removeprefix("encoder.")] = tensor
        elif key.startswith("mm_projector."):
            projector[_rename(key.removeprefix("mm_projector."), _ORIGINAL_PROJECTOR_RENAMES)] = tensor
        elif key.startswith("multi_modal_projector."):
            projector[_rename(key.removeprefix("multi_modal_projector."), _KIMI_VL_PROJECTOR_RENAMES)] = (
                tensor
            )
    return tower, projector


def _from_transformers(state: Mapping[str, torch.Tensor], num_heads: int) -> tuple[dict, dict]:
    tower, projector, qkv = {}, {}, {}
    for key, tensor in state.items():
        if key.startswith("model.mm_projector."):
            projector[key.removeprefix("model.mm_projector.")] = tensor  # same names as ours
            continue
        if not key.startswith("model.vision_tower."):
            continue
        name = key.removeprefix("model.vision_tower.")
        if name == "patch_embed.pos_emb.position_embeddings":
            tower["patch_embed.pos_emb.weight"] = tensor
        elif match := re.fullmatch(r"layers\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)", name):
            layer, which, kind = match.groups()
            qkv.setdefault((layer, kind), {})[which] = tensor
        elif match := re.fullmatch(r"layers\.(\d+)\.(.+)", name):
            tower[f"blocks.{match[1]}.{_rename(match[2], _HF_BLOCK_RENAMES)}"] = tensor
        else:
            tower[name] = tensor
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise MmwbCheckpointError(f"layer {layer}: q/k/v_proj.{kind} incomplete (found {sorted(parts)})")
        q, k = (rotate_half_to_interleaved(parts[name], num_heads) for name in "qk")
        tower[f"blocks.{layer}.wqkv.{kind}"] = torch.cat([q, k, parts["v"]])
    return tower, projector


def rotate_half_to_interleaved(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo transformers' PermuteForRope: per head, ``[re_0..re_n, im_0..im_n]`` -> ``[re_0, im_0, ...]``."""
    rows = tensor.shape[0]
    # (H, 2, D/2, ...) -> (H, D/2, 2, ...)
    return (
        tensor.reshape(num_heads, 2, rows // num_heads // 2, *tensor.shape[1:])
        .transpose(1, 2)
        .reshape(tensor.shape)
    )


def _rename(name: str, renames: Mapping[str, str]) -> str:
    for old, new in renames.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return name


def _read_safetensors(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors whose names start with ``prefixes`` from a (possibly sharded) safetensors checkpoint."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({file for key, file in weight_map.items() if key.startswith(prefixes)})
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise MmwbCheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for file in files:
        with safe_open(path / file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key.startswith(prefixes):
                    tensors[key] = handle.get_tensor(key)
    return tensors
