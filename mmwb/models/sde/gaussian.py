"""Gaussian mixtures whose perturbed marginals, scores and class posteriors are known in closed form.

For data ``x_0 ~ sum_k w_k N(mu_k, S_k)`` and a linear SDE, ``p_t`` is the mixture of
``N(scale mu_k, scale^2 S_k + std^2 I)``. That gives the exact score for every ``t``: the reference against
which samplers, likelihoods, losses and guidance are checked, and a score model with no training error for
benchmarks. Each covariance is kept as its eigendecomposition, so evaluating at a batch of times costs
``O(B K D^2)``. Samples may have any shape ``(B, ...)`` with ``D`` elements per sample.
"""

from __future__ import annotations

import math

import torch

from mmwb.errors import MmwbInputError
from mmwb.models.sde.sdes import SDE, ScoreFn


class GaussianMixture:
    """``means (K, D)``, ``covs (K, D, D)`` (symmetric positive definite), ``weights (K,)`` summing to one."""

    def __init__(self, means: torch.Tensor, covs: torch.Tensor, weights: torch.Tensor | None = None):
        k, d = means.shape
        if covs.shape != (k, d, d):
            raise MmwbInputError(
                f"GaussianMixture: covs must have shape {(k, d, d)}, got {tuple(covs.shape)}"
            )
        weights = torch.full((k,), 1.0 / k, dtype=means.dtype) if weights is None else weights
        self.means, self.weights = means, weights.to(means)
        self.eigvals, self.eigvecs = torch.linalg.eigh(covs)  # (K, D), (K, D, D)
        if (self.eigvals <= 0).any():
            raise MmwbInputError("GaussianMixture: every covariance must be positive definite")

    @classmethod
    def gaussian(cls, mean: torch.Tensor, cov: torch.Tensor) -> GaussianMixture:
        return cls(mean[None], cov[None])

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def covs(self) -> torch.Tensor:
        return self.eigvecs @ torch.diag_embed(self.eigvals) @ self.eigvecs.transpose(1, 2)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, D)`` samples of the data distribution."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        root = self.eigvecs[comp] * self.eigvals[comp].sqrt()[:, None, :]  # (n, D, D): U diag(sqrt(lambda))
        return self.means[comp] + (root @ z[..., None])[..., 0]

    def _components(self, sde: SDE, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-component log-densities plus log-weights ``(B, K)`` and scores ``(B, K, D)`` of ``p_t`` at ``x``.

        Computed in the mixture's dtype on ``x``'s device.
        """
        means, eigvals, eigvecs, weights = (
            p.to(x.device) for p in (self.means, self.eigvals, self.eigvecs, self.weights)
        )
        flat = x.reshape(x.shape[0], -1).to(means.dtype)  # (B, D)
        tt = t.to(flat)
        a, s = sde.scale(tt), sde.std(tt)  # (B,)
        var = a[:, None, None] ** 2 * eigvals + s[:, None, None] ** 2  # (B, K, D) in each eigenbasis
        diff = flat[:, None, :] - a[:, None, None] * means  # (B, K, D)
        y = torch.einsum("kde,bkd->bke", eigvecs, diff)  # (B, K, D) rotated into the eigenbasis
        logdens = -0.5 * ((y**2 / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        scores = -torch.einsum("kde,bke->bkd", eigvecs, y / var)
        return logdens + weights.log(), scores

    def log_prob(self, sde: SDE, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``log p_t(x)`` per sample ``(B,)``."""
        return torch.logsumexp(self._components(sde, x, t)[0], dim=1)

    def class_logits(self, sde: SDE, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Exact time-dependent classifier: ``log p_t(k | x)`` up to a constant, ``(B, K)``."""
        return self._components(sde, x, t)[0]

    def score(self, sde: SDE, x: torch.Tensor, t: torch.Tensor, component: int | None = None) -> torch.Tensor:
        """``grad_x log p_t(x)`` like ``x``; with ``component``, the score of that component alone."""
        joint, scores = self._components(sde, x, t)
        if component is not None:
            out = scores[:, component]
        else:
            resp = torch.softmax(joint, dim=1)  # (B, K) responsibilities
            out = (resp[..., None] * scores).sum(1)
        return out.reshape(x.shape).to(x.dtype)

    def score_fn(self, sde: SDE) -> ScoreFn:
        """The exact score as a ``score_fn(x, t)`` for the samplers and the likelihood."""
        return lambda x, t: self.score(sde, x, t)

    def marginal(self, sde: SDE, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(D,)`` and covariance ``(D, D)`` of the whole mixture under ``p_t``."""
        tt = torch.tensor([t], dtype=self.means.dtype)
        a, s = sde.scale(tt)[0], sde.std(tt)[0]
        mean = (self.weights[:, None] * self.means).sum(0)
        centred = self.means - mean
        within = (self.weights[:, None, None] * self.covs).sum(0)
        between = (self.weights[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)
        return a * mean, a**2 * (within + between) + s**2 * torch.eye(self.dim, dtype=self.means.dtype)
