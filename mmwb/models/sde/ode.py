"""Adaptive ODE solvers for the probability-flow ODE: scipy's ``solve_ivp`` and a torch Dormand-Prince.

scipy's RK45 is the reference (score_sde samples and computes likelihoods with it) but moves the state to the
host in float64 at every evaluation. ``dopri5`` is the same method (Dormand & Prince 1980, 5th order with an
embedded 4th-order error estimate, FSAL, Hairer's initial step and step-size control) written in torch, so the
state stays on its device and in its dtype; the only host sync per step is the accept/reject decision. Both
report the number of function evaluations (NFE), the cost measure of sampling.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp
from tqdm.auto import tqdm

from mmwb.errors import MmwbInputError

OdeFn = Callable[[float, torch.Tensor], torch.Tensor]  # (t, y) -> dy/dt, y of any shape

# Dormand-Prince 5(4) tableau: nodes, stage coefficients, 5th-order weights, and (5th - 4th) error weights.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0


class _Counted:
    """Wraps ``f`` to count evaluations and tick a progress bar."""

    def __init__(self, f: OdeFn, bar: tqdm):
        self.f, self.bar, self.nfe = f, bar, 0

    def __call__(self, t: float, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        self.bar.update(1)
        return self.f(t, y)


def solve_scipy(
    f: OdeFn,
    y0: torch.Tensor,
    t0: float,
    t1: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    disable: bool = True,
) -> tuple[torch.Tensor, int]:
    """Integrate ``dy/dt = f(t, y)`` from ``t0`` to ``t1`` with ``scipy.integrate.solve_ivp``; ``(y1, nfe)``."""
    with tqdm(desc=f"ode {method}", unit="nfe", disable=disable) as bar:
        counted = _Counted(f, bar)

        def fun(t: float, y: np.ndarray) -> np.ndarray:
            state = torch.from_numpy(y).to(device=y0.device, dtype=y0.dtype).reshape(y0.shape)
            return counted(t, state).detach().double().cpu().numpy().ravel()

        start = y0.detach().double().cpu().numpy().ravel()
        sol = solve_ivp(fun, (t0, t1), start, method=method, rtol=rtol, atol=atol, t_eval=[t1])
    if not sol.success:
        raise MmwbInputError(f"ode solver {method} failed: {sol.message}")
    y1 = torch.from_numpy(sol.y[:, -1]).to(device=y0.device, dtype=y0.dtype).reshape(y0.shape)
    return y1, counted.nfe


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean().sqrt()


def _initial_step(
    f: OdeFn, t0: float, y0: torch.Tensor, f0: torch.Tensor, direction: float, rtol, atol
) -> float:
    """Hairer, Norsett & Wanner, Solving ODEs I, II.4: a first step whose Euler error is about the tolerance."""
    scale = atol + rtol * y0.abs()
    d0, d1 = _rms(y0 / scale).item(), _rms(f0 / scale).item()
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = f(t0 + direction * h0, y0 + direction * h0 * f0)
    d2 = _rms((f1 - f0) / scale).item() / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1)


def solve_dopri5(
    f: OdeFn,
    y0: torch.Tensor,
    t0: float,
    t1: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 100_000,
    disable: bool = True,
) -> tuple[torch.Tensor, int]:
    """Integrate ``dy/dt = f(t, y)`` from ``t0`` to ``t1`` with adaptive Dormand-Prince 5(4); ``(y1, nfe)``.

    The error norm is the RMS over all elements of the state, as in scipy, so one step size serves the batch.
    """
    with tqdm(desc="ode dopri5", unit="nfe", disable=disable) as bar:
        fc = _Counted(f, bar)
        direction = 1.0 if t1 >= t0 else -1.0
        t, y = t0, y0
        k0 = fc(t, y)
        h = _initial_step(fc, t, y, k0, direction, rtol, atol)
        for _ in range(max_steps):
            if direction * (t1 - t) <= 0:
                return y, fc.nfe
            h = min(h, abs(t1 - t))
            dt = direction * h
            ks = [k0]
            for c, row in zip(_C[1:], _A[1:]):
                ks.append(fc(t + c * dt, y + dt * sum(a * k for a, k in zip(row, ks))))
            y_new = y + dt * sum(b * k for b, k in zip(_B, ks))
            k_new = fc(t + dt, y_new)  # first stage of the next step (FSAL)
            err = dt * sum(e * k for e, k in zip(_E, [*ks, k_new]))
            tol = atol + rtol * torch.maximum(y.abs(), y_new.abs())
            err_norm = _rms(err / tol).item()
            factor = _MAX_FACTOR if err_norm == 0 else _SAFETY * err_norm ** (-1 / 5)
            if err_norm <= 1:
                t, y, k0 = t + dt, y_new, k_new
                h *= min(_MAX_FACTOR, max(_MIN_FACTOR, factor))
            else:
                h *= max(_MIN_FACTOR, min(1.0, factor))
    raise MmwbInputError(f"ode solver dopri5 did not reach t={t1} in {max_steps} steps (stuck at t={t:.3g})")


SOLVERS = ("scipy", "torch")


def solve_ode(
    f: OdeFn,
    y0: torch.Tensor,
    t0: float,
    t1: float,
    rtol: float,
    atol: float,
    solver: str = "scipy",
    method: str = "RK45",
    disable: bool = True,
) -> tuple[torch.Tensor, int]:
    """``solve_scipy`` (with ``method``) or ``solve_dopri5`` by name; ``(y1, nfe)``."""
    if solver == "scipy":
        return solve_scipy(f, y0, t0, t1, rtol, atol, method, disable)
    if solver == "torch":
        return solve_dopri5(f, y0, t0, t1, rtol, atol, disable=disable)
    raise MmwbInputError(f"unknown ode solver {solver!r}; choose from {SOLVERS}")
