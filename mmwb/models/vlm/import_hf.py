"""``kimi_k25``, ``llava`` and ``instructblip`` checkpoint folders as mmwb VisionLanguageModels.

Both layouts are read: the published one (``language_model.model.*``, ``vision_tower.*``, ...) and transformers'
in-memory one (``model.language_model.*``, ``model.vision_tower.*``, ...). A text model mmwb's decoder knows
(DeepSeek-V3, Qwen3-MoE, Mixtral) runs on mmwb's decoder; any other runs on transformers through
``TransformersCausalLM``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mmwb.data.tokenizer import folder_tokenizer
from mmwb.errors import MmwbCheckpointError
from mmwb.models.decoder.checkpoint import (
    HF_MODEL_TYPES,
    TensorSource,
    assemble_decoder,
    hf_recipe,
    ignorable_hf_tensor,
)
from mmwb.models.decoder.config import DecoderConfig
from mmwb.models.loading import read_config
from mmwb.models.quantize import Quantization
from mmwb.models.vlm.model import VisionLanguageModel, VLMConfig
from mmwb.models.vlm.save import QFORMER_TOKENIZER_DIR
from mmwb.runtime import resolve_device

# checkpoint prefix -> language-model prefix, published layout first
_TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
)


class RenamedSource:
    """A TensorSource seen through a rename: only the tensors ``rename`` maps, under their new names."""

    def __init__(self, source: TensorSource, rename: Callable[[str], str | None]) -> None:
        self.source = source
        self.original = {new: name for name in source.names() if (new := rename(name)) is not None}

    def names(self) -> set[str]:
        return set(self.original)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(self.original[name])

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(self.original[name])

    def get(self, name: str) -> torch.Tensor:
        return self.source.get(self.original[name])

    def get_row(self, name: str, index: int) -> torch.Tensor:
        return self.source.get_row(self.original[name], index)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.source.get_rows(self.original[name], start, stop)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in self.original}


def _prefix_rename(pairs: tuple[tuple[str, str], ...]) -> Callable[[str], str | None]:
    def rename(name: str) -> str | None:
        for old, new in pairs:
            if name.startswith(old):
                return new + name[len(old) :]
        return None

    return rename


def load_text_model(
    directory: Path,
    text_config: dict,
    device: torch.device,
    dtype: torch.dtype | None,
    quantize: Quantization | None = None,
) -> nn.Module:
    """The language model of a VLM folder: mmwb's decoder where it knows the family (quantized as it is read,
    see assemble_decoder), else transformers' (quantized by the caller once loaded)."""
    source = RenamedSource(TensorSource(directory), _prefix_rename(_TEXT_PREFIXES))
    if not source.names():
        raise MmwbCheckpointError(f"{directory}: no language-model tensors found")
    model_type = text_config.get("model_type")
    if model_type in HF_MODEL_TYPES:
        cfg = DecoderConfig.from_hf_config(text_config)
        return assemble_decoder(
            cfg, source, hf_recipe(model_type, text_config, cfg), lambda n: ignorable_hf_tensor(n, cfg),
            device, dtype, directory, quantize,
        )  # fmt: skip
    return _load_transformers_text(directory, text_config, source, device, dtype or torch.float32, quantize)


def _load_transformers_text(
    directory: Path,
    text_config: dict,
    source: RenamedSource,
    device: torch.device,
    dtype: torch.dtype,
    quantize: Quantization | None,
) -> nn.Module:
    """transformers' text model built with its parameters on the meta device (buffers such as rope tables made
    as usual), then each parameter read from the checkpoint in ``dtype``, and with ``quantize`` each linear layer
    read straight into its quantized form: a 7B model never exists in fp32 (28 GB), nor in bf16 when quantized."""
    from accelerate import init_empty_weights

    from mmwb.models.quantize import (
        QuantizedLinear,
        check_request,
        check_shapes,
        quantization_targets,
        replace_module,
    )
    from mmwb.models.vlm.hf_text import TransformersCausalLM
    from mmwb.runtime.memory import return_freed_memory

    with init_empty_weights(include_buffers=False):
        wrapper = TransformersCausalLM.from_config(text_config)
    model = wrapper.model
    # a missing head is an error unless it is tied to the embeddings
    tied = ("lm_head.weight",) if model.config.tie_word_embeddings else ()
    _check_fit(model, source, directory, "language model", tied)
    targets = {}
    if quantize is not None:
        check_request(quantize.mode, quantize.group_size, device)
        targets = quantization_targets(model)
        check_shapes(targets, quantize.mode, quantize.group_size)
    table = model.get_input_embeddings().weight
    embeddings = next(name for name, p in model.named_parameters() if p is table)
    head = model.get_output_embeddings()
    with torch.no_grad():
        for name, module in targets.items():
            # a tied head is the embeddings, as transformers' tie_weights makes it, whatever the file holds
            weight = embeddings if tied and module is head else f"{name}.weight"
            bias = None if module.bias is None else source.get(f"{name}.bias").to(dtype)
            layer = QuantizedLinear.from_float(
                source.get(weight).to(dtype), bias, quantize.mode, quantize.group_size
            )
            replace_module(model, name, layer)
            return_freed_memory()
        for name, param in list(model.named_parameters()):
            if param.device.type == "meta" and name in source.names():
                owner, _, leaf = name.rpartition(".")
                tensor = source.get(name).to(device, dtype)
                setattr(model.get_submodule(owner), leaf, nn.Parameter(tensor, param.requires_grad))
        for name, buffer in model.named_buffers():
            if name in source.names():
                buffer.copy_(source.get(name))
    if tied and "lm_head" not in targets:
        model.tie_weights()
    return wrapper.to(device, dtype).eval()


