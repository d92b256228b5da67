"""A trained score model as one self-describing folder: ``config.json`` (data, SDE, network) + weights.

The same dataclasses are the sections of ``mmwb train sde``'s YAML config, so what was trained is what is
rebuilt: ``load_trained(folder)`` reads the spec, builds the SDE and the score network and loads the weights
(strictly). A final model folder holds the EMA weights as ``model.safetensors``; a training checkpoint (which
also gets the ``config.json``) holds the engine's ``ema.safetensors`` next to the live weights, and the EMA
ones are preferred there too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmwb.data.io import atomic_write_path, write_json
from mmwb.errors import MmwbCheckpointError, MmwbConfigError
from mmwb.models.sde.networks import ScoreModel, mlp_score_model, unet_score_model
from mmwb.models.sde.sdes import SDE, VESDE, VPSDE, SubVPSDE
from mmwb.runtime.config import from_dict

FORMAT = "mmwb-sde"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"  # the engine's checkpoint name for the EMA (an AveragedModel: "module." keys)
TOY_DIM = 2


@dataclass
class DataSpec:
    """What the model was trained on. ``size``, ``resize`` and ``dequantize`` concern digits only."""

    name: Literal["checkerboard", "8gaussians", "moons", "swissroll", "digits"] = "checkerboard"
    n_train: int = 100_000  # toy sets: points drawn once with the training seed
    size: int = 8  # digits: side of the (upsampled or padded) images
    resize: Literal["nearest", "pad"] = "nearest"
    dequantize: bool = True  # digits: train on uniformly dequantised levels, as bits/dim assumes

    @property
    def is_image(self) -> bool:
        return self.name == "digits"

    def sample_shape(self) -> tuple[int, ...]:
        return (1, self.size, self.size) if self.is_image else (TOY_DIM,)


@dataclass
class SDESpec:
    """score_sde's SDE names and parameters; the unused ones of a type are ignored."""

    type: Literal["vp", "subvp", "ve"] = "vp"
    beta_min: float = 0.1
    beta_max: float = 20.0
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    N: int = 1000


@dataclass
class NetworkSpec:
    """An MLP for 2-D data (``hidden``, ``depth``, ``embed_dim``), a UNet2DModel for images (the rest)."""

    hidden: int = 128
    depth: int = 3
    embed_dim: int = 64
    block_out_channels: tuple[int, ...] = (16, 32)
    layers_per_block: int = 1
    attention: bool = True
    embedding: Literal["fourier", "positional"] | None = None  # None: Fourier for VE, positional otherwise


@dataclass
class ModelSpec:
    data: DataSpec = field(default_factory=DataSpec)
    sde: SDESpec = field(default_factory=SDESpec)
    network: NetworkSpec = field(default_factory=NetworkSpec)


@dataclass
class TrainedSDE:
    """A loaded model: its spec, the SDE, the score model (``score_fn(x, t)``) and where it came from."""

    spec: ModelSpec
    sde: SDE
    model: ScoreModel
    folder: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)  # what training recorded (steps, seed, metrics)


def build_sde(spec: SDESpec) -> SDE:
    if spec.type == "ve":
        return VESDE(spec.sigma_min, spec.sigma_max, spec.N)
    return (VPSDE if spec.type == "vp" else SubVPSDE)(spec.beta_min, spec.beta_max, spec.N)


def build_score_model(spec: ModelSpec, sde: SDE) -> ScoreModel:
    """The untrained score model the spec describes (MLP for 2-D points, UNet for digits)."""
    net = spec.network
    if spec.data.is_image:
        return unet_score_model(
            sde,
            spec.data.size,
            1,
            tuple(net.block_out_channels),
            net.layers_per_block,
            net.attention,
            net.embedding,
        )
    return mlp_score_model(sde, TOY_DIM, net.hidden, net.depth, net.embed_dim, net.embedding)


def save_folder(folder: Path, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``folder``, each atomically; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(folder / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
    write_json(folder / CONFIG_FILE, config)
    return folder


def spec_config(spec: ModelSpec, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` of a model folder: the spec and what training recorded."""
    return {"format": FORMAT, **asdict(spec), "info": info or {}}


def read_spec(folder: Path) -> tuple[ModelSpec, dict[str, Any]]:
    """The spec and the recorded info of a model folder; errors name the folder and what is wrong."""
    path = Path(folder) / CONFIG_FILE
    if not Path(folder).is_dir():
        raise MmwbCheckpointError(f"{folder}: no such model folder")
    if not path.is_file():
        raise MmwbCheckpointError(f"{folder}: not an mmwb SDE model folder (no {CONFIG_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MmwbCheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MmwbCheckpointError(f"{path}: format is not {FORMAT!r}")
    info = data.pop("info", {})
    data.pop("format")
    try:
        return from_dict(ModelSpec, data, source=str(path)), info
    except MmwbConfigError as err:
        raise MmwbCheckpointError(str(err)) from err


def ema_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model's weights from the engine's EMA file (an AveragedModel: ``module.`` keys, ``n_averaged``)."""
    state = read_weights(path)
    return {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}


def load_trained(folder: str | Path, device: torch.device | str = "cpu") -> TrainedSDE:
    """Rebuild the model of ``folder`` (a final model folder or a training checkpoint) in eval mode."""
    folder = Path(folder)
    spec, info = read_spec(folder)
    sde = build_sde(spec.sde)
    model = build_score_model(spec, sde)
    ema, weights = folder / EMA_FILE, folder / WEIGHTS_FILE
    if ema.is_file():
        state = ema_state_dict(ema)
    elif weights.is_file():
        state = read_weights(weights)
    else:
        raise MmwbCheckpointError(f"{folder}: no {WEIGHTS_FILE}")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        raise MmwbCheckpointError(
            f"{folder}: weights do not fit {CONFIG_FILE} ({str(err).splitlines()[-1].strip()})"
        ) from err
    if missing or unexpected:
        culprit = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
        raise MmwbCheckpointError(f"{folder}: weights do not fit {CONFIG_FILE} ({culprit})")
    return TrainedSDE(spec, sde, model.to(device).eval().requires_grad_(False), folder, info)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise MmwbCheckpointError(f"{path}: cannot read safetensors ({err})") from err
