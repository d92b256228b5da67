"""Attention supervision: each word that names an object looks at that object.

A question such as "what colour is the triangle?" is answered by one lookup: attend to the triangle's image tokens,
read their colour. A small decoder trained only on the answer's loss finds that lookup late or never (issue 19:
the colour of a named shape stayed at 0.62, a colour present in the scene but the named object's only by chance,
in every run whose language model had not learnt to look words up in its text). Grounding datasets say which
image region a phrase refers to; shapes QA does too (``refers``: the objects a question names, in order;
``anchors``: where the words naming each end; ``mmwb.data.shapes.object_cells``: the cells each covers). This
loss gives chosen heads that lookup as a direct target: at the last token of each naming word ("triangle", "red"
in "the red object", "circle" in "the red circle"), every supervised head should put its attention on the named
object's cells; the loss is ``-log`` of that attention mass, averaged over every supervised head and position.
The word's own token is where the lookup is one step (its query holds the word). ``answer_heads`` also supervise the
position that predicts the answer: the r-th of them looks at the question's r-th named object, so the answer reads
both objects of "is the red circle left of the blue square?" directly; with ``captions``, in a caption (the answer
to a user turn of kind "caption") the first answer head looks, at each position that predicts a word of an object's
phrase, at that object (the caption names the objects in their order), so "which object comes next" is a lookup too.
Questions that name no object (counts, "is there a ...?" when there is none) add nothing. Issue 19's runs (the
tiny-shapes model card): with the naming words grounded, the colour of a named shape went from 0.63 to 1.00 and VQA
from 0.83 to 0.97; with the answer heads as well, colours were right by step 1000 of 2400 instead of after it; with
the caption's phrases too, three-object captions went from 0.934 to 0.988 exact (in 2000 steps instead of 2400).

The loss repeats the supervised layers' q and k projections outside their forward, so it runs on one process or
under DDP; FSDP-sharded decoders are not supported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from mmwb.data.captions import ImageTextRecord
from mmwb.data.shapes import caption_words
from mmwb.errors import MmwbConfigError, MmwbInputError
from mmwb.models.decoder.attention import GroupedQueryAttention
from mmwb.models.decoder.model import IGNORE_INDEX
from mmwb.models.vlm.prompt import answer_text, user_text

NO_POSITION = -1  # padding of ``ground_pos``


@dataclass
class GroundingConfig:
    """Which heads (``[layer, head]``) look, at each naming word, at the object it names; which look, at the
    position that predicts the answer, at the question's first, second ... named object (``answer_heads``); and how
    much the loss weighs."""

    heads: list[tuple[int, int]] = field(default_factory=lambda: [(1, 0)])
    answer_heads: list[tuple[int, int]] = field(default_factory=list)
    captions: bool = False  # the first answer head also looks, in captions, at the object being described
    weight: float = 1.0

    def __post_init__(self) -> None:
        self.heads = [tuple(h) for h in self.heads]  # type: ignore[misc]
        self.answer_heads = [tuple(h) for h in self.answer_heads]  # type: ignore[misc]
        if any(len(h) != 2 for h in (*self.heads, *self.answer_heads)) or not (
            self.heads or self.answer_heads
        ):
            got = f"{self.heads} / {self.answer_heads}"
            raise MmwbConfigError(f"grounding.heads / answer_heads: lists of [layer, head] pairs, got {got}")
        if self.weight < 0:
            raise MmwbConfigError(f"grounding.weight must be >= 0, got {self.weight}")
        if self.captions and not self.answer_heads:
            raise MmwbConfigError(
                "grounding.captions supervises the first of answer_heads: list at least one"
            )


def answer_query_positions(labels: torch.Tensor) -> list[int]:
    """The positions that predict each answer's first token (the one before each run of labelled tokens): the
    last token of each user turn."""
    trained = (labels != IGNORE_INDEX).tolist()
    return [p - 1 for p in range(1, len(trained)) if trained[p] and not trained[p - 1]]


def with_grounding(
    encode: Callable[[ImageTextRecord], dict[str, torch.Tensor]],
    cells: dict[str, np.ndarray],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    image: str,
    bos: str,
    captions: bool = False,
) -> Callable[[ImageTextRecord], dict[str, torch.Tensor]]:
    """``encode`` whose items also carry the supervised positions ``ground_pos (M,)`` (counted before the image is
    widened), what each should look at, ``ground_cells (M, N)``, and whose look it is, ``ground_role (M,)``: 0 for
    the last token of a word that names an object (``Turn.anchors``), r + 1 for the position that predicts an
    answer, looking at the question's r-th named object; with ``captions``, role 1 also at each position that
    predicts a word of a caption's object phrase (``caption_targets``). ``cells``: image path -> ``(objects, N)``
    bool, as ``object_cells`` gives them; ``template``, ``image`` and ``bos`` as ``make_encoder`` had them, to
    count the tokens after each word."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids) if text else 0

    def encode_grounded(record: ImageTextRecord) -> dict[str, torch.Tensor]:
        item = encode(record)
        if record.image not in cells:
            raise MmwbInputError(f"{record.image}: no objects listed for this image, so nothing to ground")
        objects = cells[record.image]
        ends = answer_query_positions(item["labels"])  # the last token of each user turn that was kept
        asked = [(n, turn) for n, turn in enumerate(record.turns) if turn.role == "user"][: len(ends)]
        # (position, role) -> cells; words naming alike objects share a position
        targets: dict[tuple[int, int], np.ndarray] = {}
        for end, (n, turn) in zip(ends, asked, strict=False):
            if captions and turn.kind == "caption" and n + 1 < len(record.turns):
                for position, index in caption_targets(
                    record.turns[n + 1].text, end, len(objects), count, template
                ):
                    if position < len(item["input_ids"]):  # a caption cut at max_length keeps its head only
                        targets[(position, 1)] = targets.get((position, 1), False) | objects[index]
                continue
            if not turn.refers:
                continue
            if len(turn.refers) != len(turn.anchors):
                raise MmwbInputError(f"{record.image}: a question with {len(turn.refers)} objects and "
                                     f"{len(turn.anchors)} anchors")  # fmt: skip
            text = user_text(turn.text, template, n == 0, 1, image, bos)
            tail = count(text[text.rindex(turn.text) + len(turn.text) :])  # e.g. <|assistant|>
            for r, (index, anchor) in enumerate(zip(turn.refers, turn.anchors, strict=True)):
                if not 0 <= index < len(objects):
                    raise MmwbInputError(
                        f"{record.image}: a question refers to object {index} of {len(objects)}"
                    )
                for key in ((end - tail - count(turn.text[anchor:]), 0), (end, r + 1)):
                    targets[key] = targets.get(key, False) | objects[index]
        cells_at = np.stack(list(targets.values())) if targets else np.zeros((0, objects.shape[1]), bool)
        return {**item, "ground_pos": torch.tensor([p for p, _ in targets], dtype=torch.long),
                "ground_role": torch.tensor([r for _, r in targets], dtype=torch.long),
                "ground_cells": torch.from_numpy(cells_at)}  # fmt: skip

    return encode_grounded


