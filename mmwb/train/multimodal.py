"""Batches of image-text training sequences: collation (ids, labels, image slots) and the text-only baseline.

The sequences themselves (token ids and labels in the plain or chat format) come from
``mmwb.models.vlm.prompt.make_encoder``, the prompt format generation uses too. Each sequence holds one ``<image>``
token per image; the VLM widens it to the image's feature count when it splices the features in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmwb.models.decoder.model import IGNORE_INDEX
from mmwb.train.grounding import collate_grounding
from mmwb.train.relation_loss import collate_relations


def collate(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ids (``pad_id``) and labels (ignored); stack or pack the image part (``collate_images``)."""
    return collate_text(items, pad_id) | collate_images(items)


def collate_text(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` right-padded with ``pad_id``, ``labels`` with IGNORE_INDEX, and the ``attention_mask``."""
    ids = torch.nn.utils.rnn.pad_sequence(
        [it["input_ids"] for it in items], batch_first=True, padding_value=pad_id
    )
    labels = torch.nn.utils.rnn.pad_sequence(
        [it["labels"] for it in items], batch_first=True, padding_value=IGNORE_INDEX
    )
    lengths = torch.tensor([len(it["input_ids"]) for it in items])
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()  # (B, T)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_images(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The image part of a batch, one image per item.

    Cached items carry ``features`` ``(N_i, C)`` and ``grid_hw``: features are stacked to ``(B, N, C)`` when every
    image has the same token count, else packed to ``(sum N_i, C)`` with ``token_counts``. Uncached items carry
    ``pixel_values`` (one image's processor output) and ``grid_hw`` for native-resolution towers.
    """
    batch = {}
    if "features" in items[0]:
        features = [it["features"] for it in items]
        counts = torch.tensor([len(f) for f in features])
        same = bool((counts == counts[0]).all())
        batch["features"] = torch.stack(features) if same else torch.cat(features)  # (B, N, C) | (sum N, C)
        batch["token_counts"] = counts
    else:
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in items])
    if "cell_labels" in items[0]:  # dense per-token targets of the tower (mmwb.train.cell_loss)
        batch["cell_labels"] = torch.stack([it["cell_labels"] for it in items])  # (B, N, A)
    if "ground_pos" in items[0]:  # attention targets (mmwb.train.grounding)
        batch |= collate_grounding(items)
    if "relation_pos" in items[0]:  # intermediate targets of position questions (mmwb.train.relation_loss)
        batch |= collate_relations(items)
    if "grid_hw" in items[0]:
        batch["grid_hw"] = torch.stack([it["grid_hw"].reshape(2) for it in items])  # (B, 2)
    return batch


def drop_image_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, image_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The right-padded batch without its ``<image>`` tokens: the text-only baseline of the alignment report."""
    keep = attention_mask.bool() & (input_ids != image_token_id)
    pad_id = int(input_ids[~attention_mask.bool()][0]) if not bool(attention_mask.all()) else 0
    rows = [input_ids[b][keep[b]] for b in range(len(input_ids))]
    pad = torch.nn.utils.rnn.pad_sequence
    return (
        pad(rows, batch_first=True, padding_value=pad_id),
        pad([torch.ones_like(row) for row in rows], batch_first=True),
        pad([labels[b][keep[b]] for b in range(len(labels))], batch_first=True, padding_value=IGNORE_INDEX),
    )
