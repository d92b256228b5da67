"""Preference pairs for DPO: one JSONL line per pair, and the rule-made hard negatives of shapes scenes.

A line: ``{"image": path (relative to the image root; null for a text decoder's pair), "prompt": a question, or null
for a caption, "chosen": ..., "rejected": ..., "source": how the rejected one was made, "type": caption or the
question's type}``. Sources: ``on_policy`` (the model's own sampled output that the exact-match checker marks wrong,
see ``mmwb.pipelines.preferences``) and the rules below, each an error a shapes VLM makes: ``swap_attributes``
(colours/shapes moved between objects), ``repeat_object`` (one object described twice), ``wrong_count``,
``flip_relation`` (the two objects' order, or a position answer, reversed) and ``flip_answer`` (yes/no).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from mmwb.data.io import atomic_write_path, write_json
from mmwb.data.shapes import COLOURS, NUMBERS, SHAPES, Scene, caption, record_scene, swapped_scene
from mmwb.errors import MmwbInputError

SOURCES = ("on_policy", "swap_attributes", "repeat_object", "wrong_count", "flip_relation", "flip_answer")
_FIELDS = ("image", "prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    image: str | None  # None: a text-only pair (a decoder's)
    prompt: str | None  # None: a caption (the model's own caption instruction)
    chosen: str
    rejected: str
    source: str
    type: str = "caption"  # caption, or the question's type (colour, count, ...)
    line: int = field(default=0, compare=False)  # where it was read from (for errors), not written back


def read_preferences(path: str | Path) -> list[PreferencePair]:
    """Every pair of a JSONL file; the first bad line is an error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise MmwbInputError(f"{path}: no such preference file")
    pairs = []
    # split on newlines only: str.splitlines also breaks at U+2028 and the like, legal inside JSON strings
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if line.strip():
            pairs.append(replace(_parse(line, f"{path}:{number}"), line=number))
    if not pairs:
        raise MmwbInputError(f"{path}: no preference pairs")
    return pairs


def _parse(line: str, where: str) -> PreferencePair:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as err:
        raise MmwbInputError(f"{where}: not valid JSON ({err.msg})") from err
    if not isinstance(raw, dict):
        raise MmwbInputError(f"{where}: a pair is a JSON object")
    missing = [name for name in _FIELDS if name not in raw]
    if missing:
        raise MmwbInputError(f"{where}: missing field {missing[0]!r} (a pair needs {', '.join(_FIELDS)})")
    for name in ("chosen", "rejected"):
        if not isinstance(raw[name], str) or not raw[name].strip():
            raise MmwbInputError(f"{where}: {name!r} is empty")
    if raw["image"] is not None and (not isinstance(raw["image"], str) or not raw["image"].strip()):
        raise MmwbInputError(f"{where}: 'image' is a path, or null for a text-only pair")
    if raw["prompt"] is not None and not isinstance(raw["prompt"], str):
        raise MmwbInputError(f"{where}: 'prompt' is a question or null (a caption)")
    if " ".join(raw["chosen"].split()) == " ".join(raw["rejected"].split()):
        raise MmwbInputError(f"{where}: chosen and rejected are the same text")
    return PreferencePair(
        raw["image"], raw["prompt"] or None, raw["chosen"], raw["rejected"], str(raw.get("source", "given")),
        str(raw.get("type", "caption")),
    )  # fmt: skip


def write_preferences(pairs: list[PreferencePair], path: Path, summary: dict | None = None) -> None:
    """The pairs as JSONL at ``path`` and, when given, their ``summary`` as ``summary.json`` beside it; each file
    appears whole."""
    if summary is not None:
        write_json(Path(path).with_name("summary.json"), summary)
    with atomic_write_path(path) as tmp:
        rows = ({k: v for k, v in asdict(p).items() if k != "line"} for p in pairs)
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def rule_pairs(record: dict, rng: np.random.Generator) -> list[PreferencePair]:
    """Hard negatives for one shapes record: every rule that applies to its caption, one wrong answer per
    question (each rule's rejected text differs from the reference)."""
    scene = record_scene(record)
    chosen = record["caption"]
    pairs = [
        PreferencePair(record["image"], None, chosen, text, source)
        for source, text in _caption_negatives(scene, record, rng)
        if text != chosen
    ]
    for qa in record["qa"]:
        source, text = _wrong_answer(qa, scene, rng)
        pairs.append(PreferencePair(record["image"], qa["question"], qa["answer"], text, source, qa["type"]))
    return pairs


def _caption_negatives(scene: Scene, record: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
    objs = scene.objects
    out = [("swap_attributes", caption(swapped_scene(record, scene.background, rng)))]
    if len(objs) >= 2:
        repeated = (objs[0], replace(objs[1], shape=objs[0].shape, colour=objs[0].colour, size=objs[0].size))
        out.append(("repeat_object", caption(replace(scene, objects=repeated + objs[2:]))))
        fewer = objs[:-1]  # left to right, so the first two of three keep "left of"
        out.append(
            ("wrong_count", caption(Scene(fewer, scene.background, "left of" if len(fewer) == 2 else None)))
        )
    else:
        extra = replace(objs[0], colour=_other(COLOURS, objs[0].colour, rng))
        out.append(("wrong_count", caption(Scene((objs[0], extra), scene.background, "left of"))))
    if len(objs) == 2:
        out.append(("flip_relation", caption(replace(scene, objects=objs[::-1]))))
    return out


def _wrong_answer(qa: dict, scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    kind, answer = qa["type"], qa["answer"]
    if kind == "count":
        return "wrong_count", _other(NUMBERS[1:], answer, rng)
    if kind in ("colour", "shape"):
        field = "colour" if kind == "colour" else "shape"
        others = sorted({getattr(o, field) for o in scene.objects} - {answer})  # another object's, if any
        return "swap_attributes", str(rng.choice(others)) if others else _other(
            COLOURS if kind == "colour" else SHAPES, answer, rng
        )
    flipped = "no" if answer == "yes" else "yes"
    return ("flip_relation" if kind == "position" else "flip_answer"), flipped


def _other(choices, taken: str, rng: np.random.Generator) -> str:
    return str(rng.choice([c for c in choices if c != taken]))
