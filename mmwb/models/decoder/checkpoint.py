"""Checkpoint import (transformers deepseek_v3 / kimi_k2 / qwen3_moe / mixtral) and mmwb's own format.

Loading builds the model on the meta device, plans for every parameter which checkpoint tensors make it (a rename,
a stack of per-expert matrices, a row permutation), checks names and shapes of the whole plan before reading any
data, then reads tensors one at a time from the safetensors shards (plain file reads, see ``_Shard``) and assigns
them, so a checkpoint is never held twice in memory; asked to quantize, it quantizes each layer as it reads it.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from mmwb.errors import MmwbCheckpointError
from mmwb.models.decoder.config import DecoderConfig
from mmwb.models.decoder.embedding import TokenEmbedding
from mmwb.models.decoder.model import DecoderForCausalLM
from mmwb.models.decoder.moe import Experts
from mmwb.models.decoder.save import INDEX_NAME, MODEL_TYPE, WEIGHTS_NAME
from mmwb.models.loading import read_config
from mmwb.runtime import resolve_device
from mmwb.runtime.memory import return_freed_memory

# mmwb.models.quantize imports the decoder package, so its functions are imported late below
if TYPE_CHECKING:
    from mmwb.models.quantize import Quantization

HF_MODEL_TYPES = ("deepseek_v3", "kimi_k2", "qwen3_moe", "mixtral")
FP32_BUFFERS = ("e_score_correction_bias",)  # selection bias stays fp32 whatever the model dtype
MAX_NAMES = 8  # tensor names listed per error category


class TensorSource:
    """Lazy view over a folder's safetensors shards (single file or sharded with an index)."""

    def __init__(self, directory: Path) -> None:
        index = directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise MmwbCheckpointError(f"{index}: not a safetensors index ({err})") from err
            self.shard_of = {name: directory / shard for name, shard in weight_map.items()}
        elif (directory / WEIGHTS_NAME).is_file():
            with _open_shard(directory / WEIGHTS_NAME) as f:
                self.shard_of = {name: directory / WEIGHTS_NAME for name in f.keys()}  # noqa: SIM118
        else:
            raise MmwbCheckpointError(f"{directory}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")
        missing_shards = sorted({str(p.name) for p in self.shard_of.values() if not p.is_file()})
        if missing_shards:
            raise MmwbCheckpointError(f"{directory}: index names missing shard files {missing_shards}")
        self._shards: dict[Path, _Shard] = {}

    def _shard(self, name: str) -> _Shard:
        path = self.shard_of[name]
        if path not in self._shards:
            self._shards[path] = _Shard(path)
        return self._shards[path]

    def names(self) -> set[str]:
        return set(self.shard_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shard(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._shard(name).dtype(name)

    def get(self, name: str) -> torch.Tensor:
        return self._shard(name).read(name)

    def get_row(self, name: str, index: int) -> torch.Tensor:
        """``get(name)[index]`` without reading the rest of the tensor."""
        return self._shard(name).read(name, index, index + 1)[0]

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """``get(name)[start:stop]`` without reading the rest of the tensor."""
        return self._shard(name).read(name, start, stop)


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_MAX_READ = 1 << 30  # bytes per read call (Linux returns at most ~2 GiB per call anyway)


class _Shard:
    """One safetensors file, its tensors read with plain file reads into fresh tensors. Not memory-mapped: pages
    read through a mapping stay resident in this process while it is open, so reading a 30 GB checkpoint that way
    shows 30 GB of RSS; read like this they are page cache, which the system reclaims."""

    def __init__(self, path: Path) -> None:
        with _open_shard(path) as handle:  # safetensors' own checks of the header, with its error messages
            del handle
        self.path = path
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self.data_start = 8 + length

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        stored = self.entries[name]["dtype"]
        if stored not in _DTYPES:
            raise MmwbCheckpointError(f"{self.path}: {name} has dtype {stored}, which mmwb does not read")
        return _DTYPES[stored]

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor ``name``, or its rows ``start:stop`` along the first axis."""
        dtype, shape = self.dtype(name), list(self.shape(name))
        begin, end = self.entries[name]["data_offsets"]
        if start is not None:
            rows = shape[0] if shape else 0
            asked, stop = f"{start}:{stop}", rows if stop is None else min(stop, rows)
            if not 0 <= start < stop:
                raise MmwbCheckpointError(f"{self.path}: {name} {tuple(shape)} has no rows {asked}")
            size = (end - begin) // shape[0]
            begin, end, shape = begin + start * size, begin + stop * size, [stop - start, *shape[1:]]
        out = torch.empty(shape, dtype=dtype)
        target = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        with open(self.path, "rb", buffering=0) as file:  # one open a read: no handle outlives it
            file.seek(self.data_start + begin)
            while done < end - begin:
                got = file.readinto(target[done : min(end - begin, done + _MAX_READ)])
                if not got:  # the header was fine, the data is cut short
                    raise MmwbCheckpointError(
                        f"{self.path}: cannot read {name} (the file ends {end - begin - done} bytes early)"
                    )
                done += got
        return out


def _open_shard(path: Path):
    """``safe_open`` with a truncated or foreign file named in one MmwbCheckpointError."""
    try:
        return safe_open(path, "pt")
    except SafetensorError as err:
        raise MmwbCheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def _first(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


@dataclass
class Recipe:
    """How one model tensor is made: the checkpoint tensors it needs, their expected shapes, and the combine.
    A stack of experts (``experts`` > 0) lists its sources expert by expert, in equal runs that ``combine_one``
    turns into one expert's slice, so a loader that quantizes can read and convert one expert at a time."""

    sources: list[str]
    shapes: list[tuple[int, ...]]
    combine: Callable[[list[torch.Tensor]], torch.Tensor] = _first
    experts: int = 0
    combine_one: Callable[[list[torch.Tensor]], torch.Tensor] = _first

    def expert(self, j: int, source: TensorSource) -> torch.Tensor:
        """Expert j's slice of the stacked tensor, read alone."""
        if not self.experts:  # stored stacked: one row of the checkpoint tensor
            return source.get_row(self.sources[0], j)
        run = len(self.sources) // self.experts
        return self.combine_one([source.get(s) for s in self.sources[j * run : (j + 1) * run]])


# --- name plans ---


def _identity(name: str, shape: tuple[int, ...]) -> Recipe:
    return Recipe([name], [shape])


_EXPERTS = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_ROPE_ROWS = re.compile(r"self_attn\.(q_proj|q_b_proj|kv_a_proj_with_mqa)\.(weight|bias)$")
_MIXTRAL_EXPERT = {"gate": "w1", "up": "w3", "down": "w2"}


def hf_recipe(model_type: str, hf_config: dict, cfg: DecoderConfig) -> Callable[[str, tuple, set], Recipe]:
    """Plan for transformers checkpoints: per-expert matrices stacked, Mixtral names, DeepSeek rope layout."""
    mixtral = model_type == "mixtral"
    deinterleave = model_type in ("deepseek_v3", "kimi_k2") and hf_config.get("rope_interleave", True)

    def expert_name(layer: str, j: int, kind: str) -> str:
        if mixtral:
            return f"{layer}.block_sparse_moe.experts.{j}.{_MIXTRAL_EXPERT[kind]}.weight"
        return f"{layer}.mlp.experts.{j}.{kind}_proj.weight"

    def recipe(name: str, shape: tuple[int, ...], available: set[str]) -> Recipe:
        # Mixtral files say block_sparse_moe where the model says mlp (unless already converted).
        source = name.replace(".mlp.", ".block_sparse_moe.") if mixtral and name not in available else name
        match = _EXPERTS.match(name)
        if match and source not in available:  # per-expert matrices, as transformers saves them
            layer, kind = match.groups()
            return _stacked_experts(
                shape, lambda j, part: expert_name(layer, j, part), kind == "gate_up_proj"
            )
        plan = _identity(source, shape)
        if deinterleave and _ROPE_ROWS.search(name):
            plan.combine = _rope_row_permutation(name, cfg)
        return plan

    return recipe


def _stacked_experts(shape: tuple[int, ...], name_of: Callable[[int, str], str], gate_up: bool) -> Recipe:
    """(E, 2I, C) from E gate and E up matrices (I, C), or (E, C, I) from E down matrices."""
    experts = shape[0]
    if not gate_up:
        names = [name_of(j, "down") for j in range(experts)]
        return Recipe(names, [shape[1:]] * experts, torch.stack, experts)
    names = [name_of(j, part) for j in range(experts) for part in ("gate", "up")]

    def combine(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.cat(tensors[i : i + 2]) for i in range(0, len(tensors), 2)])

    return Recipe(names, [(shape[1] // 2, shape[2])] * (2 * experts), combine, experts, torch.cat)


def _rope_row_permutation(name: str, cfg: DecoderConfig) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """DeepSeek rotates interleaved pairs (x0, x1), (x2, x3)...; mmwb rotates halves. Reordering the rope rows of
    the projection (evens first, then odds) makes the half-split rotation give bit-identical q/k."""
    rope, nope = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim
    order = torch.cat((torch.arange(0, rope, 2), torch.arange(1, rope, 2)))
    per_head = "kv_a_proj_with_mqa" not in name

    def permute(tensors: list[torch.Tensor]) -> torch.Tensor:
        w = tensors[0]
        if per_head:  # (H * (dn + dr), ...): rope rows are the last dr of every head
            blocks = w.view(cfg.num_heads, nope + rope, *w.shape[1:])
            return torch.cat((blocks[:, :nope], blocks[:, nope:][:, order]), dim=1).reshape(w.shape)
        return torch.cat((w[: cfg.kv_lora_rank], w[cfg.kv_lora_rank :][order]))  # (r + dr, ...)

    return permute


def ignorable_hf_tensor(name: str, cfg: DecoderConfig) -> bool:
    """Checkpoint tensors with no counterpart on purpose: DeepSeek's multi-token-prediction layers, rope caches, a
    selection bias the config's routing does not use."""
    layer = re.match(r"^model\.layers\.(\d+)\.", name)
    return (
        (layer is not None and int(layer.group(1)) >= cfg.num_layers)
        or name.endswith("rotary_emb.inv_freq")
        # topk_method greedy selects without the bias; transformers' class (which knows no greedy) saves one
        or (name.endswith("e_score_correction_bias") and not cfg.expert_bias)
    )


# --- loading ---


def load_decoder(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    quantize: Quantization | None = None,
) -> DecoderForCausalLM:
    """Build a DecoderForCausalLM from an mmwb or transformers checkpoint folder (``quantize``: see
    assemble_decoder)."""
    directory = Path(path)
    raw = read_config(directory)
    model_type = raw.get("model_type")
    if model_type == MODEL_TYPE and "quantization" in raw:
        return _load_quantized(directory, DecoderConfig.from_dict(raw["decoder"]), raw["quantization"])
    if model_type == MODEL_TYPE:
        cfg = DecoderConfig.from_dict(raw["decoder"])
        recipe_for = lambda name, shape, available: _identity(name, shape)  # noqa: E731
        ignorable: Callable[[str], bool] = lambda name: False  # noqa: E731
    elif model_type in HF_MODEL_TYPES:
        cfg = DecoderConfig.from_hf_config(raw)
        recipe_for = hf_recipe(model_type, raw, cfg)
        ignorable = lambda name: ignorable_hf_tensor(name, cfg)  # noqa: E731
    else:
        raise MmwbCheckpointError(f"{directory}/config.json: model_type {model_type!r} is not a decoder type")
    source = TensorSource(directory)
    return assemble_decoder(cfg, source, recipe_for, ignorable, device, dtype, directory, quantize)


def _load_quantized(directory: Path, cfg: DecoderConfig, settings: dict) -> DecoderForCausalLM:
    """An exported int8/int4 decoder folder (sharded or not): empty quantized layers in the model's places, then
    each module's stored tensors read into it (strict), on the CPU where the kernels run; nothing is quantized
    again and nothing is held twice."""
    from mmwb.models.quantize import QuantizedLinear, quantize_model

    with torch.device("meta"):
        model = quantize_model(DecoderForCausalLM(cfg), **settings, empty=True)
    model.to_empty(device="cpu")
    tied = cfg.tie_word_embeddings and not isinstance(model.lm_head, QuantizedLinear)
    load_streamed(model, TensorSource(directory), directory, tied=("lm_head.weight",) if tied else ())
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope(torch.device("cpu"))
    return model.eval()


def load_streamed(
    model: nn.Module, source: TensorSource, directory: Path, tied: tuple[str, ...] = ()
) -> None:
    """Every tensor of ``source`` into ``model`` (strict: names and shapes must fit), module by module, each
    module's own tensors read just before it loads them. Unlike safetensors' load_model (the whole file read
    first, then a full state dict of the model made to compare against), memory stays at the model's own size.
    ``tied``: parameters that may be absent because they share another's storage."""
    owners: dict[str, list[str]] = {}
    for name in source.names():
        owners.setdefault(name.rpartition(".")[0], []).append(name)
    missing: list[str] = []
    unexpected: list[str] = []
    errors: list[str] = []
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        local = {name: source.get(name) for name in owners.pop(path, [])}
        module._load_from_state_dict(local, prefix, {}, True, missing, unexpected, errors)
    unexpected += [name for names in owners.values() for name in names]
    _raise_misfit(directory, [name for name in missing if name not in tied], unexpected, errors)


def assemble_decoder(
    cfg: DecoderConfig,
    source: TensorSource,
    recipe_for: Callable,
    ignorable: Callable[[str], bool],
    device,
    dtype: torch.dtype | None,
    directory: Path,
    quantize: Quantization | None = None,
) -> DecoderForCausalLM:
    """The model built on the meta device, then filled tensor by tensor from ``source``. With ``quantize``, every
    layer ``quantize_model`` would replace is made quantized as it is read (an expert stack one expert at a
    time), so the float model never exists: peak memory is the result plus about one float tensor."""
    from mmwb.models.quantize import check_request, check_shapes, quantization_targets, replace_module

    device = resolve_device(device)  # None: $MMWB_DEVICE or the best available, as everywhere in mmwb
    with torch.device("meta"):
        model = DecoderForCausalLM(cfg)
    meta_state = model.state_dict()  # meta tensors, with the strides of the decoder's CPU layout
    expected = {name: tuple(t.shape) for name, t in meta_state.items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    available = source.names()
    plan = {name: recipe_for(name, shape, available) for name, shape in expected.items()}
    _check_plan(plan, source, ignorable, cfg, directory)
    targets = {}
    if quantize is not None:
        check_request(quantize.mode, quantize.group_size, device)
        targets = quantization_targets(model)
        check_shapes(targets, quantize.mode, quantize.group_size)
    dtype = dtype or source.dtype(plan["model.embed_tokens.weight"].sources[0])
    state = {}
    for name, recipe in plan.items():
        if name.rpartition(".")[0] in targets:
            continue  # read below, straight into its quantized form
        tensor = recipe.combine([source.get(s) for s in recipe.sources])  # a fresh (aligned) tensor
        wanted = torch.float32 if name.endswith(FP32_BUFFERS) else dtype
        layout = meta_state[name].stride() if device.type == "cpu" else tensor.contiguous().stride()
        if (tensor.dtype, tensor.device, tensor.stride()) == (wanted, device, layout):
            state[name] = (
                tensor  # as it is: a copy would hold the tensor twice for a moment (the embeddings: GBs)
            )
            continue
        # on CPU the copy takes the decoder's decode layout (see use_decode_layout)
        target = torch.empty_like(
            meta_state[name],
            device=device,
            dtype=wanted,
            memory_format=torch.preserve_format if device.type == "cpu" else torch.contiguous_format,
        )
        state[name] = target.copy_(tensor)
        del tensor
        return_freed_memory()  # the read tensor, so that such copies do not add up in the heap
    if cfg.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=not targets, assign=True)
    if cfg.tie_word_embeddings and "lm_head" not in targets:
        model.lm_head.weight = model.model.embed_tokens.weight
    for name in list(targets):
        layer = _read_quantized(name, targets.pop(name), plan, source, dtype, quantize)
        replace_module(model, name, layer)
        return_freed_memory()  # the float tensors just read, so that they do not add up
    model.reset_rope(device)
    return model.eval()


def _read_quantized(
    name: str,
    module: nn.Module,
    plan: dict[str, Recipe],
    source: TensorSource,
    dtype: torch.dtype,
    quantize: Quantization,
) -> nn.Module:
    """One layer of ``quantization_targets`` read from ``source`` and quantized (rounded from the weights as the
    float model in ``dtype`` would hold them, so the result equals loading, then ``quantize_model``)."""
    from mmwb.models.quantize import QuantizedEmbedding, QuantizedExperts, QuantizedLinear

    settings = (quantize.mode, quantize.group_size)
    if isinstance(module, Experts):
        gate_up, down = plan[f"{name}.gate_up_proj"], plan[f"{name}.down_proj"]

        def expert(j: int) -> tuple[torch.Tensor, torch.Tensor]:
            return gate_up.expert(j, source).to(dtype), down.expert(j, source).to(dtype)

        return QuantizedExperts.from_weights(module.gate_up_proj.shape[0], expert, *settings)
    tied = name == "lm_head" and f"{name}.weight" not in plan  # quantized from the token table's rows
    recipe = plan["model.embed_tokens.weight" if tied else f"{name}.weight"]
    if recipe.combine is _first:  # stored as it is: read a few rows at a time (the LM head, the table: GBs)
        weight = _Rows(source, recipe.sources[0], recipe.shapes[0], dtype)
    else:
        weight = recipe.combine([source.get(s) for s in recipe.sources]).to(dtype)
    if isinstance(module, TokenEmbedding):
        return QuantizedEmbedding.from_float(weight, dtype)
    bias = plan.get(f"{name}.bias")
    bias = None if bias is None else bias.combine([source.get(s) for s in bias.sources]).to(dtype)
    return QuantizedLinear.from_float(weight, bias, *settings)


class _Rows:
    """A checkpoint matrix that hands out row ranges (``rows[a:b]``, in ``dtype``), each read when asked for:
    what ``QuantizedLinear.from_float`` needs to quantize a weight it never holds whole."""

    def __init__(self, source: TensorSource, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.source, self.name, self.shape, self.dtype = source, name, torch.Size(shape), dtype

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.source.get_rows(self.name, rows.start or 0, rows.stop).to(self.dtype)


def _check_plan(
    plan: dict[str, Recipe], source: TensorSource, ignorable: Callable, cfg: DecoderConfig, directory: Path
) -> None:
    """One error listing every missing, unexpected and mis-shaped checkpoint tensor by name."""
    available = source.names()
    used = {s for recipe in plan.values() for s in recipe.sources}
    missing = sorted(used - available)
    unexpected = sorted(n for n in available - used if not ignorable(n))
    if cfg.tie_word_embeddings:
        unexpected = [n for n in unexpected if n != "lm_head.weight"]
    misshaped = [
        f"{s} {source.shape(s)} (expected {shape})"
        for recipe in plan.values()
        for s, shape in zip(recipe.sources, recipe.shapes)
        if s in available and source.shape(s) != tuple(shape)
    ]
    _raise_misfit(directory, missing, unexpected, misshaped)


def _raise_misfit(directory: Path, missing: list[str], unexpected: list[str], misshaped: list[str]) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor by name (a few of each), if any."""
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:MAX_NAMES])}{' ...' if len(items) > MAX_NAMES else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if items
    ]
    if problems:
        raise MmwbCheckpointError(f"{directory}: checkpoint does not fit the model: " + "; ".join(problems))
