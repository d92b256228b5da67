"""Exact likelihoods through the probability-flow ODE (Song et al. 2021, app. D.2; FFJORD's trace trick).

Along the ODE ``dx/dt = f(x, t)``, ``d log p_t(x_t) / dt = -div f``, so integrating ``x`` together with
``delta = int div f dt`` from ``eps`` to ``T`` gives ``log p_eps(x) = log p_T(x_T) + delta(T)``. The divergence
is exact (one backward pass per dimension, for small ``D``) or the Hutchinson-Skilling estimate
``E[n^T (df/dx) n]`` with one noise draw ``n`` held fixed along the path, which keeps the estimate unbiased.
Two approximations remain, as in score_sde: ``p_T`` is replaced by the prior (for the 2-D Gaussian of the
tests that moves ``log p`` by up to 0.02 nats for VP and 0.06 for VE), and ``x`` is taken as a sample at
``eps`` rather than 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from mmwb.errors import MmwbInputError
from mmwb.models.sde.ode import solve_ode
from mmwb.models.sde.samplers import probability_flow
from mmwb.models.sde.sdes import SDE, ScoreFn, batch_sum

NOISES = ("rademacher", "gaussian")


class LikelihoodOutput(NamedTuple):
    logp: torch.Tensor  # (B,) nats
    latent: torch.Tensor  # x_T, like x
    nfe: int


def _exact_divergence(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_i df_i/dx_i`` per sample with one backward pass per dimension; ``(B,)``."""
    flat_f = f.reshape(f.shape[0], -1)  # (B, D)
    div = torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
    for i in range(flat_f.shape[1]):
        (grad,) = torch.autograd.grad(flat_f[:, i].sum(), x, retain_graph=True)
        div = div + grad.reshape(f.shape[0], -1)[:, i]
    return div


def _hutchinson_divergence(f: torch.Tensor, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``n^T (df/dx) n`` per sample, one vector-Jacobian product; ``(B,)``."""
    (vjp,) = torch.autograd.grad((f * noise).sum(), x)
    return batch_sum(vjp * noise)


def probability_flow_likelihood(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    exact_divergence: bool = False,
    *,
    eps: float = 1e-5,
    solver: str = "scipy",
    method: str = "RK45",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    noise: str = "rademacher",
    generator: torch.Generator | None = None,
    disable: bool = False,
) -> LikelihoodOutput:
    """``log p_eps(x)`` per sample in nats, the prior latent ``x_T`` and the NFE (one per drift + divergence).

    ``exact_divergence`` costs one backward pass per dimension per evaluation: for ``D`` up to a few hundred.
    ``solver``, ``method``, ``rtol``, ``atol`` as in ``mmwb.models.sde.ode.solve_ode``; ``noise`` and
    ``generator`` draw the Hutchinson probe.
    """
    if noise not in NOISES:
        raise MmwbInputError(f"unknown Hutchinson noise {noise!r}; choose from {NOISES}")
    batch, numel = x.shape[0], x.numel()
    drift_fn = probability_flow(sde, score_fn)
    if noise == "rademacher":
        probe = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
    else:
        probe = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def augmented(t: float, state: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            xt = state[:numel].reshape(x.shape).detach().requires_grad_(True)
            drift = drift_fn(t, xt)
            if exact_divergence:
                div = _exact_divergence(drift, xt)
            else:
                div = _hutchinson_divergence(drift, xt, probe)
        return torch.cat([drift.detach().reshape(-1), div.detach()])  # (B*D + B,)

    start = torch.cat([x.detach().reshape(-1), torch.zeros(batch, dtype=x.dtype, device=x.device)])
    end, nfe = solve_ode(augmented, start, eps, sde.T, rtol, atol, solver, method, disable)
    latent, delta = end[:numel].reshape(x.shape), end[numel:]
    return LikelihoodOutput(sde.prior_logp(latent) + delta, latent, nfe)


def log_likelihood(
    sde: SDE, score_fn: ScoreFn, x: torch.Tensor, exact_divergence: bool = False, **options
) -> torch.Tensor:
    """``log p(x)`` per sample ``(B,)`` in nats; ``options`` as in ``probability_flow_likelihood``."""
    return probability_flow_likelihood(sde, score_fn, x, exact_divergence, **options).logp


def dequantize(
    levels: torch.Tensor,
    num_levels: int,
    value_range: tuple[float, float] = (-1.0, 1.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniform dequantisation: integer levels ``k`` become ``lo + (hi - lo) (k + U) / num_levels``, ``U ~ U[0,1)``.

    A density on the result lower-bounds the probability of the discrete data (Theis et al. 2016); see
    ``bits_per_dim`` for the change of units.
    """
    lo, hi = value_range
    u = torch.rand(levels.shape, generator=generator, device=levels.device)
    return lo + (hi - lo) * (levels.float() + u) / num_levels


def bits_per_dim(
    logp: torch.Tensor, dim: int, num_levels: int = 256, value_range: tuple[float, float] = (-1.0, 1.0)
) -> torch.Tensor:
    """Bits per dimension of discrete data from the log-density ``logp`` (nats) of its dequantised values.

    ``log P(k) >= log p(y) + D log(hi - lo) - D log(num_levels)``: the density of ``y`` becomes one on the unit
    cube (``+ log(hi - lo)`` per dim), and a bin of the cube has volume ``1 / num_levels`` per dim. For 8-bit
    data on ``[-1, 1]`` that adds ``log2(256) - log2(2) = 7`` bits per dim: score_sde's constant 7.
    """
    lo, hi = value_range
    nats = logp + dim * math.log(hi - lo) - dim * math.log(num_levels)
    return -nats / (dim * math.log(2))
