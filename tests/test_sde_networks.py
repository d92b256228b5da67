"""Score networks: shapes, the output scaling per SDE, and the epsilon-parameterisation of the DSM loss."""

import pytest
import torch

from mmwb.errors import MmwbConfigError
from mmwb.models.sde import dsm_loss
from mmwb.models.sde.networks import TimeClassifier, default_embedding, mlp_score_model, unet_score_model
from mmwb.sde import VESDE, VPSDE, SubVPSDE


def test_default_embeddings_follow_ncsnpp_and_ddpmpp():
    assert default_embedding(VESDE()) == "fourier"
    assert default_embedding(VPSDE()) == default_embedding(SubVPSDE()) == "positional"


def _scaled_output_spread(model, sde, shape) -> tuple[float, float]:
    """max/min over noise levels of |std * score| and of |score|, at initialisation."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    norms, scaled = [], []
    for t in (1e-4, 0.1, 0.5, 1.0):
        tt = torch.full((shape[0],), t)
        with torch.no_grad():
            score = model(x, tt)
        norms.append(score.norm().item())
        scaled.append((score * sde.std(tt).reshape(-1, *[1] * (len(shape) - 1))).norm().item())
    return max(scaled) / min(scaled), max(norms) / min(norms)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_mlp_score_shape_and_scaling(sde):
    model = mlp_score_model(sde, dim=2, hidden=32, depth=2, embed_dim=16)
    assert model(torch.randn(5, 2), torch.rand(5)).shape == (5, 2)
    scaled_spread, raw_spread = _scaled_output_spread(model, sde, (64, 2))
    assert scaled_spread < 10  # std * score is the O(1) noise prediction at every level...
    assert raw_spread > 50  # ...while the score itself grows like 1 / std


@pytest.mark.parametrize(
    ("sde", "channels", "embedding"),
    [(VESDE(), 1, None), (VPSDE(), 3, None), (SubVPSDE(), 1, "fourier"), (VESDE(), 1, "positional")],
)
def test_unet_score_shape_and_scaling(sde, channels, embedding):
    model = unet_score_model(
        sde, sample_size=8, channels=channels, block_out_channels=(8, 16), embedding=embedding
    )
    assert model.net.unet.config.time_embedding_type == (embedding or default_embedding(sde))
    assert model(torch.randn(2, channels, 8, 8), torch.rand(2)).shape == (2, channels, 8, 8)
    scaled_spread, raw_spread = _scaled_output_spread(model, sde, (2, channels, 8, 8))
    assert scaled_spread < 10
    assert raw_spread > 50


def test_sigma2_loss_is_the_epsilon_loss_for_vp():
    """With score = -eps_hat / std, lambda = std^2 turns DSM into DDPM's |eps_hat - z|^2 (same draws)."""
    sde = VPSDE()
    model = mlp_score_model(sde, dim=2, hidden=32, depth=2, embed_dim=16)
    x0 = torch.randn(256, 2)
    loss = dsm_loss(sde, model, x0, eps=1e-3, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)  # replay dsm_loss's draws: t, then z
    t = 1e-3 + (1 - 1e-3) * torch.rand(256, generator=gen)
    z = torch.randn(x0.shape, generator=gen)
    mean, std = sde.marginal_prob(x0, t)
    eps_hat = model.net(mean + std[:, None] * z, 999 * t)
    torch.testing.assert_close(loss, ((eps_hat - z) ** 2).sum(1).mean())


def test_time_classifier_logits():
    clf = TimeClassifier(in_dim=64, num_classes=10, hidden=32, depth=1, embed_dim=16)
    assert clf(torch.randn(3, 1, 8, 8), torch.rand(3)).shape == (3, 10)


def test_unknown_embedding_raises():
    with pytest.raises(MmwbConfigError, match="unknown time embedding 'learned'"):
        mlp_score_model(VPSDE(), dim=2, embedding="learned")
