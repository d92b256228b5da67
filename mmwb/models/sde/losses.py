"""Denoising score matching over continuous time (Song et al. 2021, eq. 7), with the usual weightings.

The objective is ``E_t E_{x_0, z} [lambda(t) |score(x_t, t) + z / std(t)|^2]`` with ``t ~ U[eps, T]`` and
``x_t = scale x_0 + std z``. ``"sigma2"`` (``lambda = std^2``) is the default; for a model whose score is
``-eps_hat / std`` it is exactly DDPM's epsilon-prediction loss ``|eps_hat - z|^2``. ``"likelihood"``
(``lambda = g^2``) makes the objective a bound on the negative log-likelihood (Song et al. 2021b); sampling
``t`` with density ``q(t) ∝ g^2 / std^2`` instead of uniformly (``importance=True``) cuts its variance. The
importance weights use the density actually sampled, so both ways estimate the same objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.nn import functional as F

from mmwb.errors import MmwbInputError
from mmwb.models.sde.sdes import SDE, ScoreFn, append_dims

WEIGHTINGS = ("sigma2", "likelihood")
_IMPORTANCE_GRID = 2048  # cells of the tabulated inverse CDF; the weights stay exact for any number


def _weight(sde: SDE, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """``lambda(t) / std(t)^2``, the factor on ``|std score + z|^2``."""
    if weighting == "sigma2":
        return torch.ones_like(t)
    return sde.diffusion(t) ** 2 / sde.std(t) ** 2


def importance_times(
    sde: SDE,
    n: int,
    eps: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` times from ``q(t) ∝ g(t)^2 / std(t)^2`` on ``[eps, T]`` and the weights ``1 / ((T - eps) q(t))``.

    ``q`` is tabulated on a grid geometric in ``t`` (the density grows like ``1 / t`` near zero for VP) as a
    piecewise-constant density; sampling and weights both use that density, so ``E_q[w h] = E_U[h]`` exactly.
    """
    log_eps, log_t = math.log10(eps), math.log10(sde.T)
    grid = torch.logspace(log_eps, log_t, _IMPORTANCE_GRID + 1, dtype=torch.float64, device=device)
    dens = _weight(sde, grid, "likelihood")  # unnormalised q on the grid
    widths = grid.diff()
    mass = 0.5 * (dens[1:] + dens[:-1]) * widths  # (cells,)
    probs = mass / mass.sum()
    cell = torch.multinomial(probs, n, replacement=True, generator=generator)
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    t = grid[cell] + u * widths[cell]
    weight = widths[cell] / (probs[cell] * (sde.T - eps))
    return t.to(device=device, dtype=dtype), weight.to(device=device, dtype=dtype)


def dsm_loss(
    sde: SDE,
    score_fn: ScoreFn,
    x0: torch.Tensor,
    *,
    weighting: str = "sigma2",
    importance: bool = False,
    eps: float = 1e-5,
    reduce_mean: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Monte-Carlo denoising score matching loss for the batch ``x0`` (any rank); a scalar.

    Per sample the squared error is summed over dimensions (averaged with ``reduce_mean``), then averaged over
    the batch. ``importance`` samples ``t`` by the likelihood weighting (only meaningful with it).
    """
    if weighting not in WEIGHTINGS:
        raise MmwbInputError(f"unknown loss weighting {weighting!r}; choose from {WEIGHTINGS}")
    if importance and weighting != "likelihood":
        raise MmwbInputError("importance sampling of t is defined for weighting='likelihood' only")
    batch = x0.shape[0]
    if importance:
        t, iw = importance_times(sde, batch, eps, generator, x0.device, x0.dtype)
    else:
        t = eps + (sde.T - eps) * torch.rand(batch, generator=generator, device=x0.device, dtype=x0.dtype)
        iw = torch.ones_like(t)
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    mean, std = sde.marginal_prob(x0, t)
    std_b = append_dims(std, x0.ndim)
    err = (std_b * score_fn(mean + std_b * z, t) + z) ** 2  # |std score + z|^2
    per_sample = err.reshape(batch, -1)
    per_sample = per_sample.mean(1) if reduce_mean else per_sample.sum(1)
    return (iw * _weight(sde, t, weighting) * per_sample).mean()


def classifier_loss(
    sde: SDE,
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``classifier(x_t, t)`` on perturbed data at ``t ~ U[eps, T]``: trains the noise-
    conditioned classifier that classifier guidance differentiates."""
    t = eps + (sde.T - eps) * torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return F.cross_entropy(classifier(sde.perturb(x0, t, noise), t), labels)
