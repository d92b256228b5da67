"""Samplers for score-based models: plain functions with one signature, and ``sample`` to dispatch to them.

Every sampler is ``sampler(sde, score_fn, x, ts, *, generator, disable, denoise, **options) -> (x, nfe)``: it
takes ``x`` drawn from the prior at ``ts[0] = T``, integrates back through the decreasing times ``ts`` to
``ts[-1] = eps``, optionally removes the noise left at ``eps`` with one Tweedie step, and returns the samples
with the number of score evaluations (NFE, one per batched call). Nothing holds state between calls.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from tqdm.auto import trange

from mmwb.errors import MmwbInputError
from mmwb.models.sde.ode import solve_ode
from mmwb.models.sde.sdes import SDE, ScoreFn, append_dims

Constraint = Callable[[torch.Tensor, float, torch.Generator | None], torch.Tensor]  # (x, t, gen) -> x
Predictor = Callable[[SDE, ScoreFn, torch.Tensor, float, float, torch.Generator | None], torch.Tensor]


class SampleOutput(NamedTuple):
    samples: torch.Tensor
    nfe: int


def _times(x: torch.Tensor, t: float) -> torch.Tensor:
    """The scalar time ``t`` as the ``(B,)`` tensor a score function takes."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def uniform_times(sde: SDE, steps: int, eps: float) -> torch.Tensor:
    """``steps + 1`` times evenly spaced from ``T`` down to ``eps`` (score_sde's grid)."""
    return torch.linspace(sde.T, eps, steps + 1, dtype=torch.float64)


def karras_times(sde: SDE, steps: int, eps: float, rho: float = 7.0) -> torch.Tensor:
    """Times whose ``sigma`` follows Karras et al. 2022 (EDM) eq. 5: dense near the data, where error matters."""
    bounds = torch.tensor([sde.T, eps], dtype=torch.float64)
    hi, lo = sde.sigma(bounds).pow(1 / rho).tolist()
    sigmas = torch.linspace(hi, lo, steps + 1, dtype=torch.float64) ** rho
    ts = sde.t_of_sigma(sigmas)
    ts[0], ts[-1] = sde.T, eps  # remove round-off at the ends
    return ts


def tweedie_denoise(sde: SDE, score_fn: ScoreFn, x: torch.Tensor, t: float) -> torch.Tensor:
    """``E[x_0 | x_t] = (x_t + std^2 score) / scale`` (Tweedie's formula): the sample without its last noise."""
    tt = _times(x, t)
    return (x + append_dims(sde.std(tt) ** 2, x.ndim) * score_fn(x, tt)) / append_dims(sde.scale(tt), x.ndim)


# --- predictors: one step from t back to t_next < t --------------------------------------------------------


