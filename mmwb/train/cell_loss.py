"""Dense auxiliary supervision of a vision tower trained from scratch: each image token predicts what its cell shows.

Through the language model alone, a new tower learns "what is where" slowly: the caption's loss reaches each token
only through attention. A linear head on the tower's tokens that classifies every cell's attributes (colour, shape,
size of the object covering it, or background; ``mmwb.data.shapes.cell_labels``) gives every token a direct
gradient. The head exists only in training (it is part of the trainer's module and its checkpoints, never of the
saved VLM). Issue 19's measurement, a 1.1 M-parameter shapes VLM after 4 minutes of training: caption exact match
0.47 without the head, 0.76 with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class CellHead(nn.Module):
    """``(B, N, C)`` tower tokens -> one set of logits per attribute; ``loss`` sums the attributes' cross entropies
    (each a mean over the ``B * N`` cells)."""

    def __init__(self, width: int, classes: Sequence[int]) -> None:
        super().__init__()
        self.classes = tuple(classes)  # per attribute, background included
        self.linear = nn.Linear(width, sum(self.classes))

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``tokens (B, N, C)``, ``labels (B, N, A)`` int64 -> scalar loss."""
        if tokens.shape[:2] != labels.shape[:2] or labels.shape[2] != len(self.classes):
            raise ValueError(f"cell labels {tuple(labels.shape)} do not fit tokens {tuple(tokens.shape)}")
        logits = self.linear(tokens).float().split(self.classes, dim=-1)  # A x (B, N, K_a)
        return sum(
            F.cross_entropy(part.flatten(0, 1), labels[..., a].flatten()) for a, part in enumerate(logits)
        )
