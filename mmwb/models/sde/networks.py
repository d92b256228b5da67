"""Score networks: an MLP with a time embedding for low-dimensional data, diffusers' UNet2DModel for images.

``ScoreModel`` turns a network into ``score_fn(x, t)`` with the output scaling each SDE wants, following the
two conventions of Song et al. 2021:

- ``"fourier"`` (NCSN++, the VE default): the net sees ``std(t)`` through Gaussian Fourier features of its log
  and divides its output by ``std`` itself (diffusers' UNet2DModel does this for ``time_embedding_type=
  "fourier"``; ``TimeMLP`` mirrors it), so ``score = -net(x, std)``.
- ``"positional"`` (DDPM++, the VP/sub-VP default): the net sees ``999 t`` (DDPM's step index range) through
  sinusoidal features and predicts the noise, so ``score = -net(x, 999 t) / std``.

Either way ``std * score`` is the negated noise prediction, which makes the ``"sigma2"`` DSM loss DDPM's
epsilon loss and keeps the network's output of order one at every noise level.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from diffusers.models.embeddings import GaussianFourierProjection, Timesteps
from torch import nn
from torch.nn import functional as F

from mmwb.errors import MmwbConfigError
from mmwb.models.sde.sdes import SDE, VESDE

EMBEDDINGS = ("fourier", "positional")
DDPM_STEPS = 1000  # positional embeddings see t scaled to DDPM's step indices 0..999
FOURIER_SCALE = 16.0  # NCSN++'s fourier_scale


def default_embedding(sde: SDE) -> str:
    """NCSN++'s Fourier embedding for VE, DDPM++'s positional one for VP and sub-VP."""
    return "fourier" if isinstance(sde, VESDE) else "positional"


def _check_embedding(embedding: str) -> None:
    if embedding not in EMBEDDINGS:
        raise MmwbConfigError(f"unknown time embedding {embedding!r}; choose from {EMBEDDINGS}")


def time_embedding(embedding: str, dim: int) -> nn.Module:
    """``(B,)`` conditioning values to ``(B, dim)`` features: Fourier features of ``log c`` or sinusoids of ``c``."""
    _check_embedding(embedding)
    if embedding == "fourier":
        return GaussianFourierProjection(dim // 2, scale=FOURIER_SCALE, log=True)
    return Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)


class TimeMLP(nn.Module):
    """A residual SiLU MLP on flattened inputs with an added time embedding; ``(B, ...), (B,) -> (B, out_dim)``.

    Used as the score net of 2-D toy data and as the noise-conditioned classifier for guidance. With the
    Fourier embedding the output is divided by the conditioning ``c = std``, as diffusers' UNet does.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: int = 128,
        depth: int = 3,
        embed_dim: int = 64,
        embedding: str = "positional",
    ):
        super().__init__()
        self.embedding = embedding
        self.embed = time_embedding(embedding, embed_dim)
        self.time = nn.Sequential(nn.Linear(embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(1)) + self.time(self.embed(c).to(x.dtype))  # (B, hidden)
        for block in self.blocks:
            h = h + block(F.silu(h))
        out = self.out(F.silu(h))
        return out / c[:, None] if self.embedding == "fourier" else out


class UNetNet(nn.Module):
    """diffusers' UNet2DModel called as ``net(x, c) -> tensor``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.unet(x, c, return_dict=False)[0]


class ScoreModel(nn.Module):
    """``score(x, t)`` from a network ``net(x, c)``; see the module docstring for the two conventions."""

    def __init__(self, sde: SDE, net: nn.Module, embedding: str):
        super().__init__()
        _check_embedding(embedding)
        self.sde, self.net, self.embedding = sde, net, embedding

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        std = self.sde.std(t)  # (B,)
        if self.embedding == "fourier":
            return -self.net(x, std).reshape(x.shape)
        eps_hat = self.net(x, (DDPM_STEPS - 1) * t).reshape(x.shape)
        return -eps_hat / std.reshape(std.shape + (1,) * (x.ndim - 1))


class TimeClassifier(nn.Module):
    """``classifier(x, t) -> logits``: a ``TimeMLP`` on noisy inputs, positional time embedding of ``999 t``."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 128, depth: int = 3, embed_dim: int = 64):
        super().__init__()
        self.net = TimeMLP(in_dim, num_classes, hidden, depth, embed_dim, "positional")

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, (DDPM_STEPS - 1) * t)


def mlp_score_model(
    sde: SDE, dim: int, hidden: int = 128, depth: int = 3, embed_dim: int = 64, embedding: str | None = None
) -> ScoreModel:
    """A ``TimeMLP`` score model for ``(B, dim)`` data."""
    embedding = default_embedding(sde) if embedding is None else embedding
    return ScoreModel(sde, TimeMLP(dim, dim, hidden, depth, embed_dim, embedding), embedding)


def unet_score_model(
    sde: SDE,
    sample_size: int,
    channels: int,
    block_out_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    attention: bool = True,
    embedding: str | None = None,
) -> ScoreModel:
    """A UNet2DModel score model for ``(B, channels, sample_size, sample_size)`` images.

    Attention sits in the lowest-resolution block (as in DDPM++/NCSN++ at 16x16 and below); the group-norm
    group count is the largest of 32, 16, 8, 4, 2, 1 that divides every width, so tiny test nets build too.
    """
    embedding = default_embedding(sde) if embedding is None else embedding
    _check_embedding(embedding)
    levels = len(block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in block_out_channels))
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        time_embedding_type=embedding,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        norm_num_groups=groups,
        attention_head_dim=min(8, block_out_channels[-1]),
    )
    return ScoreModel(sde, UNetNet(unet), embedding)