def euler_maruyama_step(
    sde: SDE, score_fn: ScoreFn, x: torch.Tensor, t: float, t_next: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Euler-Maruyama on the reverse-time SDE (Song et al. 2021, eq. 6)."""
    dt = t_next - t
    drift, diffusion = sde.reverse(score_fn).sde(x, _times(x, t))
    return x + drift * dt + append_dims(diffusion, x.ndim) * math.sqrt(-dt) * _noise(x, generator)


def reverse_diffusion_step(
    sde: SDE, score_fn: ScoreFn, x: torch.Tensor, t: float, t_next: float, generator: torch.Generator | None
) -> torch.Tensor:
    """The forward chain's discretisation run backwards (Song et al. 2021, eq. 46): DDPM- and SMLD-like."""
    f, g = sde.reverse(score_fn).discretize(x, _times(x, t), t - t_next)
    return x - f + append_dims(g, x.ndim) * _noise(x, generator)


def ancestral_step(
    sde: SDE, score_fn: ScoreFn, x: torch.Tensor, t: float, t_next: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Ancestral sampling: draw from ``q(x_next | x_t, x_0)`` with ``x_0`` estimated by Tweedie's formula.

    For VP this is DDPM's sampler with the posterior variance, for VE it is SMLD's ancestral step (Song et al.
    2021, app. F); the same Gaussian posterior algebra holds for every linear SDE.
    """
    tt, tn = _times(x, t), _times(x, t_next)
    a_t, s_t, a_n, s_n = sde.scale(tt), sde.std(tt), sde.scale(tn), sde.std(tn)
    r = a_t / a_n
    v = s_t**2 - (r * s_n) ** 2  # variance of the transition x_next -> x_t
    x0 = tweedie_denoise(sde, score_fn, x, t)
    w_x, w_x0 = s_n**2 * r / s_t**2, v * a_n / s_t**2  # posterior mean = w_x x + w_x0 x0
    std = torch.sqrt(v.clamp_min(0) * s_n**2 / s_t**2)
    return (
        append_dims(w_x, x.ndim) * x
        + append_dims(w_x0, x.ndim) * x0
        + append_dims(std, x.ndim) * _noise(x, generator)
    )


PREDICTORS: dict[str, Predictor] = {
    "euler_maruyama": euler_maruyama_step,
    "reverse_diffusion": reverse_diffusion_step,
    "ancestral": ancestral_step,
}


def langevin_step(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    t: float,
    dt: float,
    snr: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One Langevin MCMC step at fixed ``t`` with the step size set by a signal-to-noise ratio (alg. 4).

    The step is ``2 alpha (snr |z| / |score|)^2`` with norms averaged over the batch, ``alpha`` the squared
    mean decay of one forward step (``1 - beta_i`` for VP, 1 for VE), as in Song et al. 2021.
    """
    tt = _times(x, t)
    alpha = (sde.scale(tt) / sde.scale(tt - dt)) ** 2
    grad, noise = score_fn(x, tt), _noise(x, generator)
    grad_norm = grad.reshape(x.shape[0], -1).norm(dim=1).mean()
    noise_norm = noise.reshape(x.shape[0], -1).norm(dim=1).mean()
    step = append_dims(2 * alpha * (snr * noise_norm / grad_norm) ** 2, x.ndim)
    return x + step * grad + torch.sqrt(2 * step) * noise


# --- samplers ----------------------------------------------------------------------------------------------


def pc(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    ts: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    disable: bool = False,
    denoise: bool = True,
    predictor: str | None = "reverse_diffusion",
    corrector: str | None = "langevin",
    snr: float = 0.16,
    corrector_steps: int = 1,
    constraint: Constraint | None = None,
) -> tuple[torch.Tensor, int]:
    """Predictor-corrector sampling (Song et al. 2021, alg. 1): at each time, ``corrector_steps`` Langevin
    steps, then one predictor step to the next time. ``constraint(x, t, generator)`` is applied after every
    update (inpainting and colourisation project onto the observation there)."""
    if predictor is not None and predictor not in PREDICTORS:
        raise MmwbInputError(f"unknown predictor {predictor!r}; choose from {sorted(PREDICTORS)} or None")
    if corrector not in (None, "langevin"):
        raise MmwbInputError(f"unknown corrector {corrector!r}; choose 'langevin' or None")
    if predictor is None and corrector is None:
        raise MmwbInputError("pc sampler needs a predictor, a corrector or both")
    times = ts.tolist()
    nfe = 0
    for i in trange(len(times) - 1, desc="pc", disable=disable):
        t, t_next = times[i], times[i + 1]
        for _ in range(corrector_steps if corrector else 0):
            x = langevin_step(sde, score_fn, x, t, t - t_next, snr, generator)
            x = x if constraint is None else constraint(x, t, generator)
            nfe += 1
        if predictor is not None:
            x = PREDICTORS[predictor](sde, score_fn, x, t, t_next, generator)
            x = x if constraint is None else constraint(x, t_next, generator)
            nfe += 1
    if denoise:
        x, nfe = tweedie_denoise(sde, score_fn, x, times[-1]), nfe + 1
    return x, nfe


# The predictors alone, without a corrector, as samplers of their own.
euler_maruyama = partial(pc, predictor="euler_maruyama", corrector=None)
reverse_diffusion = partial(pc, predictor="reverse_diffusion", corrector=None)
ancestral = partial(pc, predictor="ancestral", corrector=None)


def probability_flow(sde: SDE, score_fn: ScoreFn) -> Callable[[float, torch.Tensor], torch.Tensor]:
    """``dx/dt`` of the probability-flow ODE as a function of a scalar ``t`` and a batch ``x``."""
    rsde = sde.reverse(score_fn, probability_flow=True)
    return lambda t, x: rsde.sde(x, _times(x, t))[0]


def ode(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    ts: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    disable: bool = False,
    denoise: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str = "scipy",
    method: str = "RK45",
) -> tuple[torch.Tensor, int]:
    """The probability-flow ODE from ``ts[0]`` to ``ts[-1]`` with an adaptive solver (the grid in between is
    ignored): scipy's ``solve_ivp`` with ``method``, or ``solver="torch"``'s Dormand-Prince, which stays on the
    device in ``x``'s dtype. Deterministic: ``generator`` is unused."""
    t0, t1 = ts[0].item(), ts[-1].item()
    x, nfe = solve_ode(probability_flow(sde, score_fn), x, t0, t1, rtol, atol, solver, method, disable)
    if denoise:
        x, nfe = tweedie_denoise(sde, score_fn, x, t1), nfe + 1
    return x, nfe


ode_torch = partial(ode, solver="torch")


def heun(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    ts: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    disable: bool = False,
    denoise: bool = True,
) -> tuple[torch.Tensor, int]:
    """Heun's 2nd-order method on the probability-flow ODE in EDM's variables (Karras et al. 2022, alg. 1).

    With ``y = x / scale`` and ``sigma = std / scale`` the ODE of any linear SDE becomes
    ``dy/dsigma = -sigma scale score(scale y, t)``, whose trajectories are nearly straight, so a few dozen
    evaluations suffice. Two NFE per step. Deterministic: ``generator`` is unused.
    """
    times, sigmas, scales = ts.tolist(), sde.sigma(ts).tolist(), sde.scale(ts).tolist()

    def slope(y: torch.Tensor, i: int) -> torch.Tensor:
        """``dy/dsigma`` at grid point ``i``."""
        return -sigmas[i] * scales[i] * score_fn(scales[i] * y, _times(y, times[i]))

    y = x / scales[0]
    for i in trange(len(times) - 1, desc="heun", disable=disable):
        h = sigmas[i + 1] - sigmas[i]
        d = slope(y, i)
        y = y + h * 0.5 * (d + slope(y + h * d, i + 1))
    x, nfe = y * scales[-1], 2 * (len(times) - 1)
    if denoise:
        x, nfe = tweedie_denoise(sde, score_fn, x, times[-1]), nfe + 1
    return x, nfe


Sampler = Callable[..., tuple[torch.Tensor, int]]
SAMPLERS: dict[str, Sampler] = {
    "euler_maruyama": euler_maruyama,
    "reverse_diffusion": reverse_diffusion,
    "ancestral": ancestral,
    "pc": pc,
    "ode": ode,
    "ode_torch": ode_torch,
    "heun": heun,
}
SCHEDULES = {"uniform": uniform_times, "karras": karras_times}
_DEFAULT_SCHEDULE = {"heun": "karras"}  # the rest use "uniform" (adaptive ODE solvers only use the ends)
_DEFAULT_STEPS = {"heun": 18}  # the rest default to sde.N
_SET_BY_SAMPLE = {"generator", "disable"}


def _check_options(name: str, fn: Sampler, options: dict) -> None:
    params = inspect.signature(fn).parameters
    allowed = {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY} - _SET_BY_SAMPLE
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise MmwbInputError(f"sampler {name!r} has no option {unknown[0]!r}; its options: {sorted(allowed)}")


def sample(
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    sampler: str = "pc",
    steps: int | None = None,
    generator: torch.Generator | None = None,
    *,
    eps: float | None = None,
    schedule: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    disable: bool = False,
    **options,
) -> SampleOutput:
    """Draw ``shape[0]`` samples of shape ``shape[1:]``: prior draw, time grid, then the named sampler.

    ``steps`` is the number of time steps (default ``sde.N``; 18 for ``heun``), ignored by the adaptive ODE
    solvers. ``eps`` is the last time (default ``sde.eps``). ``schedule`` spaces the times: ``"uniform"`` in
    ``t`` (default) or ``"karras"`` in ``sigma`` (default for ``heun``). ``device`` defaults to the generator's.
    ``options`` go to the sampler (e.g. ``snr``, ``corrector_steps``, ``rtol``, ``denoise``).
    """
    if sampler not in SAMPLERS:
        raise MmwbInputError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}")
    fn = SAMPLERS[sampler]
    _check_options(sampler, fn, options)
    steps = _DEFAULT_STEPS.get(sampler, sde.N) if steps is None else steps
    if steps < 1:
        raise MmwbInputError(f"steps must be >= 1, got {steps}")
    if len(shape) < 1 or min(shape) < 1:
        raise MmwbInputError(f"shape must be (batch, ...) with positive sizes, got {tuple(shape)}")
    eps = sde.eps if eps is None else eps
    if not 0 < eps < sde.T:
        raise MmwbInputError(f"eps must lie in (0, T={sde.T}), got {eps}")
    device = device if device is not None else (generator.device if generator is not None else "cpu")
    schedule = _DEFAULT_SCHEDULE.get(sampler, "uniform") if schedule is None else schedule
    if schedule not in SCHEDULES:
        raise MmwbInputError(f"unknown schedule {schedule!r}; choose from {sorted(SCHEDULES)}")
    ts = SCHEDULES[schedule](sde, steps, eps)
    x = sde.prior_sampling(tuple(shape), generator=generator, device=device, dtype=dtype)
    samples, nfe = fn(sde, score_fn, x, ts, generator=generator, disable=disable, **options)
    return SampleOutput(samples, nfe)
