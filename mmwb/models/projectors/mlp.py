"""LLaVA-1.5's ``mlp2x_gelu`` projector: Linear -> GELU -> Linear on every image token."""

from __future__ import annotations

from torch import nn

from mmwb.models.vision.base import VisionFeatures


class MLP2xGelu(nn.Module):
    """Token-wise map from the tower's width to the language model's; keeps token counts and layout."""

    def __init__(self, vision_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, features: VisionFeatures) -> VisionFeatures:
        return features.with_features(self.linear_2(self.act(self.linear_1(features.features))))