def caption_targets(
    caption: str, end: int, n_objects: int, count: Callable[[str], int], template: str
) -> list[tuple[int, int]]:
    """(position, object) for each position that predicts a word of an object's phrase in a shapes caption ("a",
    its size, colour, shape; ``mmwb.data.shapes.caption_words``): the caption names the objects in their order, so
    these are the positions where the model decides which object comes next and reads it. ``end``: the position
    that predicts the caption's first token; ``count``: tokens in a text."""
    words = caption_words(caption)
    if len(words) != n_objects:
        raise MmwbInputError(f"caption {caption!r} names {len(words)} objects, its image lists {n_objects}")
    targets = []
    for index, starts in enumerate(words):
        for start in starts:
            before = caption[:start].rstrip()  # what the model has written when it predicts this word
            targets.append((end + (count(answer_text(before, template)) if before else 0), index))
    return targets


def collate_grounding(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``ground_pos (B, M)`` padded with NO_POSITION, ``ground_role (B, M)`` with 0 and ``ground_cells (B, M, N)``
    with False, M the most supervised positions of an item."""
    return {
        "ground_pos": pad_targets(items, "ground_pos", NO_POSITION),
        "ground_role": pad_targets(items, "ground_role", 0),
        "ground_cells": pad_targets(items, "ground_cells", False),
    }


def pad_targets(items: list[dict[str, torch.Tensor]], key: str, fill: float) -> torch.Tensor:
    """Each item's ``key`` tensor ``(M_i, ...)`` stacked to ``(B, max M_i, ...)``, padded with ``fill``."""
    return pad_sequence([it[key] for it in items], batch_first=True, padding_value=fill)


class AttentionTap:
    """Keeps the input of chosen attention layers during a forward (a pre-hook each), for ``probabilities``."""

    def __init__(self, language_model: nn.Module, heads: list[tuple[int, int]]) -> None:
        blocks = language_model.model.layers
        self.modules: dict[int, GroupedQueryAttention] = {}
        for layer, head in heads:
            if not 0 <= layer < len(blocks):
                raise MmwbConfigError(f"grounding: layer {layer} of a {len(blocks)}-layer decoder")
            attention = blocks[layer].self_attn
            if not isinstance(attention, GroupedQueryAttention):
                kind = type(attention).__name__
                raise MmwbConfigError(f"grounding needs grouped-query attention; layer {layer} has {kind}")
            if not 0 <= head < attention.num_heads:
                raise MmwbConfigError(f"grounding: head {head} of a {attention.num_heads}-head layer {layer}")
            self.modules[layer] = attention
        self.inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}

    def __enter__(self) -> AttentionTap:
        self.handles = [
            module.register_forward_pre_hook(
                lambda _, args, layer=layer: self.inputs.__setitem__(layer, args[:2])
            )
            for layer, module in self.modules.items()
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def grounding_loss(
    tap: AttentionTap,
    config: GroundingConfig,
    image_start: torch.Tensor,
    image_tokens: int,
    positions: torch.Tensor,
    roles: torch.Tensor,
    cells: torch.Tensor,
) -> torch.Tensor:
    """Mean ``-log`` attention mass on the named object's cells, over every supervised (head, position) (0 if none).

    ``image_start (B,)``: where each row's image placeholder was; ``positions (B, M)`` are counted before the
    image's ``image_tokens`` tokens replaced it; ``roles (B, M)`` say which heads look there (``with_grounding``),
    ``cells (B, M, N)`` at what."""
    # a word before the image (the first question of chat_question_first) cannot look at it
    usable = (positions > image_start[:, None]) & cells.any(-1)  # (B, M); padding is NO_POSITION
    widened = torch.where(positions > image_start[:, None], positions + image_tokens - 1, positions).clamp(
        min=0
    )
    columns = image_start[:, None] + torch.arange(image_tokens, device=positions.device)  # (B, N)
    looks = [(head, 0) for head in config.heads] + [
        (head, r + 1) for r, head in enumerate(config.answer_heads)
    ]
    losses = []
    for (layer, head), role in looks:
        supervised = usable & (roles == role)
        if not supervised.any():
            continue
        x, rope = tap.inputs[layer]
        probs = tap.modules[layer].probabilities(x, rope, widened)[:, head]  # (B, M, T)
        on_image = probs.gather(2, columns[:, None, :].expand(-1, probs.shape[1], -1))  # (B, M, N)
        mass = (on_image * cells).sum(-1)  # (B, M)
        losses.append(-torch.log(mass[supervised].clamp(min=1e-6)))
    return torch.cat(losses).mean() if losses else torch.zeros((), device=positions.device)
