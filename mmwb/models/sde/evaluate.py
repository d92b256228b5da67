"""What one does with a trained score model: sample it, measure its samples, compute its test likelihood.

The shipped models live under ``assets/models``: checkerboard, 8-gaussians and digits score models, the
digit classifier whose features measure digit samples, and the noisy digit classifier that guides sampling
towards a class.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from mmwb.data.digits import NUM_LEVELS, VALUE_RANGES, load_digits_tensors
from mmwb.errors import MmwbInputError
from mmwb.models.sde.data import (
    VALUE_RANGE,
    dataset,
    density_metrics,
    log_prob,
    to_model_space,
    to_unit_images,
)
from mmwb.models.sde.digit_metrics import DigitClassifier, digit_quality, load_classifier
from mmwb.models.sde.guidance import Classifier, classifier_guided_score
from mmwb.models.sde.likelihood import bits_per_dim, probability_flow_likelihood
from mmwb.models.sde.metrics import sliced_wasserstein
from mmwb.models.sde.samplers import SampleOutput, sample
from mmwb.models.sde.trained import TrainedSDE
from mmwb.runtime import make_generator
from mmwb.runtime.resources import shipped_model

DEFAULT_MODEL = shipped_model("sde-checkerboard")
EIGHT_GAUSSIANS_MODEL = shipped_model("sde-8gaussians")
DIGITS_MODEL = shipped_model("sde-digits")
DIGITS_CLASSIFIER = shipped_model("digits-classifier")
DIGITS_NOISY_CLASSIFIER = shipped_model("digits-noisy-classifier")  # guides sde-digits towards a class
LIKELIHOOD_EPS = 1e-5  # score_sde's eps for likelihoods (sampling stops at the SDE's own eps)
TOY_REFERENCE_POINTS = 10_000  # test points the sliced Wasserstein distance compares samples with
SW_PROJECTIONS = 512


def model_device(trained: TrainedSDE) -> torch.device:
    return next(trained.model.parameters()).device


def generate(
    trained: TrainedSDE,
    n: int,
    sampler: str = "pc",
    steps: int | None = None,
    generator: torch.Generator | None = None,
    *,
    labels: torch.Tensor | None = None,
    classifier: Classifier | None = None,
    guidance_scale: float = 1.0,
    disable: bool = False,
    **options: Any,
) -> SampleOutput:
    """``n`` samples in model space (points, or images in ``[-1, 1]``) and the NFE; options go to the sampler.

    With ``labels`` ``(n,)`` each sample is guided towards its class by ``classifier(x_t, t) -> logits`` (a
    noisy classifier of the same SDE), its log-probability gradient scaled by ``guidance_scale``.
    """
    if n < 1:
        raise MmwbInputError(f"the number of samples must be >= 1, got {n}")
    shape = (n, *trained.spec.data.sample_shape())
    score_fn: Any = trained.model
    if labels is not None:
        if classifier is None or labels.shape != (n,):
            raise MmwbInputError(
                f"guided sampling needs a classifier and {n} labels, got {tuple(labels.shape)}"
            )
        score_fn = classifier_guided_score(score_fn, classifier, labels, guidance_scale)
    with torch.no_grad():
        return sample(
            trained.sde,
            score_fn,
            shape,
            sampler,
            steps,
            generator,
            device=model_device(trained),
            disable=disable,
            **options,
        )


def reference_data(trained: TrainedSDE, seed: int = 0) -> torch.Tensor:
    """What samples are compared with: toy test points ``(10000, 2)``, or the digits test split ``(N, 1, 8, 8)``
    in ``[0, 1]``."""
    if trained.spec.data.is_image:
        return load_digits_tensors("test").images
    return dataset(trained.spec.data, "test", seed, TOY_REFERENCE_POINTS)


def quality(
    trained: TrainedSDE,
    samples: torch.Tensor,
    seed: int = 0,
    classifier: DigitClassifier | None = None,
    labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """Toy data: sliced Wasserstein-2 distance to test points, and the samples' score under the exact density
    where it is known. Digits: Fréchet distance and confidence of the digit classifier (the shipped one unless
    given), and its accuracy against ``labels`` for class-conditional samples."""
    reference = reference_data(trained, seed)
    if trained.spec.data.is_image:
        classifier = classifier if classifier is not None else load_classifier(DIGITS_CLASSIFIER)
        unit = to_unit_images(trained.spec.data, samples.cpu())
        return digit_quality(classifier, unit, reference, labels)
    sw = sliced_wasserstein(
        samples.cpu().double(), reference.double(), SW_PROJECTIONS, generator=make_generator(seed)
    )
    return {"sliced_wasserstein": float(sw), **density_metrics(trained.spec.data, samples.cpu())}


def likelihood(
    trained: TrainedSDE,
    n: int | None = None,
    seed: int = 0,
    *,
    exact_divergence: bool | None = None,
    solver: str = "scipy",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    disable: bool = False,
) -> dict[str, Any]:
    """Test-set likelihood through the probability-flow ODE, as one summary dict.

    Digits: bits/dim of the uniformly dequantised 17-level images (per dimension of the model's images).
    Toy data: NLL in nats per point (exact divergence by default, it is 2-D), and the data's own NLL (its
    entropy estimate) where the density is known. ``n`` caps the test set (toy default: 2000 points).
    """
    spec = trained.spec.data
    generator = make_generator(seed)
    if spec.is_image:
        levels = dataset(dataclasses.replace(spec, dequantize=True), "test", seed, n)
        x = to_model_space(dataclasses.replace(spec, dequantize=True), levels, generator)
    else:
        x = dataset(spec, "test", seed, n if n is not None else 2000)
    exact = (not spec.is_image) if exact_divergence is None else exact_divergence
    out = probability_flow_likelihood(
        trained.sde,
        trained.model,
        x.to(model_device(trained)),
        exact,
        eps=LIKELIHOOD_EPS,
        solver=solver,
        rtol=rtol,
        atol=atol,
        generator=make_generator(seed + 1, model_device(trained)),
        disable=disable,
    )
    logp = out.logp.double().cpu()
    result: dict[str, Any] = {"n": x.shape[0], "nfe": out.nfe, "exact_divergence": exact}
    if spec.is_image:
        dim = x[0].numel()
        bpd = bits_per_dim(logp, dim, NUM_LEVELS, VALUE_RANGES[VALUE_RANGE])
        return result | {"bits_per_dim": float(bpd.mean()), "bits_per_dim_sem": _sem(bpd)}
    result |= {"nll": float(-logp.mean()), "nll_sem": _sem(logp)}
    data_logp = log_prob(spec, x)
    if data_logp is not None:
        result["data_nll"] = float(-data_logp.double().mean())
    return result


def _sem(values: torch.Tensor) -> float:
    """Standard error of the mean."""
    return float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else float("nan")
