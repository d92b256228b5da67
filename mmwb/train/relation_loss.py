"""Intermediate targets for relative-position questions: the two facts whose agreement is the answer.

"Is the red circle right of the blue square?" is yes exactly when two facts agree: whether the asked relation
points forward along its axis ("left of", "above") and whether the first named object lies before the second
along that axis. Each fact alone says nothing about the answer (questions name either object first and ask
either direction at random), so the answer's loss gives neither a gradient of its own: a parity that gradient
descent leaves at chance (issue 19: position 0.44-0.63 in every run, an outside replica too, while every lookup
of one object reached 1.00; a linear probe on the answer position of such a model read the order of the two
objects at 0.60). Here a linear head on the decoder's stream at the answer position, the input of one layer,
predicts both facts, so the layers below learn to compute them there and the layers above only combine two
clean bits: position 0.48 -> 0.98-1.00 on seeds 0-2 (the tiny-shapes model card). The head exists only in
training, like ``mmwb.train.cell_loss``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmwb.data.captions import ImageTextRecord
from mmwb.data.shapes import asked_relation
from mmwb.errors import MmwbConfigError, MmwbInputError
from mmwb.train.grounding import NO_POSITION, answer_query_positions, pad_targets


@dataclass
class RelationLossConfig:
    """Whose input (``layer``, 0-based) the head reads at the answer position, and how much its loss weighs."""

    layer: int = 3
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise MmwbConfigError(f"relation_loss.layer must be >= 1 (a layer's input), got {self.layer}")
        if self.weight < 0:
            raise MmwbConfigError(f"relation_loss.weight must be >= 0, got {self.weight}")


def relation_facts(question: str, refers: tuple[int, ...], centres: np.ndarray) -> tuple[bool, bool] | None:
    """(the asked relation points forward, the first named object lies before the second along its axis) for a
    question that names two objects and asks how they lie; None for any other. ``centres (objects, 2)``: x, y."""
    relation = asked_relation(question)
    if relation is None or len(refers) != 2:
        return None
    axis, forward = relation
    first, second = (centres[i, axis] for i in refers)
    return forward, bool(first < second)


def with_relations(
    encode: Callable[[ImageTextRecord], dict[str, torch.Tensor]], centres: dict[str, np.ndarray]
) -> Callable[[ImageTextRecord], dict[str, torch.Tensor]]:
    """``encode`` whose items also carry ``relation_pos (K,)``, the positions that predict the answers of
    relative-position questions (counted before the image is widened), and ``relation_facts (K, 2)`` float, their
    two facts (``relation_facts``). ``centres``: image path -> ``(objects, 2)`` object centres."""

    def encode_with_relations(record: ImageTextRecord) -> dict[str, torch.Tensor]:
        item = encode(record)
        if record.image not in centres:
            raise MmwbInputError(f"{record.image}: no objects listed for this image, so no relation targets")
        asked = [turn for turn in record.turns if turn.role == "user"]
        positions, facts = [], []
        for end, turn in zip(answer_query_positions(item["labels"]), asked, strict=False):
            found = relation_facts(turn.text, turn.refers, centres[record.image])
            if found is not None:
                positions.append(end)
                facts.append(found)
        return {**item, "relation_pos": torch.tensor(positions, dtype=torch.long),
                "relation_facts": torch.tensor(facts, dtype=torch.float32).reshape(-1, 2)}  # fmt: skip

    return encode_with_relations


def collate_relations(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``relation_pos (B, K)`` padded with NO_POSITION and ``relation_facts (B, K, 2)`` with 0."""
    return {
        "relation_pos": pad_targets(items, "relation_pos", NO_POSITION),
        "relation_facts": pad_targets(items, "relation_facts", 0.0),
    }


class RelationHead(nn.Module):
    """A linear read of the two facts from the decoder's stream as it enters decoder layer ``layer``."""

    def __init__(self, language_model: nn.Module, layer: int) -> None:
        super().__init__()
        blocks = language_model.model.layers
        if not 0 < layer < len(blocks):
            raise MmwbConfigError(f"relation_loss: layer {layer} of a {len(blocks)}-layer decoder")
        self.layer = layer
        self.linear = nn.Linear(language_model.config.hidden_size, 2)
        self.stream: torch.Tensor | None = None  # (B, T, C), kept by ``watching``

    @contextmanager
    def watching(self, language_model: nn.Module) -> Iterator[None]:
        """Keep the input of the decoder layer ``self.layer`` at each forward inside the block."""
        hook = lambda _, args: setattr(self, "stream", args[0])  # noqa: E731
        handle = language_model.model.layers[self.layer].register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def loss(
        self, image_start: torch.Tensor, image_tokens: int, positions: torch.Tensor, facts: torch.Tensor
    ) -> torch.Tensor:
        """Mean binary cross entropy of both facts over the supervised positions (0 if none). ``image_start (B,)``
        and ``image_tokens`` widen ``positions (B, K)``, counted before the image, as in ``grounding_loss``."""
        used = positions > image_start[:, None]  # padding is NO_POSITION
        if not used.any():  # a zero that still involves the head, so each DDP process sends it a gradient
            return self.linear.weight.sum() * 0.0
        widened = torch.where(used, positions + image_tokens - 1, 0)
        stream = self.stream.gather(1, widened[..., None].expand(-1, -1, self.stream.shape[-1]))  # (B, K, C)
        logits = self.linear(stream[used]).float()  # (S, 2)
        return F.binary_cross_entropy_with_logits(logits, facts[used])
