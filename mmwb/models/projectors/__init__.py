"""Projectors from vision features to language-model embeddings, by the names configs use."""

from torch import nn

from mmwb.errors import MmwbConfigError
from mmwb.models.projectors.mlp import MLP2xGelu
from mmwb.models.projectors.pixel_shuffle import PixelShuffleMLP
from mmwb.models.projectors.qformer import QFormer, QFormerConfig, QFormerSize

PROJECTORS = {"mlp2x_gelu": MLP2xGelu, "pixel_shuffle_mlp": PixelShuffleMLP, "qformer": QFormer}


def make_projector(
    name: str,
    vision_dim: int,
    out_dim: int,
    vocab_size: int,
    pad_token_id: int,
    qformer: QFormerSize | None = None,
) -> nn.Module:
    """A new projector by its config name; a Q-Former also embeds instructions in the language model's
    vocabulary (``vocab_size``, ``pad_token_id``) and takes its shape from ``qformer``."""
    if name not in PROJECTORS:
        raise MmwbConfigError(f"projector {name!r} is not one of {sorted(PROJECTORS)}")
    if name == "qformer":
        size = qformer or QFormerSize()
        return QFormer(QFormerConfig.for_vlm(size, vision_dim, out_dim, vocab_size, pad_token_id))
    return PROJECTORS[name](vision_dim, out_dim)


__all__ = [
    "PROJECTORS",
    "MLP2xGelu",
    "PixelShuffleMLP",
    "QFormer",
    "QFormerConfig",
    "QFormerSize",
    "make_projector",
]
