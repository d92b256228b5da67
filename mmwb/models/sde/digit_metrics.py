"""Sample quality for digits: a small classifier's accuracy on samples and the Fréchet distance in its features.

This is FID's recipe (Heusel et al. 2017) with a feature extractor that fits 8x8 digits: a two-conv CNN
trained on scikit-learn's training split. Its 64-d penultimate activations are the feature space; the
reference statistics come from the real test split. With a few hundred samples the distance carries a
positive bias, so compare figures only at the same sample count.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import nn

from mmwb.errors import MmwbCheckpointError
from mmwb.models.sde.trained import CONFIG_FILE, WEIGHTS_FILE, read_weights, save_folder

FORMAT = "mmwb-digit-classifier"
NUM_CLASSES = 10
COV_JITTER = 1e-6  # added to both covariances, as pytorch-fid does when the product is singular


@dataclass
class ClassifierSpec:
    channels: tuple[int, int] = (32, 64)
    features: int = 64


class DigitClassifier(nn.Module):
    """``(B, 1, 8, 8)`` grey levels in ``[0, 1]`` -> logits ``(B, 10)``; ``features`` gives the 64-d layer."""

    def __init__(self, spec: ClassifierSpec | None = None):
        super().__init__()
        self.spec = spec = spec or ClassifierSpec()
        c1, c2 = spec.channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, c2, 4, 4)
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(c2 * 16, spec.features),
            nn.ReLU(),
        )
        self.head = nn.Linear(spec.features, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def save_classifier(classifier: DigitClassifier, folder: Path, info: dict) -> Path:
    return save_folder(
        folder, {"format": FORMAT, **asdict(classifier.spec), "info": info}, classifier.state_dict()
    )


def load_classifier(folder: str | Path, device: torch.device | str = "cpu") -> DigitClassifier:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise MmwbCheckpointError(f"{folder}: not a digit classifier folder (no {CONFIG_FILE})")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise MmwbCheckpointError(f"{path}: format is not {FORMAT!r}")
    classifier = DigitClassifier(ClassifierSpec(tuple(config["channels"]), config["features"]))
    try:
        classifier.load_state_dict(read_weights(folder / WEIGHTS_FILE))
    except RuntimeError as err:
        raise MmwbCheckpointError(f"{folder}: weights do not fit {CONFIG_FILE}") from err
    return classifier.to(device).eval().requires_grad_(False)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between two feature sets ``(N, D)``, ``(M, D)``."""
    a64, b64 = a.double().cpu().numpy(), b.double().cpu().numpy()
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    jitter = COV_JITTER * np.eye(a64.shape[1])  # ReLU features can be constant: keep the product invertible
    cov_a, cov_b = np.cov(a64, rowvar=False) + jitter, np.cov(b64, rowvar=False) + jitter
    root = linalg.sqrtm(cov_a @ cov_b)
    root = root.real  # round-off leaves a tiny imaginary part
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


@torch.no_grad()
def digit_quality(
    classifier: DigitClassifier,
    samples: torch.Tensor,
    reference: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """Fréchet distance of ``samples`` to ``reference`` (both ``(N, 1, 8, 8)`` in ``[0, 1]``) in the classifier's
    features, the classifier's mean confidence in its own prediction (a sharp digit scores near 1) and, for
    samples drawn for ``labels`` ``(N,)``, the share it reads as their label."""
    device = next(classifier.parameters()).device
    feats = classifier.features(samples.to(device).float())
    ref_feats = classifier.features(reference.to(device).float())
    probs = classifier.head(feats).softmax(-1)
    result = {"fd": frechet_distance(feats, ref_feats), "confidence": float(probs.max(-1).values.mean())}
    if labels is not None:
        result["accuracy"] = float((probs.argmax(-1).cpu() == labels.cpu()).float().mean())
    return result