def _check_fit(
    module: nn.Module, source: RenamedSource, directory: Path, what: str, tied_ok: tuple[str, ...] = ()
) -> None:
    """One error naming every missing, unexpected and mis-shaped tensor of ``module`` against ``source``."""
    target = module.state_dict()
    names = source.names()
    missing = [k for k in target if k not in names and k not in tied_ok and not k.endswith("inv_freq")]
    unexpected = sorted(names - target.keys())
    misshaped = sorted(k for k in names & target.keys() if source.shape(k) != tuple(target[k].shape))
    if missing or unexpected or misshaped:
        raise MmwbCheckpointError(
            f"{directory}: {what} tensors do not fit (missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"mis-shaped {misshaped[:8]})"
        )


def _load_strict(
    module: nn.Module, source: RenamedSource, directory: Path, what: str, tied_ok: tuple[str, ...] = ()
) -> None:
    """Check names and shapes, then copy the checkpoint into ``module`` one tensor at a time (never the whole
    state as one dict beside the model, which was 2x its size in memory)."""
    _check_fit(module, source, directory, what, tied_ok)
    target = module.state_dict()
    with torch.no_grad():
        for name in source.names():
            target[name].copy_(source.get(name))


def _section(raw: dict, key: str, directory: Path) -> dict:
    if not isinstance(raw.get(key), dict):
        raise MmwbCheckpointError(f"{directory}/config.json: no {key} section")
    return raw[key]


def load_kimi(
    path: str | Path, device=None, dtype: torch.dtype | None = None, quantize: Quantization | None = None
) -> VisionLanguageModel:
    """MoonViT + pixel-shuffle projector + DeepSeek-V3 text from a kimi_k25 (any layout) or kimi_vl folder (as
    Moonshot publishes it: ``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.*``). Their remote code
    never runs: the tower and projector are mmwb's own (``mmwb.models.vision.kimi_checkpoint``), the text model
    mmwb's decoder."""
    from mmwb.models.vision.kimi_checkpoint import build_kimi_vision, read_kimi_vision

    directory = Path(path)
    raw = read_config(directory)
    image_token = raw.get("image_token_id", raw.get("media_placeholder_token_id"))
    if image_token is None:
        raise MmwbCheckpointError(
            f"{directory}/config.json: image_token_id (media_placeholder_token_id) is missing"
        )
    vision = read_kimi_vision(directory)  # checks the model type and the vision tensors before the big load
    device = resolve_device(device)
    text = load_text_model(directory, _section(raw, "text_config", directory), device, dtype, quantize)
    tower, projector = build_kimi_vision(vision, device, dtype or text.dtype)
    cfg = VLMConfig(int(image_token), template="plain", source=raw["model_type"])
    return VisionLanguageModel(cfg, tower, projector, text, folder_tokenizer(directory)).eval()


def load_llava(
    path: str | Path, device=None, dtype: torch.dtype | None = None, quantize: Quantization | None = None
) -> VisionLanguageModel:
    """CLIP/SigLIP tower (penultimate layer, CLS dropped) + mlp2x_gelu + text model from a llava folder."""
    from mmwb.models.projectors import MLP2xGelu
    from mmwb.models.vision.hf import HFVisionTower, vision_model_from_config

    directory = Path(path)
    raw = read_config(directory)
    device = resolve_device(device)
    text_config = _section(raw, "text_config", directory)
    text = load_text_model(directory, text_config, device, dtype, quantize)
    dtype = dtype or next(text.parameters()).dtype
    source = TensorSource(directory)

    vision_model = vision_model_from_config(
        _section(raw, "vision_config", directory), f"{directory}/config.json"
    )
    layer = raw.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise MmwbCheckpointError(
            f"{directory}/config.json: vision_feature_layer {layer!r}: features from several layers are not "
            "supported (one layer index)"
        )
    # the published layout (transformers 4) nests the tower's tensors under vision_model.
    tower_prefixes = tuple(
        (f"{root}vision_tower.{inner}", "") for root in ("", "model.") for inner in ("vision_model.", "")
    )
    tower = HFVisionTower(
        vision_model,
        select_layer=layer,
        drop_cls=raw.get("vision_feature_select_strategy", "default") == "default",
    )
    kept = len(tower.model.encoder.layers)
    rename = _prefix_rename(tower_prefixes)
    tower_source = RenamedSource(
        source, lambda name: None if (new := rename(name)) is None or _dropped_layer(new, kept) else new
    )
    _load_strict(tower.model, tower_source, directory, "vision tower")

    projector_prefixes = (("multi_modal_projector.", ""), ("model.multi_modal_projector.", ""))
    projector = MLP2xGelu(vision_model.config.hidden_size, text_config["hidden_size"])
    _load_strict(projector, RenamedSource(source, _prefix_rename(projector_prefixes)), directory, "projector")

    cfg = VLMConfig(int(raw.get("image_token_id", raw.get("image_token_index", 32000))), template="plain")
    cfg.source = "llava"
    model = VisionLanguageModel(cfg, tower, projector, text, folder_tokenizer(directory))
    model.vision_tower.to(device, dtype)
    model.projector.to(device, dtype)
    return model.eval()


