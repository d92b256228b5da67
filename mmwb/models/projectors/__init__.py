"""Projectors from vision features to language-model embeddings, by the names configs use."""

from mmwb.models.projectors.mlp import MLP2xGelu
from mmwb.models.projectors.pixel_shuffle import PixelShuffleMLP
from mmwb.models.projectors.qformer import QFormer, QFormerConfig

PROJECTORS = {"mlp2x_gelu": MLP2xGelu, "pixel_shuffle_mlp": PixelShuffleMLP, "qformer": QFormer}

__all__ = ["PROJECTORS", "MLP2xGelu", "PixelShuffleMLP", "QFormer", "QFormerConfig"]
