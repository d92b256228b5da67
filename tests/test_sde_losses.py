"""Denoising score matching against its known minimum on Gaussian data."""

import math

import pytest
import torch
from torch import nn

from mmwb.errors import MmwbInputError
from mmwb.models.sde import GaussianMixture, dsm_loss, importance_times
from mmwb.sde import VESDE, VPSDE, SubVPSDE

SDES = [VPSDE(), SubVPSDE(), VESDE()]
IDS = ["vp", "subvp", "ve"]
EPS = 1e-5
MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
DATA = GaussianMixture.gaussian(MEAN, COV)


def dsm_minimum(sde, weighting: str) -> float:
    """With the exact score the DSM loss is E_t[lambda(t) (D / std^2 - tr C_t^-1)], C_t = scale^2 S + std^2 I:
    the conditional score's squared norm minus the marginal score's (Vincent 2011). Quadrature on a log grid."""
    t = torch.logspace(math.log10(EPS), 0, 200001, dtype=torch.float64)
    a, s = sde.scale(t), sde.std(t)
    tr_inv = (1 / (a[:, None] ** 2 * DATA.eigvals[0] + s[:, None] ** 2)).sum(1)
    lam_over_s2 = torch.ones_like(t) if weighting == "sigma2" else sde.diffusion(t) ** 2 / s**2
    return (torch.trapezoid(lam_over_s2 * (2 - s**2 * tr_inv), t) / (sde.T - EPS)).item()


def mc_loss(sde, score_fn, weighting, importance, seeds=range(4), n=100000) -> torch.Tensor:
    """The loss for each seed of t and z (same data)."""
    x0 = DATA.sample(n, torch.Generator().manual_seed(100))
    vals = torch.tensor(
        [
            dsm_loss(
                sde,
                score_fn,
                x0,
                weighting=weighting,
                importance=importance,
                eps=EPS,
                generator=torch.Generator().manual_seed(s),
            ).item()
            for s in seeds
        ]
    )
    return vals


def mean_se(vals: torch.Tensor) -> tuple[float, float]:
    return vals.mean().item(), vals.std().item() / math.sqrt(len(vals))


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_exact_score_reaches_the_known_minimum(sde):
    for weighting, importance in [("sigma2", False), ("likelihood", True)]:
        loss, se = mean_se(mc_loss(sde, DATA.score_fn(sde), weighting, importance))
        expected = dsm_minimum(sde, weighting)
        assert abs(loss - expected) < 5 * se + 1e-3 * expected, (weighting, loss, expected, se)
    wrong = GaussianMixture.gaussian(MEAN + 0.2, COV)
    excess, se = mean_se(  # same seeds: the paired difference is free of most Monte-Carlo noise
        mc_loss(sde, wrong.score_fn(sde), "sigma2", False) - mc_loss(sde, DATA.score_fn(sde), "sigma2", False)
    )
    assert excess > 10 * se


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE()], ids=["vp", "subvp"])
def test_importance_sampling_keeps_the_mean_and_cuts_the_variance(sde):
    uniform, se_uniform = mean_se(mc_loss(sde, DATA.score_fn(sde), "likelihood", False, range(8), 20000))
    importance, se_importance = mean_se(mc_loss(sde, DATA.score_fn(sde), "likelihood", True, range(8), 20000))
    assert abs(uniform - importance) < 5 * math.hypot(se_uniform, se_importance)
    assert se_importance < se_uniform / 4


def test_importance_times_are_in_range_with_exact_weights():
    """E_q[w] = 1 for the piecewise density actually sampled; times lie in [eps, T]."""
    t, w = importance_times(VPSDE(), 200000, EPS, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert t.min() >= EPS and t.max() <= 1.0
    assert w.mean().item() == pytest.approx(1.0, abs=0.01)
    assert (t < 0.01).float().mean() > 0.2  # q piles up near 0 for VP, where the likelihood weight is large


class GaussianScore(nn.Module):
    """The exact Gaussian score with a learnable mean and covariance: DSM must recover the data's."""

    def __init__(self, sde):
        super().__init__()
        self.sde = sde
        self.mean, self.tril = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.eye(2))

    def cov(self):
        chol = torch.tril(self.tril)
        return chol @ chol.T

    def forward(self, x, t):
        a, s = self.sde.scale(t), self.sde.std(t)
        c = a[:, None, None] ** 2 * self.cov() + s[:, None, None] ** 2 * torch.eye(2)  # (B, 2, 2)
        return -torch.linalg.solve(c, x - a[:, None] * self.mean)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_training_goes_to_the_minimum(sde):
    model = GaussianScore(sde)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss = dsm_loss(sde, model, DATA.sample(1024, gen).float(), eps=EPS, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (model.mean.detach() - MEAN.float()).abs().max() < 0.1
    assert (model.cov().detach() - COV.float()).abs().max() < 0.1
    with torch.no_grad():  # the trained loss sits on the known minimum (paired with the exact score's)
        trained, exact = (
            mc_loss(sde, model, "sigma2", False),
            mc_loss(sde, DATA.score_fn(sde), "sigma2", False),
        )
    assert abs(exact.mean().item() - dsm_minimum(sde, "sigma2")) < 0.01
    assert 0 <= (trained - exact).mean().item() < 0.005


def test_bad_weighting_raises():
    sde = VPSDE()
    with pytest.raises(MmwbInputError, match="unknown loss weighting 'l2'"):
        dsm_loss(sde, DATA.score_fn(sde), torch.zeros(4, 2), weighting="l2")
    with pytest.raises(MmwbInputError, match="importance sampling"):
        dsm_loss(sde, DATA.score_fn(sde), torch.zeros(4, 2), importance=True)
