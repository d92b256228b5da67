"""Controllable generation on Gaussian data, where the conditionals are known in closed form; the digits inpainting
example runs."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmwb.errors import MmwbInputError
from mmwb.models.sde import GaussianMixture, classifier_guided_score, colourise, inpaint
from mmwb.sde import VESDE, VPSDE, SubVPSDE, sample

SDES = [VPSDE(), SubVPSDE(), VESDE()]
IDS = ["vp", "subvp", "ve"]
F64 = torch.float64
MEAN = torch.tensor([0.5, -0.5, 1.0, 0.0], dtype=F64)
OBSERVED = torch.tensor([1.5, 0.3], dtype=F64)  # values of pixels 0 and 1; pixels 2 and 3 are generated
MASK = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64).reshape(1, 1, 2, 2)


def _inpaint_gaussian(sde, cov, n=4000):
    data = GaussianMixture.gaussian(MEAN, cov)
    image = torch.cat([OBSERVED, torch.zeros(2, dtype=F64)]).expand(n, 4).reshape(n, 1, 2, 2)
    x, _ = inpaint(
        sde,
        data.score_fn(sde),
        image,
        MASK,
        steps=300,
        generator=torch.Generator().manual_seed(0),
        disable=True,
    )
    return x.reshape(n, 4)


def _conditional(cov):
    """Mean and covariance of pixels 2, 3 given pixels 0, 1 = OBSERVED."""
    k, u = [0, 1], [2, 3]
    gain = cov[u][:, k] @ torch.linalg.inv(cov[k][:, k])
    return MEAN[u] + gain @ (OBSERVED - MEAN[k]), cov[u][:, u] - gain @ cov[k][:, u]


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_inpainting_keeps_known_pixels_and_samples_the_rest(sde):
    """Independent blocks: the replacement method is exact, so the free block follows its marginal."""
    cov = torch.block_diag(
        torch.tensor([[1.0, 0.7], [0.7, 1.0]]), torch.tensor([[1.0, -0.5], [-0.5, 0.8]])
    ).to(F64)
    x = _inpaint_gaussian(sde, cov)
    assert torch.equal(x[:, :2], OBSERVED.expand(len(x), 2))
    mean, cond_cov = _conditional(cov)
    assert (x[:, 2:].mean(0) - mean).abs().max() < 0.08
    assert (torch.cov(x[:, 2:].T) - cond_cov).abs().max() < 0.1


def test_inpainting_follows_correlations_approximately():
    """Correlated pixels: replacement approximates the conditional (Song et al. 2021, app. I.2)."""
    cov = torch.tensor(
        [[1.0, 0.7, 0.3, 0.0], [0.7, 1.0, 0.2, 0.4], [0.3, 0.2, 1.0, -0.5], [0.0, 0.4, -0.5, 0.8]]
    )
    x = _inpaint_gaussian(VPSDE(), cov.to(F64))
    mean, cond_cov = _conditional(cov.to(F64))
    assert (x[:, 2:].mean(0) - mean).abs().max() < 0.1  # the unconditional mean is 0.3 away
    assert (torch.cov(x[:, 2:].T) - cond_cov).abs().max() < 0.1


def test_colourisation_matches_the_grey_image_exactly():
    cov = torch.tensor([[1.0, 0.8, 0.5], [0.8, 1.0, 0.6], [0.5, 0.6, 1.0]], dtype=F64)
    data = GaussianMixture.gaussian(torch.tensor([0.2, 0.0, -0.3], dtype=F64), cov)
    sde = VESDE()
    gray = torch.linspace(-1, 1, 500, dtype=F64).reshape(500, 1, 1, 1)
    x, nfe = colourise(
        sde, data.score_fn(sde), gray, steps=100, generator=torch.Generator().manual_seed(1), disable=True
    )
    assert x.shape == (500, 3, 1, 1) and nfe == 100 * 2 + 1
    torch.testing.assert_close(x.mean(1, keepdim=True), gray)
    assert x.std(1).mean() > 0.05  # the colour directions are generated, not copied


def test_colourise_rejects_colour_input():
    sde = VESDE()
    with pytest.raises(MmwbInputError, match=r"gray must have shape \(B, 1, ...\)"):
        colourise(sde, lambda x, t: -x, torch.zeros(2, 3, 4, 4))


def test_inpaint_rejects_soft_masks():
    sde = VESDE()
    with pytest.raises(MmwbInputError, match="mask must hold only 0"):
        inpaint(sde, lambda x, t: -x, torch.zeros(2, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5))


TWO_CLASSES = GaussianMixture(
    torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=F64),
    torch.stack([torch.tensor([[1.0, 0.5], [0.5, 1.0]]), torch.tensor([[0.5, -0.2], [-0.2, 0.3]])]).to(F64),
    torch.tensor([0.7, 0.3], dtype=F64),
)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_guidance_with_the_exact_classifier_is_the_class_score(sde):
    """grad log p_t(x) + grad log p_t(c | x) = grad log p_t(x | c), at any t."""
    x = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(2)) * 2
    t = torch.rand(64, dtype=F64, generator=torch.Generator().manual_seed(3))
    for label in (0, 1):
        labels = torch.full((64,), label)
        guided = classifier_guided_score(
            TWO_CLASSES.score_fn(sde), lambda x, t: TWO_CLASSES.class_logits(sde, x, t), labels
        )
        torch.testing.assert_close(guided(x, t), TWO_CLASSES.score(sde, x, t, component=label))


def test_guided_sampling_draws_the_requested_class():
    sde = VPSDE()
    labels = torch.ones(2000, dtype=torch.long)  # the rarer class
    guided = classifier_guided_score(
        TWO_CLASSES.score_fn(sde), lambda x, t: TWO_CLASSES.class_logits(sde, x, t), labels
    )
    x, _ = sample(
        sde, guided, (2000, 2), "pc", 200, torch.Generator().manual_seed(4), dtype=F64, disable=True
    )
    assert (x.mean(0) - TWO_CLASSES.means[1]).abs().max() < 0.1
    assert (torch.cov(x.T) - TWO_CLASSES.covs[1]).abs().max() < 0.1


def test_inpaint_digits_pipeline_runs(tmp_path):
    out = tmp_path / "inpaint.png"
    script = Path(__file__).resolve().parents[1] / "pipelines" / "inpaint_digits.py"
    args = [str(script), "--n", "4", "--steps", "10", "--out", str(out)]
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True)
    assert out.is_file() and "top 4 of 8 rows kept, 21 NFE" in done.stdout
    assert "completed" in done.stdout
