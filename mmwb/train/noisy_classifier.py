"""Train the noisy digit classifier that guides the digits score model (``pipelines/make_noisy_classifier.py``).

Each batch of training digits is dequantised as the score model saw it, noised by the SDE to a uniform random
time in ``[eps, 1]`` and classified with cross-entropy: the classifier then knows ``p_t(label | x_t)`` at every
time a sampler visits. Its test accuracy at a few times is measured after training and recorded in the folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from mmwb.models.sde.data import dataset, digit_labels, to_model_space
from mmwb.models.sde.losses import classifier_loss
from mmwb.models.sde.noisy_classifier import (
    NoisyClassifierSpec,
    build_noisy_classifier,
    save_noisy_classifier,
)
from mmwb.models.sde.sdes import SDE
from mmwb.models.sde.trained import build_sde
from mmwb.runtime import make_generator, seed_everything
from mmwb.train.config import TrainConfig
from mmwb.train.engine import train

EPS = 1e-5  # smallest training time, as in the score model's DSM loss
REPORT_TIMES = (0.0, 0.1, 0.3, 0.5, 0.8)  # test accuracy recorded at these times


@dataclass
class NoisyClassifierConfig:
    spec: NoisyClassifierSpec = field(default_factory=NoisyClassifierSpec)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            out_dir=Path("runs/digits-noisy-classifier"),
            max_steps=4000,
            batch_size=128,
            lr=2e-3,
            weight_decay=1e-4,
            schedule="cosine",
        )
    )


class LabelledLevels(Dataset):
    """Digit levels (as the score model's data) with their labels."""

    def __init__(self, spec: NoisyClassifierSpec, split: str) -> None:
        self.levels, self.labels = dataset(spec.data, split), digit_labels(split)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.levels[index], "y": self.labels[index]}


def loss_fn(spec: NoisyClassifierSpec, sde: SDE):
    """``loss(model, batch)``: cross-entropy on the batch, dequantised afresh and noised to random times."""

    def compute(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return classifier_loss(sde, model, to_model_space(spec.data, batch["x"]), batch["y"], eps=EPS)

    return compute


@torch.no_grad()
def noisy_accuracy(
    classifier: nn.Module, spec: NoisyClassifierSpec, times: Sequence[float], seed: int = 0
) -> dict[str, float]:
    """Test-split accuracy on digits noised to each time (``t = 0``: clean, dequantised), keyed ``"t=..."``;
    each time draws its own noise from ``seed``."""
    sde, test = build_sde(spec.sde), LabelledLevels(spec, "test")
    accuracy = {}
    for t in times:
        generator = make_generator(seed)
        x0 = to_model_space(spec.data, test.levels, generator)
        at = torch.full((x0.shape[0],), max(t, EPS))
        logits = classifier(sde.perturb(x0, at, torch.randn(x0.shape, generator=generator)), at)
        accuracy[f"t={t:g}"] = float((logits.argmax(-1) == test.labels).float().mean())
    return accuracy


def train_noisy_classifier(config: NoisyClassifierConfig, folder: Path) -> dict[str, float]:
    """Train, save into ``folder`` and return the test accuracy at ``REPORT_TIMES``."""
    seed_everything(config.train.seed)
    spec = config.spec
    classifier = build_noisy_classifier(spec)
    result = train(
        classifier, loss_fn(spec, build_sde(spec.sde)), LabelledLevels(spec, "train"), config.train
    )
    classifier.eval()
    accuracy = noisy_accuracy(classifier, spec, REPORT_TIMES)
    info = {
        "steps": result.step,
        "seed": config.train.seed,
        "test_accuracy": accuracy,
        "train_split": "train",
    }
    save_noisy_classifier(classifier.cpu(), spec, folder, info)
    return accuracy
