"""Score-based SDE models from Python: load a trained model folder, sample it, measure and draw the samples.

trained = load_trained(DEFAULT_MODEL)
samples, nfe = generate(trained, 512, "heun", steps=25, generator=make_generator(0))
save_samples_figure(trained, samples, "checkerboard.png")

digits = load_trained(DIGITS_MODEL)
classifier, _ = load_noisy_classifier(DIGITS_NOISY_CLASSIFIER)
threes, nfe = generate(digits, 16, "heun", 24, labels=torch.full((16,), 3), classifier=classifier,
                       guidance_scale=2.0)
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmwb.models.sde import plots
from mmwb.models.sde.data import to_unit_images
from mmwb.models.sde.evaluate import (
    DEFAULT_MODEL,
    DIGITS_CLASSIFIER,
    DIGITS_MODEL,
    DIGITS_NOISY_CLASSIFIER,
    EIGHT_GAUSSIANS_MODEL,
    generate,
    likelihood,
    model_device,
    quality,
    reference_data,
)
from mmwb.models.sde.noisy_classifier import check_compatible, load_noisy_classifier
from mmwb.models.sde.trained import TrainedSDE, load_trained

__all__ = [
    "DEFAULT_MODEL",
    "DIGITS_CLASSIFIER",
    "DIGITS_MODEL",
    "DIGITS_NOISY_CLASSIFIER",
    "EIGHT_GAUSSIANS_MODEL",
    "generate",
    "likelihood",
    "check_compatible",
    "load_noisy_classifier",
    "load_trained",
    "quality",
    "save_samples_figure",
]


def save_samples_figure(
    trained: TrainedSDE,
    samples: torch.Tensor,
    path: str | Path,
    title: str = "",
    seed: int = 0,
    ncols: int | None = None,
) -> Path:
    """A grid of digit samples (``ncols`` wide, default square), or 2-D samples over the data density with the
    score field near the data."""
    if trained.spec.data.is_image:
        return plots.image_grid(to_unit_images(trained.spec.data, samples.cpu()), path, title, ncols)
    return plots.scatter_over_density(
        samples, reference_data(trained, seed), path, title, score_fn=_cpu_score(trained)
    )


def _cpu_score(trained: TrainedSDE):
    device = model_device(trained)
    return lambda x, t: trained.model(x.to(device), t.to(device)).cpu()
