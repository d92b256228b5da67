"""mmwb's decoder checkpoint format and its writer: ``model.safetensors`` (or shards with an index), then
``config.json`` with model_type ``mmwb_decoder``. ``checkpoint.load_decoder`` reads it back; this module does not
import the model, so the model's ``save_pretrained`` can use it without an import circle."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from mmwb.data.io import atomic_write_path, write_json

MODEL_TYPE = "mmwb_decoder"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def save_decoder(model: nn.Module, path: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write safetensors (sharded with an index above max_shard_bytes), then config.json (model_type
    mmwb_decoder). Every file is written atomically, and weight files of an earlier save that the new one does not
    list (a stale index would otherwise win over a new single file) are removed."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # absent when the head is quantized (its own int8/int4 copy)
    shards = _shard(state, max_shard_bytes)
    names = (
        [WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    for name, shard in zip(names, shards, strict=True):
        with atomic_write_path(directory / name) as tmp:
            save_file(shard, tmp, metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key in shard}
        write_json(directory / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    stale = {directory / INDEX_NAME} if len(shards) == 1 else set()
    stale |= {p for p in directory.glob("model*.safetensors") if p.name not in names}
    for file in stale:
        file.unlink(missing_ok=True)
    config = {
        "model_type": MODEL_TYPE,
        "dtype": str(model.dtype).removeprefix("torch."),
        "decoder": model.config.to_dict(),
    }
    from mmwb.models.quantize import quantization_settings  # here: quantize imports the decoder's modules

    if (settings := quantization_settings(model)) is not None:
        config["quantization"] = settings
    write_json(directory / "config.json", config)


def _shard(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards
