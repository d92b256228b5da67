"""The forward SDEs against their closed forms: marginals, transition kernels, inverses, priors, any rank."""

import math

import pytest
import torch

from mmwb.errors import MmwbConfigError
from mmwb.models.sde import GaussianMixture, append_dims
from mmwb.sde import SDE, VESDE, VPSDE, SubVPSDE

SDES = [VPSDE(), SubVPSDE(), VESDE()]
IDS = ["vp", "subvp", "ve"]
MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)


def test_score_sde_parameter_names_and_defaults():
    vp, ve, sub = VPSDE(), VESDE(), SubVPSDE(beta_min=0.2, beta_max=10, N=100)
    assert (vp.beta_0, vp.beta_1, vp.N) == (0.1, 20, 1000)
    assert (ve.sigma_min, ve.sigma_max, ve.N) == (0.01, 50, 1000)
    assert (sub.beta_0, sub.beta_1, sub.N) == (0.2, 10, 100)


@pytest.mark.parametrize(
    "bad", [lambda: VPSDE(beta_min=2, beta_max=1), lambda: VESDE(sigma_min=0), lambda: VPSDE(N=0)]
)
def test_bad_parameters_raise_config_error(bad):
    with pytest.raises(MmwbConfigError):
        bad()


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_moments_follow_the_sde(sde: SDE):
    """For dx = f x dt + g dw: d scale/dt = f scale and d std^2/dt = 2 f std^2 + g^2 (exact, via autograd)."""
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64, requires_grad=True)
    scale, var = sde.scale(t) + 0 * t, sde.std(t) ** 2  # + 0 t: VE's constant scale joins the graph
    (dscale,) = torch.autograd.grad(scale.sum(), t)
    (dvar,) = torch.autograd.grad(var.sum(), t)
    f, g = sde.drift_coef(t), sde.diffusion(t)
    torch.testing.assert_close(dscale, f * scale, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dvar, 2 * f * var + g**2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_simulated_marginals_match_marginal_prob(sde: SDE):
    """Euler-Maruyama on the forward SDE from Gaussian data lands on N(scale mu, scale^2 S + std^2 I)."""
    gen = torch.Generator().manual_seed(0)
    data = GaussianMixture.gaussian(MEAN, COV)
    x0 = data.sample(20000, gen)
    t0 = torch.zeros(x0.shape[0], dtype=x0.dtype)
    mean0, std0 = sde.marginal_prob(x0, t0)  # VE: the data come with sigma_min of noise
    x = mean0 + append_dims(std0, 2) * torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    steps, checkpoints = 1000, {250: 0.25, 500: 0.5, 1000: 1.0}
    for i in range(steps):
        t = torch.full((x.shape[0],), i / steps, dtype=x.dtype)
        drift, diffusion = sde.sde(x, t)
        x = (
            x
            + drift / steps
            + append_dims(diffusion, 2)
            * torch.randn(x.shape, generator=gen, dtype=x.dtype)
            / math.sqrt(steps)
        )
        if i + 1 in checkpoints:
            mean, cov = data.marginal(sde, checkpoints[i + 1])
            scale = cov.diagonal().sqrt().max()
            assert (x.mean(0) - mean).abs().max() < 0.04 * scale
            assert (torch.cov(x.T) - cov).abs().max() < 0.06 * scale**2


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_discretize_is_the_exact_transition(sde: SDE):
    """Chaining discretize over uneven steps reproduces the marginal at the end, any step sizes."""
    gen = torch.Generator().manual_seed(1)
    x0 = torch.full((40000, 1), 0.7, dtype=torch.float64)
    ts = [0.0, 0.05, 0.3, 0.31, 0.8, 1.0]
    mean0, std0 = sde.marginal_prob(x0, torch.zeros(x0.shape[0], dtype=x0.dtype))
    x = mean0 + append_dims(std0, 2) * torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    for t, t_next in zip(ts[:-1], ts[1:]):
        f, g = sde.discretize(x, torch.full((x.shape[0],), t, dtype=x.dtype), t_next - t)
        x = x + f + append_dims(g, 2) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    mean, std = sde.marginal_prob(x0[:1], torch.ones(1, dtype=x0.dtype))
    assert abs(x.mean() - mean[0, 0]) < 4 * std[0] / math.sqrt(x.shape[0])
    assert abs(x.std() / std[0] - 1) < 0.02


def test_vp_discretization_is_the_ddpm_chain():
    """With N uniform steps, G^2 = 1 - exp(-int beta) (exact) ~ score_sde's DDPM betas linspace(b0/N, b1/N, N)."""
    sde = VPSDE(N=1000)
    i = torch.tensor([0, 500, 999])
    t = i.double() / sde.N
    f, g = sde.discretize(torch.ones(3, 1, dtype=torch.float64), t, 1 / sde.N)
    exact = -torch.expm1(-(sde.integrated_beta(t + 1 / sde.N) - sde.integrated_beta(t)))
    torch.testing.assert_close(g**2, exact, rtol=1e-12, atol=0)
    torch.testing.assert_close((1 + f[:, 0]) ** 2, 1 - g**2, rtol=1e-12, atol=1e-12)
    ddpm_betas = torch.linspace(sde.beta_0 / sde.N, sde.beta_1 / sde.N, sde.N, dtype=torch.float64)[i]
    # they differ by where beta is read in the step (left end vs integral) and by O(beta^2)
    torch.testing.assert_close(g**2, ddpm_betas, rtol=0.02, atol=(sde.beta_1 - sde.beta_0) / sde.N**2)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_t_of_sigma_inverts_sigma(sde: SDE):
    t = torch.linspace(1e-4, 1.0, 101, dtype=torch.float64)
    torch.testing.assert_close(sde.t_of_sigma(sde.sigma(t)), t, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_prior_sampling_and_logp_match_the_prior(sde: SDE):
    z = sde.prior_sampling((50000, 3), torch.Generator().manual_seed(2), dtype=torch.float64)
    assert abs(z.std() / sde.prior_std - 1) < 0.01
    expected = torch.distributions.Normal(0.0, sde.prior_std).log_prob(z[:5]).sum(1)
    torch.testing.assert_close(sde.prior_logp(z[:5]), expected)
    # the prior is what p_T is meant to be: the VP/subVP scale at T is small, the VE std at T is sigma_max
    t1 = torch.ones(1)
    assert sde.std(t1).item() == pytest.approx(sde.prior_std, rel=1e-3)


@pytest.mark.parametrize("shape", [(4,), (4, 3), (4, 2, 3, 5)])
@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_any_rank(sde: SDE, shape):
    x, t = torch.randn(shape), torch.rand(shape[0])
    drift, diffusion = sde.sde(x, t)
    mean, std = sde.marginal_prob(x, t)
    f, g = sde.discretize(x, t, 0.01)
    assert drift.shape == mean.shape == f.shape == x.shape
    assert diffusion.shape == std.shape == g.shape == (shape[0],)
    assert sde.prior_logp(x).shape == (shape[0],)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_reverse_sde_and_probability_flow(sde: SDE):
    """Reverse drift is f - g^2 score (ODE: f - g^2 score / 2) and the ODE has no diffusion."""
    x, t = torch.randn(6, 2), torch.rand(6)
    score = lambda x, t: -x * 3.0  # noqa: E731
    f, g = sde.sde(x, t)
    drift, diffusion = sde.reverse(score).sde(x, t)
    ode_drift, ode_diffusion = sde.reverse(score, probability_flow=True).sde(x, t)
    torch.testing.assert_close(drift, f + 3.0 * x * g[:, None] ** 2)
    torch.testing.assert_close(ode_drift, f + 1.5 * x * g[:, None] ** 2)
    torch.testing.assert_close(diffusion, g)
    assert (ode_diffusion == 0).all()
