"""Image-text training records (LLaVA JSON, caption JSONL, shapes QA) and a dataset that decodes images lazily.

Records are plain text plus an image path, so a split of millions costs only its text in memory; each item's image
is read when the item is asked for. A missing or unreadable image raises ``MmwbInputError`` naming the file, which
the engine's ``SkipBadItems`` turns into a logged, counted skip instead of a crash inside collation.

Formats, one record per image:
- LLaVA JSON (a list) or JSONL: ``{"image": ..., "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}``
- caption JSONL: ``{"image": ..., "caption": ...}`` (a user turn holding only the image, then the caption)
- shapes JSONL (``mmwb data shapes``): ``{"image": ..., "caption": ..., "qa": [{"question", "answer"}, ...]}``;
  stage 1 reads its caption, stage 2 its QA pairs as a multi-turn conversation (``prefer="qa"``).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from mmwb.errors import MmwbInputError

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_PLACEHOLDER_RE = re.compile(r"\s*<image>\s*")


@dataclass(frozen=True)
class Turn:
    role: Literal["user", "assistant"]
    text: str  # without the ``<image>`` placeholder: where the image goes is the chat format's business
    kind: str | None = None  # a question's type where the data names it (shapes QA: colour, position, ...)
    refers: tuple[int, ...] = ()  # the image's objects the question names, in order (shapes QA "refers")
    anchors: tuple[int, ...] = ()  # where in the question the words naming each of them end (shapes QA)


@dataclass(frozen=True)
class ImageTextRecord:
    """One image (a path relative to the image root) and the conversation about it."""

    image: str
    turns: tuple[Turn, ...]

    @property
    def caption(self) -> str:
        """The first assistant turn: the caption of LLaVA's pretraining (stage 1) data."""
        return next(turn.text for turn in self.turns if turn.role == "assistant")


