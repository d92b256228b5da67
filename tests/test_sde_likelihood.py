"""Likelihood through the probability-flow ODE against the exact Gaussian log-density."""

import math

import pytest
import torch

from mmwb.errors import MmwbInputError
from mmwb.models.sde import GaussianMixture, bits_per_dim, dequantize, probability_flow_likelihood
from mmwb.sde import VESDE, VPSDE, SubVPSDE, log_likelihood

SDES = [VPSDE(), SubVPSDE(), VESDE()]
IDS = ["vp", "subvp", "ve"]
EPS = 1e-5
DATA = GaussianMixture.gaussian(
    torch.tensor([1.0, -0.5], dtype=torch.float64),
    torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64),
)


def _at(t: float, n: int) -> torch.Tensor:
    return torch.full((n,), t, dtype=torch.float64)


@pytest.mark.parametrize("solver", ["scipy", "torch"])
@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_exact_divergence_gives_the_exact_log_density(sde, solver):
    x = DATA.sample(128, torch.Generator().manual_seed(1))
    out = probability_flow_likelihood(sde, DATA.score_fn(sde), x, True, eps=EPS, solver=solver, disable=True)
    exact = DATA.log_prob(sde, x, _at(EPS, 128))
    # The ODE is exact; what it cannot know is that p_T is not quite the prior. Swap the prior for the true p_T
    # at the returned latent and the result is tight; as returned it is off by that mismatch only.
    p_t = DATA.log_prob(sde, out.latent, _at(sde.T, 128))
    assert (out.logp - sde.prior_logp(out.latent) + p_t - exact).abs().max() < 1e-3
    assert (out.logp - exact).abs().max() < 0.1
    assert out.nfe > 10


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_hutchinson_is_unbiased_within_its_error_bars(sde):
    x = DATA.sample(400, torch.Generator().manual_seed(2))
    score = DATA.score_fn(sde)
    exact = log_likelihood(sde, score, x, exact_divergence=True, eps=EPS, disable=True)
    for noise in ("rademacher", "gaussian"):
        est = log_likelihood(
            sde, score, x, eps=EPS, noise=noise, generator=torch.Generator().manual_seed(3), disable=True
        )
        diff = est - exact
        assert (
            diff.std() > 1e-2
        )  # a real estimate (the correlated covariance makes it noisy), not the exact path
        assert diff.mean().abs() < 4 * diff.std() / math.sqrt(len(diff))


def test_log_likelihood_works_for_any_rank():
    sde = VPSDE()
    x = DATA.sample(32, torch.Generator().manual_seed(4))
    flat = log_likelihood(sde, DATA.score_fn(sde), x, exact_divergence=True, disable=True)
    image = log_likelihood(
        sde, DATA.score_fn(sde), x.reshape(32, 1, 1, 2), exact_divergence=True, disable=True
    )
    assert image.shape == (32,)
    torch.testing.assert_close(image, flat, rtol=0, atol=1e-6)


def test_bits_per_dim_explains_score_sdes_constant_7():
    """For 8-bit data on [-1, 1]: bpd = -logp / (D ln 2) + log2(256) - log2(2)."""
    logp, dim = torch.tensor([-3000.0]), 3072
    assert bits_per_dim(logp, dim).item() == pytest.approx(3000 / (dim * math.log(2)) + 7)
    assert bits_per_dim(logp, dim, 256, (0.0, 1.0)).item() == pytest.approx(3000 / (dim * math.log(2)) + 8)


def test_uniform_density_gives_exactly_log2_levels_bits():
    """A uniform density on [0, 1]^D has log p = 0: every bin of 1/K gets probability K^-D."""
    assert bits_per_dim(torch.zeros(1), 10, num_levels=17, value_range=(0.0, 1.0)).item() == pytest.approx(
        math.log2(17)
    )


def test_dequantize_fills_each_bin():
    levels = torch.tensor([0, 3, 16]).repeat(2000)
    y = dequantize(levels, 17, (-1.0, 1.0), torch.Generator().manual_seed(0))
    u = (y + 1) / 2 * 17
    assert ((u >= levels) & (u < levels + 1)).all()
    assert (u - levels).mean().item() == pytest.approx(0.5, abs=0.02)


def test_unknown_options_raise():
    sde = VPSDE()
    x = torch.zeros(2, 2)
    with pytest.raises(MmwbInputError, match="unknown ode solver 'rk4'"):
        log_likelihood(sde, DATA.score_fn(sde), x, solver="rk4")
    with pytest.raises(MmwbInputError, match="unknown Hutchinson noise 'uniform'"):
        log_likelihood(sde, DATA.score_fn(sde), x, noise="uniform")
