"""A digit classifier of noisy inputs, ``p_t(label | x_t)``, saved as a folder beside the score model it guides.

Class-conditional sampling adds ``grad_x log p_t(label | x)`` to an unconditional score (``guidance.py``), so the
classifier must have seen inputs noised by the same SDE, in the same model space (dequantised digits in
``[-1, 1]``), at every time. Its folder records that SDE and data spec; ``check_compatible`` refuses a score
model trained differently instead of guiding it with gradients that mean something else.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmwb.errors import MmwbCheckpointError, MmwbConfigError, MmwbInputError
from mmwb.models.sde.networks import TimeClassifier
from mmwb.models.sde.trained import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    DataSpec,
    SDESpec,
    TrainedSDE,
    read_weights,
    save_folder,
)
from mmwb.runtime.config import from_dict

FORMAT = "mmwb-noisy-digit-classifier"
NUM_CLASSES = 10


@dataclass
class NoisyClassifierSpec:
    """The MLP (``TimeClassifier``) and what its inputs are: the SDE's noise on data of ``data``."""

    hidden: int = 256
    depth: int = 3
    embed_dim: int = 64
    sde: SDESpec = field(default_factory=SDESpec)
    data: DataSpec = field(default_factory=lambda: DataSpec(name="digits"))


def build_noisy_classifier(spec: NoisyClassifierSpec) -> TimeClassifier:
    dim = math.prod(spec.data.sample_shape())
    return TimeClassifier(dim, NUM_CLASSES, spec.hidden, spec.depth, spec.embed_dim)


def save_noisy_classifier(
    classifier: TimeClassifier, spec: NoisyClassifierSpec, folder: Path, info: dict[str, Any]
) -> Path:
    return save_folder(folder, {"format": FORMAT, **asdict(spec), "info": info}, classifier.state_dict())


def load_noisy_classifier(
    folder: str | Path, device: torch.device | str = "cpu"
) -> tuple[TimeClassifier, NoisyClassifierSpec]:
    """The classifier of ``folder`` in eval mode, and its spec; errors name the folder and what is wrong."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise MmwbCheckpointError(f"{folder}: not a noisy digit classifier folder (no {CONFIG_FILE})")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.pop("format", None) != FORMAT:
        raise MmwbCheckpointError(f"{path}: format is not {FORMAT!r}")
    config.pop("info", None)
    try:
        spec = from_dict(NoisyClassifierSpec, config, source=str(path))
    except MmwbConfigError as err:
        raise MmwbCheckpointError(str(err)) from err
    classifier = build_noisy_classifier(spec)
    try:
        classifier.load_state_dict(read_weights(folder / WEIGHTS_FILE))
    except RuntimeError as err:
        raise MmwbCheckpointError(f"{folder}: weights do not fit {CONFIG_FILE}") from err
    return classifier.to(device).eval().requires_grad_(False), spec


def check_compatible(spec: NoisyClassifierSpec, trained: TrainedSDE) -> None:
    """Refuse to guide a score model whose SDE or data space differs from the classifier's."""
    for part in ("sde", "data"):
        mine, theirs = asdict(getattr(spec, part)), asdict(getattr(trained.spec, part))
        differ = sorted(k for k in mine if k != "n_train" and mine[k] != theirs.get(k))
        if differ:
            key = differ[0]
            raise MmwbInputError(
                f"the classifier was trained for {part}.{key}={mine[key]!r} but the score model has "
                f"{part}.{key}={theirs.get(key)!r}: its gradients would not guide this model"
            )
