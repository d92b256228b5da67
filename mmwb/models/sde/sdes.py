"""The forward SDEs of score-based generative modelling (Song et al. 2021): VE, VP and sub-VP.

All three are linear, so the perturbation kernel is Gaussian and known in closed form:
``x_t = scale(t) * x_0 + std(t) * z``. Everything else follows from ``scale`` and ``std``: the marginal, the
noise-to-signal ratio ``sigma = std / scale`` that few-step solvers integrate in, and an exact (not Euler)
discretisation. Every function takes a batch of any rank: times are ``(B,)`` tensors and per-sample
coefficients are broadcast with ``append_dims``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from mmwb.errors import MmwbConfigError

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x: (B, ...), t: (B,)) -> score like x


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Give a per-sample ``(B,)`` tensor trailing unit dims so it broadcasts against a ``(B, ...)`` tensor."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def batch_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the batch: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


class SDE(ABC):
    """A linear forward SDE ``dx = f(t) x dt + g(t) dw`` on ``t`` in ``[0, T]``; ``sde(x, t)`` is (drift, g).

    ``N`` is the number of discretisation steps the samplers use by default; ``eps`` is the smallest time they
    integrate to (the score explodes as ``std -> 0``, so sampling stops short of ``t = 0``).
    """

    T: float = 1.0
    eps: float = 1e-3  # score_sde's sampling eps for VP and sub-VP; VE's smaller std at t=0 allows 1e-5

    def __init__(self, N: int):
        if N < 1:
            raise MmwbConfigError(f"{type(self).__name__}: N must be >= 1, got {N}")
        self.N = N

    @abstractmethod
    def drift_coef(self, t: torch.Tensor) -> torch.Tensor:
        """``f(t)`` of the linear drift ``f(t) x``."""

    @abstractmethod
    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """``g(t)``."""

    @abstractmethod
    def scale(self, t: torch.Tensor) -> torch.Tensor:
        """Mean coefficient of the perturbation kernel, ``E[x_t | x_0] = scale(t) x_0``."""

    @abstractmethod
    def std(self, t: torch.Tensor) -> torch.Tensor:
        """Standard deviation of the perturbation kernel."""

    @abstractmethod
    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of ``sigma(t)``: the time at which the noise-to-signal ratio is ``sigma``."""

    @property
    @abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the isotropic Gaussian prior ``p_T``."""

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift ``f(x, t)`` (like ``x``) and diffusion ``g(t)`` (``(B,)``)."""
        return append_dims(self.drift_coef(t), x.ndim) * x, self.diffusion(t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise-to-signal ratio ``std / scale``: ``x_t / scale(t)`` is the data plus noise of this std."""
        return self.std(t) / self.scale(t)

    def marginal_prob(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (like ``x``) and std (``(B,)``) of ``p_t(x_t | x_0 = x)``."""
        return append_dims(self.scale(t), x.ndim) * x, self.std(t)

    def perturb(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t`` drawn from ``p_t(x_t | x_0 = x)`` with the standard normal ``noise`` (like ``x``)."""
        mean, std = self.marginal_prob(x, t)
        return mean + append_dims(std, x.ndim) * noise

    def prior_sampling(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw ``x_T`` from the prior."""
        return self.prior_std * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density of the prior per sample, ``(B, ...) -> (B,)``, in nats."""
        dim = z[0].numel()
        var = self.prior_std**2
        return -0.5 * dim * math.log(2 * math.pi * var) - batch_sum(z**2) / (2 * var)

    def discretize(self, x: torch.Tensor, t: torch.Tensor, dt: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The step from ``t`` to ``t + dt`` as ``x_{t+dt} = x_t + f + G z``: returns ``f`` (like x), ``G`` (B,).

        The kernel of a linear SDE is Gaussian and known, so this is the exact transition rather than an
        Euler step: ``r = scale(t+dt) / scale(t)``, ``G^2 = std(t+dt)^2 - r^2 std(t)^2``. With ``N`` uniform
        steps it is the DDPM chain for VP and the SMLD chain for VE, for any step size.
        """
        r = self.scale(t + dt) / self.scale(t)
        var = self.std(t + dt) ** 2 - (r * self.std(t)) ** 2
        return append_dims(r - 1, x.ndim) * x, var.clamp_min(0).sqrt()

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (or, with ``probability_flow``, the ODE with the same marginals)."""
        return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
    """``dx = [f - g^2 score] dt + g dw̄`` run from ``T`` to 0; the ODE halves the score term and drops noise."""

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool):
        self.forward = forward
        self.score_fn = score_fn
        self.probability_flow = probability_flow

    def _weight(self) -> float:
        return 0.5 if self.probability_flow else 1.0

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift (like ``x``, for ``dt < 0``) and diffusion (``(B,)``, zero for the ODE)."""
        drift, diffusion = self.forward.sde(x, t)
        g2 = append_dims(diffusion**2, x.ndim)
        drift = drift - g2 * self.score_fn(x, t) * self._weight()
        return drift, torch.zeros_like(diffusion) if self.probability_flow else diffusion

    def discretize(self, x: torch.Tensor, t: torch.Tensor, dt: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The step from ``t`` back to ``t - dt`` as ``x_{t-dt} = x_t - f + G z`` (reverse diffusion)."""
        f, g = self.forward.discretize(x, t - dt, dt)
        f = f - append_dims(g**2, x.ndim) * self.score_fn(x, t) * self._weight()
        return f, torch.zeros_like(g) if self.probability_flow else g


class VESDE(SDE):
    """Variance exploding: ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, no drift (NCSN / SMLD).

    As in score_sde, the data are taken as already perturbed by ``sigma_min`` so that ``std(t) = sigma(t)``
    for all ``t`` (the SDE itself adds ``sigma(t)^2 - sigma_min^2``); the difference is ``sigma_min^2``.
    """

    eps = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        if not 0 < sigma_min < sigma_max:
            raise MmwbConfigError(f"VESDE: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        super().__init__(N)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self._log_ratio = math.log(sigma_max / sigma_min)

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)

    def std(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.log(sigma / self.sigma_min) / self._log_ratio

    def drift_coef(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return self.std(t) * math.sqrt(2 * self._log_ratio)


class VPSDE(SDE):
    """Variance preserving: ``beta(t) = beta_min + t (beta_max - beta_min)``, the continuum limit of DDPM."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        if not 0 < beta_min < beta_max:
            raise MmwbConfigError(
                f"{type(self).__name__}: need 0 < beta_min < beta_max, got {beta_min}, {beta_max}"
            )
        super().__init__(N)
        self.beta_0, self.beta_1 = beta_min, beta_max

    @property
    def prior_std(self) -> float:
        return 1.0

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def integrated_beta(self, t: torch.Tensor) -> torch.Tensor:
        """``B(t) = int_0^t beta``; ``scale(t) = exp(-B / 2)``."""
        return self.beta_0 * t + 0.5 * (self.beta_1 - self.beta_0) * t**2

    def _t_of_integrated_beta(self, b: torch.Tensor) -> torch.Tensor:
        """Positive root of ``B(t) = b``."""
        d = self.beta_1 - self.beta_0
        return 2 * b / (self.beta_0 + torch.sqrt(self.beta_0**2 + 2 * d * b))

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-0.5 * self.integrated_beta(t))

    def std(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(-self.integrated_beta(t)))

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        # sigma^2 = exp(B) - 1
        return self._t_of_integrated_beta(torch.log1p(sigma**2))

    def drift_coef(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * self.beta(t)

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta(t).sqrt()


class SubVPSDE(VPSDE):
    """Sub-VP: the VP drift with diffusion ``beta(t) (1 - exp(-2 B(t)))``, whose variance ``(1 - e^{-B})^2``
    stays below VP's; better likelihoods in Song et al. 2021."""

    def std(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.expm1(-self.integrated_beta(t))

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        # sigma = (1 - a^2) / a with a = scale: a = (sqrt(sigma^2 + 4) - sigma) / 2, B = -2 log a
        a = 2 / (torch.sqrt(sigma**2 + 4) + sigma)
        return self._t_of_integrated_beta(-2 * torch.log(a))

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.beta(t) * -torch.expm1(-2 * self.integrated_beta(t)))
