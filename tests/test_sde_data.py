"""Toy 2-D sets, scikit-learn digits and the sliced Wasserstein metric."""

import math

import pytest
import torch

from mmwb.data.digits import NUM_LEVELS, load_digits_tensors
from mmwb.data.toy2d import (
    EIGHT_GAUSSIANS_STD,
    TOY2D,
    eight_gaussians_centres,
    eight_gaussians_log_prob,
    toy2d,
)
from mmwb.errors import MmwbInputError
from mmwb.models.sde import GaussianMixture, sliced_wasserstein
from mmwb.sde import VPSDE


@pytest.mark.parametrize("name", sorted(TOY2D))
def test_toy_sets_are_seeded_2d_points(name):
    a = toy2d(name, 1000, torch.Generator().manual_seed(0))
    b = toy2d(name, 1000, torch.Generator().manual_seed(0))
    c = toy2d(name, 1000, torch.Generator().manual_seed(1))
    assert a.shape == (1000, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() < 6


def test_checkerboard_fills_only_the_dark_squares():
    x = toy2d("checkerboard", 20000, torch.Generator().manual_seed(0))
    cells = torch.floor(x / 2).long() + 2  # (N, 2) square indices 0..3
    assert (cells.sum(1) % 2 == 0).all()  # one colour of the board only
    assert torch.unique(cells, dim=0).shape[0] == 8


def test_eight_gaussians_log_prob_is_the_mixture_density():
    x = toy2d("8gaussians", 500, torch.Generator().manual_seed(0)).double()
    covs = torch.eye(2, dtype=torch.float64).expand(8, 2, 2) * EIGHT_GAUSSIANS_STD**2
    mixture = GaussianMixture(eight_gaussians_centres(), covs)
    sde = VPSDE()  # at t = 0 the VP marginal is the data distribution itself
    torch.testing.assert_close(
        eight_gaussians_log_prob(x), mixture.log_prob(sde, x, torch.zeros(500, dtype=x.dtype))
    )
    grid = torch.linspace(-5, 5, 401, dtype=torch.float64)
    points = torch.cartesian_prod(grid, grid)
    mass = eight_gaussians_log_prob(points).exp().sum() * (grid[1] - grid[0]) ** 2
    assert mass.item() == pytest.approx(1.0, abs=1e-3)


def test_unknown_toy_set_raises():
    with pytest.raises(MmwbInputError, match="unknown toy data set 'spiral'"):
        toy2d("spiral", 10)


def test_digits_split_is_fixed_disjoint_and_stratified():
    train, test = load_digits_tensors("train"), load_digits_tensors("test")
    assert train.images.shape[1:] == (1, 8, 8) and len(train.labels) + len(test.labels) == 1797
    assert len(test.labels) == math.ceil(0.2 * 1797)
    assert torch.equal(load_digits_tensors("train").images, train.images)
    train_rows = {tuple(r) for r in train.levels.flatten(1).tolist()}
    overlap = sum(tuple(r) in train_rows for r in test.levels.flatten(1).tolist())
    assert overlap <= 2  # the set holds a few duplicate images; no index is shared
    assert torch.bincount(test.labels, minlength=10).min() >= 35
    assert not torch.equal(load_digits_tensors("test", seed=1).labels, test.labels)


def test_digits_scaling_and_resizing():
    unit = load_digits_tensors("test")
    symmetric = load_digits_tensors("test", value_range="symmetric")
    assert unit.levels.min() == 0 and unit.levels.max() == NUM_LEVELS - 1
    torch.testing.assert_close(unit.images, unit.levels.float() / 16)
    torch.testing.assert_close(symmetric.images, unit.images * 2 - 1)
    big = load_digits_tensors("test", size=16)
    assert big.images.shape[1:] == (1, 16, 16)
    torch.testing.assert_close(big.levels, unit.levels.repeat_interleave(2, 2).repeat_interleave(2, 3))
    padded = load_digits_tensors("test", size=12, resize="pad")
    assert torch.equal(padded.levels[:, :, 2:10, 2:10], unit.levels)
    assert padded.levels[:, :, :2].sum() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "val"}, "unknown split"),
        ({"size": 12}, "multiple of 8"),
        ({"value_range": "byte"}, "value_range"),
    ],
)
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(MmwbInputError, match=match):
        load_digits_tensors(**kwargs)


def test_sliced_wasserstein_of_a_shift():
    """Shifting a set by v moves every projection by <u, v>: SW_2 = |v| / sqrt(D) on average over u."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 4, generator=gen, dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    sw = sliced_wasserstein(x, x + shift, projections=4000, generator=gen)
    assert sw.item() == pytest.approx(shift.norm().item() / 2, rel=0.05)
    assert sliced_wasserstein(x, x, generator=gen).item() == 0
    other = torch.randn(1500, 4, generator=gen, dtype=torch.float64)
    assert sliced_wasserstein(x, other, generator=gen).item() < 0.1  # same law, different sizes
    with pytest.raises(MmwbInputError, match="sliced_wasserstein"):
        sliced_wasserstein(x, x[:, :2])


def test_density_metrics_score_samples_under_the_exact_density():
    from mmwb.models.sde.data import density_metrics
    from mmwb.models.sde.trained import DataSpec

    gen = torch.Generator().manual_seed(0)
    gaussians, board = DataSpec(name="8gaussians"), DataSpec(name="checkerboard")
    real = toy2d("8gaussians", 20000, gen)
    entropy = math.log(8) + math.log(2 * math.pi * math.e * EIGHT_GAUSSIANS_STD**2)  # separated components
    assert density_metrics(gaussians, real)["sample_nll"] == pytest.approx(entropy, abs=0.03)
    assert density_metrics(gaussians, 1.2 * real)["sample_nll"] > entropy + 1  # spread too wide
    squares = toy2d("checkerboard", 2000, gen)
    assert density_metrics(board, squares) == {"in_support": 1.0}
    assert density_metrics(board, squares + torch.tensor([2.0, 0.0])) == {"in_support": 0.0}  # light squares
    assert density_metrics(DataSpec(name="moons"), real) == {}  # density unknown
