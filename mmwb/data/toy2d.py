"""Two-dimensional toy distributions for score models: checkerboard, 8 gaussians, two moons, swiss roll.

Each is a function ``(n, generator) -> (n, 2)`` float32 tensor, so a dataset is a pure function of its seed.
The constants follow FFJORD's toy sets (Grathwohl et al. 2019), which later papers compare against; all four
live roughly in ``[-4, 4]^2``. The 8 gaussians also have an exact log-density, for likelihood checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mmwb.errors import MmwbInputError

EIGHT_GAUSSIANS_RADIUS = 4 / math.sqrt(2)  # centres on a circle of this radius
EIGHT_GAUSSIANS_STD = 0.5 / math.sqrt(2)  # isotropic std of each component


def _uniform(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator)


def checkerboard(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform on the 8 dark squares (side 2) of a 4x4 board covering ``[-4, 4]^2``."""
    x = 4 * _uniform(n, generator) - 2
    row = _uniform(n, generator) - 2 * torch.randint(0, 2, (n,), generator=generator)
    y = row + torch.floor(x) % 2
    return 2 * torch.stack([x, y], dim=1)


def eight_gaussians_centres() -> torch.Tensor:
    """The ``(8, 2)`` component means, every 45 degrees from the positive x axis."""
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    return EIGHT_GAUSSIANS_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)


def eight_gaussians(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """An equal mixture of 8 isotropic Gaussians on a circle."""
    comp = torch.randint(0, 8, (n,), generator=generator)
    noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return (eight_gaussians_centres()[comp] + EIGHT_GAUSSIANS_STD * noise).float()


def eight_gaussians_log_prob(x: torch.Tensor) -> torch.Tensor:
    """Exact log-density ``(N,)`` in nats of the 8 gaussians at points ``(N, 2)``."""
    sq = ((x.double()[:, None, :] - eight_gaussians_centres()) ** 2).sum(-1)  # (N, 8)
    var = EIGHT_GAUSSIANS_STD**2
    log_comp = -sq / (2 * var) - math.log(2 * math.pi * var)
    return (torch.logsumexp(log_comp, dim=1) - math.log(8)).to(x.dtype)


def two_moons(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """scikit-learn's two interleaved half circles with noise 0.1, scaled by 2 and centred."""
    angle = math.pi * _uniform(n, generator)
    upper = torch.randint(0, 2, (n,), generator=generator).bool()
    x = torch.where(upper, angle.cos(), 1 - angle.cos())
    y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
    points = torch.stack([x, y], dim=1) + 0.1 * torch.randn(n, 2, generator=generator)
    return 2 * points + torch.tensor([-1.0, -0.2])


def swiss_roll(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """scikit-learn's swiss roll (noise 1) seen along its axis, divided by 5."""
    turn = 1.5 * math.pi * (1 + 2 * _uniform(n, generator))
    points = turn[:, None] * torch.stack([turn.cos(), turn.sin()], dim=1) + torch.randn(
        n, 2, generator=generator
    )
    return points / 5


TOY2D: dict[str, Callable[[int, torch.Generator | None], torch.Tensor]] = {
    "checkerboard": checkerboard,
    "8gaussians": eight_gaussians,
    "moons": two_moons,
    "swissroll": swiss_roll,
}


def toy2d(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` points of the named toy set (``TOY2D``'s keys)."""
    if name not in TOY2D:
        raise MmwbInputError(f"unknown toy data set {name!r}; choose from {sorted(TOY2D)}")
    if n < 1:
        raise MmwbInputError(f"toy data set {name!r}: n must be >= 1, got {n}")
    return TOY2D[name](n, generator)


CHECKERBOARD_AREA = 32.0  # 8 squares of side 2


def checkerboard_log_prob(x: torch.Tensor) -> torch.Tensor:
    """Exact log-density ``(N,)`` in nats: ``-log 32`` on the dark squares, ``-inf`` elsewhere."""
    inside = (x.abs() <= 4).all(dim=1) & ((torch.floor(x[:, 0] / 2) + torch.floor(x[:, 1] / 2)) % 2 == 0)
    return torch.where(inside, -math.log(CHECKERBOARD_AREA), -math.inf).to(x.dtype)


LOG_PROBS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "checkerboard": checkerboard_log_prob,
    "8gaussians": eight_gaussians_log_prob,
}
# log-density -inf outside the support: samples of these are scored by the share inside it
BOUNDED_SUPPORT = frozenset({"checkerboard"})