def read_records(
    path: str | Path, prefer: Literal["caption", "qa"] = "caption", caption_question: str | None = None
) -> list[ImageTextRecord]:
    """Records of a ``.json`` list or a ``.jsonl`` file; errors name the file, the record and the key.

    With ``prefer="qa"`` and a ``caption_question``, an item holding both QA pairs and a caption also gives a
    one-turn record ``caption_question -> caption``, so instruction tuning keeps the model captioning."""
    path = Path(path)
    if not path.is_file():
        raise MmwbInputError(f"{path}: no such dataset file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            raw = json.loads(text)
            if not isinstance(raw, list):
                raise MmwbInputError(f"{path}: a LLaVA-format JSON file holds a list of records")
            items = [(f"{path}[{i}]", item) for i, item in enumerate(raw)]
        else:
            items = [
                (f"{path}:{n}", json.loads(line))
                for n, line in enumerate(text.splitlines(), 1)
                if line.strip()
            ]
    except json.JSONDecodeError as err:
        raise MmwbInputError(f"{path}: not valid JSON ({err})") from err
    records = [_record(where, item, prefer) for where, item in items]
    if prefer == "qa" and caption_question is not None:
        records += [
            ImageTextRecord(
                item["image"],
                (Turn("user", caption_question, kind="caption"), Turn("assistant", item["caption"])),
            )
            for _, item in items
            if "qa" in item and isinstance(item.get("caption"), str)
        ]
    if not records:
        raise MmwbInputError(f"{path}: holds no records")
    return records


def split_turns(records: list[ImageTextRecord]) -> list[ImageTextRecord]:
    """Each (question, answer) pair of each conversation as its own one-turn record, so that every question is
    trained where ``mmwb ask`` puts it: first, right after the image. (In a fixed-order conversation the
    later questions would only ever be trained after the earlier answers.)"""
    return [
        ImageTextRecord(r.image, r.turns[i : i + 2])
        for r in records
        for i in range(0, len(r.turns) - 1, 2)
        if r.turns[i].role == "user" and r.turns[i + 1].role == "assistant"
    ]


def draw_questions(
    records: list[ImageTextRecord],
    draws: int,
    seed: int,
    weights: dict[str, float] | None = None,
    per_record: int = 1,
) -> list[ImageTextRecord]:
    """Each conversation as ``draws`` one-turn records, each of one question drawn at random (seeded) from its
    pairs; a one-turn record (a caption) is repeated ``draws`` times. So every image weighs the same, and its
    caption as much as its questions together, however many questions it has: the mix that let a tiny shapes
    VLM learn to caption several objects (caption exact match 0.31 -> 0.69 at 1800 steps, issue 19).

    ``weights`` makes some question types (``Turn.kind``) likelier to be drawn, e.g. ``{"position": 4}`` for a
    question that is rare but needs its own skill; unnamed types weigh 1. ``per_record`` > 1 puts that many
    different questions (or all, where fewer) in each drawn record, as turns in the order drawn: an image's
    tokens, the bulk of a short record's cost, then pay for several answers."""
    if any(not w >= 0 for w in (weights or {}).values()):
        raise MmwbInputError(f"question weights must be >= 0, got {weights}")
    if per_record < 1:
        raise MmwbInputError(f"questions per record must be at least 1, got {per_record}")
    rng = random.Random(seed)
    drawn = []
    for record in records:
        pairs = split_turns([record])
        if len(pairs) <= 1:
            drawn += [record] * draws
            continue
        odds = [(weights or {}).get(pair.turns[0].kind or "", 1.0) for pair in pairs]
        if per_record > 1:  # one a record keeps the draws below, so seeded runs made before stay the same
            for _ in range(draws):
                chosen = _weighted_sample(rng, odds, per_record)
                if chosen:
                    drawn.append(ImageTextRecord(record.image, sum((pairs[i].turns for i in chosen), ())))
        elif weights:
            if sum(odds) > 0:  # an image whose every question weighs 0 gives no question records
                drawn += rng.choices(pairs, weights=odds, k=draws)
        else:
            drawn += [rng.choice(pairs) for _ in range(draws)]
    return drawn


def _weighted_sample(rng: random.Random, weights: list[float], k: int) -> list[int]:
    """Up to ``k`` different indices drawn with probability proportional to ``weights`` (Efraimidis-Spirakis: the
    largest ``u ** (1 / w)``); weight 0 is never drawn."""
    keys = [(rng.random() ** (1 / w), i) for i, w in enumerate(weights) if w > 0]
    return [i for _, i in sorted(keys, reverse=True)[:k]]


def _record(where: str, item: Any, prefer: str) -> ImageTextRecord:
    if not isinstance(item, dict) or not isinstance(item.get("image"), str):
        raise MmwbInputError(f"{where}: a record needs an 'image' path")
    if "conversations" in item:
        turns = tuple(_turn(where, turn) for turn in item["conversations"])
    elif prefer == "qa" and "qa" in item:
        turns = tuple(
            Turn(role, qa[key], qa.get("type"), tuple(qa.get("refers", ())), tuple(qa.get("anchors", ())))
            for qa in item["qa"]
            for role, key in (("user", "question"), ("assistant", "answer"))
        )
    elif "caption" in item:
        turns = (Turn("user", ""), Turn("assistant", str(item["caption"])))
    else:
        raise MmwbInputError(f"{where}: a record needs 'conversations' or 'caption'")
    if not any(turn.role == "assistant" for turn in turns):
        raise MmwbInputError(f"{where}: the conversation has no assistant (gpt) turn")
    return ImageTextRecord(item["image"], turns)


def _turn(where: str, turn: Any) -> Turn:
    role = _ROLES.get(turn.get("from", "")) if isinstance(turn, dict) else None
    if role is None or not isinstance(turn.get("value"), str):
        raise MmwbInputError(f"{where}: conversation turns need 'from' (human/gpt) and a string 'value'")
    return Turn(role, _PLACEHOLDER_RE.sub(" ", turn["value"]).strip())  # type: ignore[arg-type]


class ImageTextDataset(Dataset):
    """``records`` with their images read on demand: item = ``load(image) | encode(record)``.

    ``load(path)`` turns one image file into tensors (pixels through the tower's processor, or cached features);
    ``encode(record)`` into token ids and labels. Both run per item, in the data loader's workers.
    """

    def __init__(
        self,
        records: Sequence[ImageTextRecord],
        image_root: str | Path,
        load: Callable[[Path], dict[str, Any]],
        encode: Callable[[ImageTextRecord], dict[str, Any]],
    ) -> None:
        self.records = records
        self.image_root = Path(image_root)
        self.load = load
        self.encode = encode

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, index: int) -> Path:
        return self.image_root / self.records[index].image

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        return {**self.load(self.image_root / record.image), **self.encode(record)}
