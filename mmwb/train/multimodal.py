"""Token ids, labels and image slots of image-text training sequences, and their collation.

Stage 1 (alignment) uses LLaVA's *plain* format: ``<bos> <image> caption <eos>``, loss on the caption and its end.
Stage 2 (instruction tuning) uses the chat format ``<bos> <|user|> <image> q1 <|assistant|> a1 <eos> <|user|> q2
<|assistant|> a2 <eos> ...`` (each answer after mmwb.models.vlm.prompt's ``ANSWER_PREFIX``), loss on the assistant
turns (answers and their ``<eos>``) only. Each sequence holds one ``<image>`` token per image; the VLM widens it to
the image's feature count when it splices the features in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from mmwb.data.captions import ImageTextRecord
from mmwb.data.tokenizer import ASSISTANT, IMAGE, USER
from mmwb.errors import MmwbInputError
from mmwb.models.decoder.model import IGNORE_INDEX
from mmwb.models.vlm.prompt import ANSWER_PREFIX


def make_encoder(
    tokenizer: PreTrainedTokenizerBase, style: Literal["plain", "chat"], max_length: int
) -> Callable[[ImageTextRecord], dict[str, torch.Tensor]]:
    """``record -> {"input_ids", "labels"}`` (1-D long tensors) in the stage's format, cut at ``max_length``."""
    special = {name: _token_id(tokenizer, name) for name in (IMAGE, USER, ASSISTANT)}
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def text_ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids if text else []

    def encode(record: ImageTextRecord) -> dict[str, torch.Tensor]:
        pieces: list[tuple[list[int], bool]] = [([bos, special[IMAGE]], False)]  # (ids, trained on)
        if style == "plain":
            pieces.append(([*text_ids(record.caption), eos], True))
        else:
            for index, turn in enumerate(record.turns):
                if turn.role == "user":
                    prefix = [special[USER]] if index else []  # the first user turn follows the image
                    pieces.append(([*prefix, *text_ids(turn.text), special[ASSISTANT]], False))
                else:
                    pieces.append(([*text_ids(ANSWER_PREFIX + turn.text), eos], True))
            pieces[0] = ([bos, special[USER], special[IMAGE]], False)
        ids = [i for piece, _ in pieces for i in piece][:max_length]
        labels = [i if trained else IGNORE_INDEX for piece, trained in pieces for i in piece][:max_length]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}

    return encode


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise MmwbInputError(
            f"the tokenizer has no {token!r} token; use a tokenizer with mmwb's special tokens"
        )
    return int(token_id)


def collate(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ids (``pad_id``) and labels (ignored); stack or pack the image part.

    Cached items carry ``features`` ``(N_i, C)`` and ``grid_hw``: features are stacked to ``(B, N, C)`` when every
    image has the same token count, else packed to ``(sum N_i, C)`` with ``token_counts``. Uncached items carry
    ``pixel_values`` (one image's processor output) and ``grid_hw`` for native-resolution towers.
    """
    ids = torch.nn.utils.rnn.pad_sequence(
        [it["input_ids"] for it in items], batch_first=True, padding_value=pad_id
    )
    labels = torch.nn.utils.rnn.pad_sequence(
        [it["labels"] for it in items], batch_first=True, padding_value=IGNORE_INDEX
    )
    lengths = torch.tensor([len(it["input_ids"]) for it in items])
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()  # (B, T)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if "features" in items[0]:
        features = [it["features"] for it in items]
        counts = torch.tensor([len(f) for f in features])
        same = bool((counts == counts[0]).all())
        batch["features"] = torch.stack(features) if same else torch.cat(features)  # (B, N, C) | (sum N, C)
        batch["token_counts"] = counts
    else:
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in items])
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
