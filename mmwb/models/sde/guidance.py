"""Controllable generation with an unconditional score model (Song et al. 2021, sec. 5 and app. I).

Inpainting and colourisation observe ``y = A x`` for a linear ``A`` with orthonormal rows (a pixel mask; the
grey direction ``(1, 1, 1) / sqrt(3)`` of each pixel). After every predictor and corrector update the
observed part of ``x`` is replaced by ``y`` perturbed to the current time, ``scale y + std n``, so the free part
is sampled around it; at the end ``y`` itself is put back. This replacement is the paper's approximation of
the conditional score, not exact conditional sampling. Class-conditional sampling adds the gradient of a
noise-conditioned classifier to the score (``grad log p(x | c) = grad log p(x) + grad log p(c | x)``) and
works with every sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mmwb.errors import MmwbInputError
from mmwb.models.sde.samplers import SampleOutput, sample
from mmwb.models.sde.sdes import SDE, ScoreFn

LinearMap = Callable[[torch.Tensor], torch.Tensor]
Classifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t) -> logits (B, classes)


def replacement_constraint(sde: SDE, y: torch.Tensor, observe: LinearMap, adjoint: LinearMap):
    """``x <- x + A^T (y_t - A x)`` with ``y_t = scale(t) y + std(t) n``: the observed part set to noisy ``y``."""

    def constraint(x: torch.Tensor, t: float, generator: torch.Generator | None) -> torch.Tensor:
        tt = torch.full((y.shape[0],), t, device=y.device, dtype=y.dtype)
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        return x + adjoint(sde.perturb(y, tt, noise) - observe(x))

    return constraint


def conditional_sample(
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    y: torch.Tensor,
    observe: LinearMap,
    adjoint: LinearMap,
    sampler: str = "pc",
    steps: int | None = None,
    generator: torch.Generator | None = None,
    **options,
) -> SampleOutput:
    """Sample ``x`` of ``shape`` with ``A x = y`` by replacement; any predictor-corrector family sampler."""
    constraint = replacement_constraint(sde, y, observe, adjoint)
    x, nfe = sample(
        sde,
        score_fn,
        shape,
        sampler,
        steps,
        generator,
        device=y.device,
        dtype=y.dtype,
        constraint=constraint,
        **options,
    )
    return SampleOutput(x + adjoint(y - observe(x)), nfe)


def inpaint(
    sde: SDE,
    score_fn: ScoreFn,
    data: torch.Tensor,
    mask: torch.Tensor,
    sampler: str = "pc",
    steps: int | None = None,
    generator: torch.Generator | None = None,
    **options,
) -> SampleOutput:
    """Fill the entries of ``data`` where ``mask`` is 0; keep those where it is 1 (``mask`` broadcasts)."""
    mask = mask.to(data.dtype)
    if ((mask != 0) & (mask != 1)).any():
        raise MmwbInputError("inpaint: mask must hold only 0 (generate) and 1 (keep)")

    def project(v: torch.Tensor) -> torch.Tensor:
        return v * mask

    return conditional_sample(
        sde, score_fn, data.shape, data * mask, project, project, sampler, steps, generator, **options
    )


def colourise(
    sde: SDE,
    score_fn: ScoreFn,
    gray: torch.Tensor,
    sampler: str = "pc",
    steps: int | None = None,
    generator: torch.Generator | None = None,
    **options,
) -> SampleOutput:
    """Colour images ``(B, 3, ...)`` whose channel mean is ``gray`` ``(B, 1, ...)``.

    The grey value is the projection on ``(1, 1, 1) / sqrt(3)``, one orthonormal row per pixel, so the other
    two colour directions are free (the decoupling of Song et al. 2021, app. I.3).
    """
    if gray.ndim < 2 or gray.shape[1] != 1:
        raise MmwbInputError(f"colourise: gray must have shape (B, 1, ...), got {tuple(gray.shape)}")
    root3 = math.sqrt(3)

    def observe(x: torch.Tensor) -> torch.Tensor:
        return x.sum(1, keepdim=True) / root3

    def adjoint(v: torch.Tensor) -> torch.Tensor:
        return v.expand(-1, 3, *v.shape[2:]) / root3

    shape = (gray.shape[0], 3, *gray.shape[2:])
    return conditional_sample(
        sde, score_fn, shape, gray * root3, observe, adjoint, sampler, steps, generator, **options
    )


def classifier_guided_score(
    score_fn: ScoreFn, classifier: Classifier, labels: torch.Tensor, scale: float = 1.0
) -> ScoreFn:
    """``score + scale * grad_x log p_t(label | x)`` from a classifier of noisy inputs (Dhariwal & Nichol's
    ``scale``; 1 is the exact conditional score)."""

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(xg, t), dim=-1)  # (B, classes)
            chosen = log_probs.gather(1, labels[:, None].to(log_probs.device)).sum()
            (grad,) = torch.autograd.grad(chosen, xg)
        return score_fn(x, t) + scale * grad

    return guided