def load_instructblip(
    path: str | Path, device=None, dtype: torch.dtype | None = None, quantize: Quantization | None = None
) -> VisionLanguageModel:
    """EVA tower (last layer through its final LayerNorm, CLS kept) + mmwb's Q-Former reading the instruction +
    a decoder-only text model (Vicuna/Llama) from an instructblip folder. The Q-Former's BERT tokenizer is read
    from ``qformer_tokenizer/``, where InstructBLIP's processor saves it."""
    from mmwb.models.projectors.qformer import QFormer, QFormerConfig, name_from_transformers
    from mmwb.models.vision.hf import HFVisionTower, processor_from_file, vision_model_from_config

    directory = Path(path)
    where = f"{directory}/config.json"
    raw = read_config(directory)
    text_config = _section(raw, "text_config", directory)
    _check_decoder_only(text_config, where)
    image_token = raw.get("image_token_index", raw.get("image_token_id"))
    if image_token is None:
        raise MmwbCheckpointError(
            f"{where}: image_token_index is missing (a checkpoint from before InstructBLIP prompts held image "
            "tokens: add the tokenizer's <image> id as image_token_index)"
        )
    text_tokenizer = folder_tokenizer(directory)
    qformer_tokenizer = folder_tokenizer(directory / QFORMER_TOKENIZER_DIR)
    if text_tokenizer is not None and qformer_tokenizer is None:
        raise MmwbCheckpointError(
            f"{directory}: no {QFORMER_TOKENIZER_DIR}/ beside the text tokenizer (InstructBLIP's Q-Former reads the "
            "instruction with a BERT tokenizer of its own)"
        )
    device = resolve_device(device)
    text = load_text_model(directory, text_config, device, dtype, quantize)
    dtype = dtype or next(text.parameters()).dtype
    source = TensorSource(directory)

    vision_model = vision_model_from_config(_section(raw, "vision_config", directory), where)
    processor = processor_from_file(
        directory / "preprocessor_config.json", vision_model.config.model_type, vision_model.config.image_size
    )
    tower = HFVisionTower(vision_model, select_layer=-1, drop_cls=False, final_norm=True, processor=processor)
    prefixes = (("vision_model.", ""), ("model.vision_model.", ""))
    _load_strict(tower.model, RenamedSource(source, _prefix_rename(prefixes)), directory, "vision tower")

    qformer = QFormer(
        QFormerConfig.from_transformers(
            _section(raw, "qformer_config", directory),
            raw.get("num_query_tokens", 32),
            vision_model.config.hidden_size,
            int(text_config["hidden_size"]),
            where,
        )
    )
    _load_strict(qformer, RenamedSource(source, name_from_transformers), directory, "Q-Former")

    cfg = VLMConfig(int(image_token), template="instructblip", source="instructblip")
    model = VisionLanguageModel(cfg, tower, qformer, text, text_tokenizer, qformer_tokenizer)
    model.vision_tower.to(device, dtype)
    model.projector.to(device, dtype)
    return model.eval()


def _check_decoder_only(text_config: dict, where: str) -> None:
    """InstructBLIP-Flan-T5 feeds an encoder-decoder; mmwb's VLMs splice images into a decoder-only prompt."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = text_config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in HF_MODEL_TYPES:
        raise MmwbCheckpointError(
            f"{where}: text model {model_type!r} is not a decoder-only causal LM (InstructBLIP-Flan-T5 is an "
            "encoder-decoder); mmwb runs the Vicuna/Llama variants"
        )


def _dropped_layer(name: str, kept: int) -> bool:
    """Tensors of tower blocks after the chosen feature layer (never run, so never loaded)."""
    parts = name.split(".")
    if "layers" not in parts:
        return False
    return int(parts[parts.index("layers") + 1]) >= kept
