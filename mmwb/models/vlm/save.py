"""mmwb's VLM folder and its writer: ``config.json`` (model_type ``mmwb_vlm``, one spec per part),
``model.safetensors`` (tensor names ``vision_tower.*``, ``projector.*``, ``language_model.*``) and the tokenizer
files (an InstructBLIP Q-Former's own in ``qformer_tokenizer/``). ``checkpoint.load_vlm`` reads it back; this
module does not import the model class, so the model's ``save_pretrained`` can use it without an import circle."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from safetensors.torch import save_model
from torch import nn

from mmwb.data.io import atomic_write_path, write_json
from mmwb.models.vlm.parts import projector_spec, text_spec, tower_spec

MODEL_TYPE = "mmwb_vlm"
WEIGHTS_NAME = "model.safetensors"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"  # InstructBLIP's second tokenizer, where its processor saves it


def save_vlm(model: nn.Module, path: Path) -> None:
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
    from mmwb.models.quantize import quantization_settings

    if (settings := quantization_settings(model)) is not None:
        config["quantization"] = settings
    with atomic_write_path(path / WEIGHTS_NAME) as tmp:
        save_model(model, str(tmp), metadata={"format": "pt"}, force_contiguous=True)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(path)
    if model.qformer_tokenizer is not None:
        model.qformer_tokenizer.save_pretrained(path / QFORMER_TOKENIZER_DIR)
    write_json(path / "config.json", config)
