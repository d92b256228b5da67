"""Train the small digit classifier whose features measure digit samples (``pipelines/make_digits_classifier.py``).

It sees scikit-learn's training split only (the same fixed split the score models train on) as grey levels in
``[0, 1]`` at 8x8, on the shared engine; its test-split accuracy is measured after training and recorded in
the model folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mmwb.data.digits import load_digits_tensors
from mmwb.models.sde.digit_metrics import ClassifierSpec, DigitClassifier, save_classifier
from mmwb.runtime import seed_everything
from mmwb.train.config import TrainConfig
from mmwb.train.engine import train


@dataclass
class DigitClassifierConfig:
    spec: ClassifierSpec = field(default_factory=ClassifierSpec)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            out_dir=Path("runs/digits-classifier"), max_steps=1500, batch_size=64, lr=2e-3, weight_decay=1e-4
        )
    )


class LabelledDigits(Dataset):
    def __init__(self, split: str) -> None:
        digits = load_digits_tensors(split)
        self.images, self.labels = digits.images, digits.labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.images[index], "y": self.labels[index]}


def classifier_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


@torch.no_grad()
def test_accuracy(classifier: DigitClassifier) -> float:
    test = LabelledDigits("test")
    classifier.eval()
    return float((classifier(test.images).argmax(-1) == test.labels).float().mean())


def train_digit_classifier(config: DigitClassifierConfig, folder: Path) -> float:
    """Train, save into ``folder`` (config.json + model.safetensors) and return the test accuracy."""
    seed_everything(config.train.seed)
    classifier = DigitClassifier(config.spec)
    result = train(classifier, classifier_loss, LabelledDigits("train"), config.train)
    accuracy = test_accuracy(classifier)
    info = {
        "steps": result.step,
        "seed": config.train.seed,
        "test_accuracy": accuracy,
        "train_split": "train",
    }
    save_classifier(classifier.cpu(), folder, info)
    return accuracy
