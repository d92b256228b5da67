"""Every sampler, given the exact score of Gaussian data, recovers the data's mean and covariance; NFE is honest."""

import pytest
import torch

from mmwb.errors import MmwbInputError
from mmwb.models.sde import SAMPLERS, GaussianMixture, karras_times, ode, ode_torch, uniform_times
from mmwb.sde import VESDE, VPSDE, SubVPSDE, sample

SDES = [VPSDE(), SubVPSDE(), VESDE()]
IDS = ["vp", "subvp", "ve"]
MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)  # correlated: a wrong score term shows
DATA = GaussianMixture.gaussian(MEAN, COV)
STEPS = {
    "euler_maruyama": 500,
    "reverse_diffusion": 500,
    "ancestral": 500,
    "pc": 250,
    "heun": 40,
}  # first order: bias ~ 1/steps


class Counting:
    """A score function that counts its (batched) calls."""

    def __init__(self, score_fn):
        self.score_fn, self.calls = score_fn, 0

    def __call__(self, x, t):
        assert t.shape == (x.shape[0],)
        self.calls += 1
        return self.score_fn(x, t)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_sampler_recovers_gaussian_mean_and_covariance(sde, sampler):
    x, nfe = sample(
        sde,
        DATA.score_fn(sde),
        (4000, 2),
        sampler,
        STEPS.get(sampler),
        torch.Generator().manual_seed(0),
        disable=True,
    )
    x = x.double()
    assert x.shape == (4000, 2) and torch.isfinite(x).all()
    assert (x.mean(0) - MEAN).abs().max() < 0.08  # sampling error alone: ~0.016
    assert (torch.cov(x.T) - COV).abs().max() < 0.1  # sampling error alone: ~0.02
    assert nfe > 0


@pytest.mark.parametrize("predictor", ["euler_maruyama", "ancestral"])
def test_predictor_corrector_combinations(predictor):
    sde = VESDE()
    gen = torch.Generator().manual_seed(1)
    x, nfe = sample(
        sde, DATA.score_fn(sde), (4000, 2), "pc", 200, gen, predictor=predictor, snr=0.1, disable=True
    )
    assert nfe == 2 * 200 + 1
    assert (x.double().mean(0) - MEAN).abs().max() < 0.08
    assert (torch.cov(x.double().T) - COV).abs().max() < 0.1


def test_wrong_score_is_caught():
    """The tolerance above is meaningful: a score for a slightly different covariance fails it."""
    wrong = GaussianMixture.gaussian(MEAN, COV * 1.3)
    sde = VPSDE()
    x, _ = sample(
        sde, wrong.score_fn(sde), (4000, 2), "ode", generator=torch.Generator().manual_seed(0), disable=True
    )
    assert (torch.cov(x.double().T) - COV).abs().max() > 0.1


@pytest.mark.parametrize(
    ("sampler", "steps", "options", "expected"),
    [
        ("pc", 10, {"corrector_steps": 2}, 10 * 3 + 1),
        ("pc", 10, {"denoise": False}, 10 * 2),
        ("euler_maruyama", 7, {}, 7 + 1),
        ("reverse_diffusion", 7, {}, 7 + 1),
        ("ancestral", 7, {"denoise": False}, 7),
        ("heun", 10, {}, 2 * 10 + 1),
        ("ode", None, {}, None),
        ("ode_torch", None, {}, None),
    ],
)
def test_nfe_counts_score_evaluations(sampler, steps, options, expected):
    sde = VPSDE()
    score = Counting(DATA.score_fn(sde))
    _, nfe = sample(
        sde, score, (16, 2), sampler, steps, torch.Generator().manual_seed(0), disable=True, **options
    )
    assert nfe == score.calls
    if expected is not None:
        assert nfe == expected


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_samplers_share_one_signature(sampler):
    sde = VESDE()
    fn = SAMPLERS[sampler]
    x = sde.prior_sampling((8, 2), torch.Generator().manual_seed(0))
    out, nfe = fn(
        sde,
        DATA.score_fn(sde),
        x,
        uniform_times(sde, 5, sde.eps),
        generator=torch.Generator(),
        disable=True,
        denoise=False,
    )
    assert out.shape == x.shape and isinstance(nfe, int)


@pytest.mark.parametrize("sampler", ["pc", "heun"])
def test_any_rank_and_reproducible(sampler):
    """Image-shaped samples (B, 1, 2, 1) work; a seed fixes the result, another seed changes it."""
    sde = SubVPSDE()
    score = DATA.score_fn(sde)
    a, _ = sample(sde, score, (3000, 1, 2, 1), sampler, 60, torch.Generator().manual_seed(5), disable=True)
    b, _ = sample(sde, score, (3000, 1, 2, 1), sampler, 60, torch.Generator().manual_seed(5), disable=True)
    c, _ = sample(sde, score, (3000, 1, 2, 1), sampler, 60, torch.Generator().manual_seed(6), disable=True)
    assert a.shape == (3000, 1, 2, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.reshape(3000, 2).double().mean(0) - MEAN).abs().max() < 0.08


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_scipy_and_torch_ode_solvers_agree(sde):
    x = sde.prior_sampling((64, 2), torch.Generator().manual_seed(3), dtype=torch.float64)
    ts = uniform_times(sde, 1, sde.eps)
    a, nfe_a = ode(sde, DATA.score_fn(sde), x, ts, rtol=1e-7, atol=1e-7, disable=True)
    b, nfe_b = ode_torch(sde, DATA.score_fn(sde), x, ts, rtol=1e-7, atol=1e-7, disable=True)
    assert (a - b).abs().max() < 1e-4
    assert nfe_a > 10 and nfe_b > 10


def test_heun_converges_to_the_ode_solution():
    """Second order: doubling the steps cuts the error about four-fold."""
    sde = VPSDE()
    x = sde.prior_sampling((256, 2), torch.Generator().manual_seed(4), dtype=torch.float64)
    ref, _ = ode(
        sde, DATA.score_fn(sde), x, uniform_times(sde, 1, sde.eps), rtol=1e-9, atol=1e-9, disable=True
    )
    heun = SAMPLERS["heun"]
    errors = [
        (heun(sde, DATA.score_fn(sde), x, karras_times(sde, n, sde.eps), disable=True)[0] - ref).abs().max()
        for n in (20, 40, 80)
    ]
    assert errors[2] < errors[1] / 3 < errors[0] / 9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampler": "nope"}, "unknown sampler 'nope'"),
        ({"sampler": "ode", "snr": 0.1}, "sampler 'ode' has no option 'snr'"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"eps": 0.0}, "eps must lie in"),
        ({"schedule": "cosine"}, "unknown schedule 'cosine'"),
        ({"predictor": "heun"}, "unknown predictor 'heun'"),
    ],
)
def test_bad_arguments_name_the_culprit(kwargs, match):
    sde = VPSDE()
    with pytest.raises(MmwbInputError, match=match):
        sample(sde, DATA.score_fn(sde), (4, 2), **{"steps": 3, "disable": True, **kwargs})
