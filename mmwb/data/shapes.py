"""Synthetic shapes: images of 1-3 coloured shapes with a reference caption and question-answer pairs.

This is the task of mmwb's embedded default models: small enough to learn on a CPU in minutes, rich enough to need
vision (colour, shape, size, count, relative position) and language (a fixed caption grammar, open questions).
Every image is a pure function of (seed, split, index), so datasets are reproducible and the splits are disjoint.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmwb.data.tokenizer import ASSISTANT, USER
from mmwb.errors import MmwbInputError

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 40, 170),
    "orange": (250, 130, 20),
}
SIZES = {"small": 0.11, "large": 0.19}  # radius as a fraction of the image side
NUMBERS = ("zero", "one", "two", "three")
# the relations position questions ask: (axis, 0 = x and 1 = y; whether the first object lies before the second)
RELATIONS = {"left of": (0, True), "right of": (0, False), "above": (1, True), "below": (1, False)}
SPLITS = ("train", "val", "test")
WRITE_BLOCK = 500  # images per worker task in write_dataset
SUPERSAMPLE = 4  # draw large and downsample: anti-aliased edges at any output size


@dataclass(frozen=True)
class Shape:
    """One drawn object; ``x``, ``y`` (centre) and ``radius`` are fractions of the image side."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """What an image shows: objects in canonical order (left to right, or top to bottom for 'above')."""

    objects: tuple[Shape, ...]
    background: tuple[int, int, int]
    relation: str | None  # "left of" / "above" for two objects, else None


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene whose caption is unambiguous: no overlaps, and two objects separated clearly on one axis."""
    count = int(rng.integers(1, 4))
    while True:
        objects = [_sample_object(rng) for _ in range(count)]
        if _well_placed(objects):
            break
    relation = None
    if count == 2:
        a, b = objects
        if abs(a.x - b.x) >= abs(a.y - b.y):
            relation, objects = "left of", sorted(objects, key=lambda s: s.x)
        else:
            relation, objects = "above", sorted(objects, key=lambda s: s.y)
    else:
        objects = sorted(objects, key=lambda s: s.x)
    return Scene(tuple(objects), _sample_background(rng), relation)


def _sample_object(rng: np.random.Generator) -> Shape:
    size = str(rng.choice(list(SIZES)))
    margin = SIZES[size] + 0.03
    return Shape(
        shape=str(rng.choice(SHAPES)),
        colour=str(rng.choice(list(COLOURS))),
        size=size,
        x=float(rng.uniform(margin, 1 - margin)),
        y=float(rng.uniform(margin, 1 - margin)),
    )


def _well_placed(objects: list[Shape]) -> bool:
    for i, a in enumerate(objects):
        for b in objects[i + 1 :]:
            if math.hypot(a.x - b.x, a.y - b.y) < a.radius + b.radius + 0.04:
                return False
    if (
        len(objects) == 2
    ):  # the dominant axis must dominate clearly, so "left of" vs "above" is never a coin flip
        dx, dy = abs(objects[0].x - objects[1].x), abs(objects[0].y - objects[1].y)
        return max(dx, dy) > 1.5 * min(dx, dy)
    if len(objects) == 3:  # left-to-right order must be visible
        xs = sorted(o.x for o in objects)
        return min(b - a for a, b in zip(xs, xs[1:])) > 0.08
    return True


def _sample_background(rng: np.random.Generator) -> tuple[int, int, int]:
    """Pale backgrounds (grey or tinted) so every shape colour stays distinct from them."""
    base = int(rng.integers(200, 250))
    tint = rng.integers(-15, 16, size=3)
    return tuple(int(np.clip(base + t, 0, 255)) for t in tint)  # type: ignore[return-value]


def render(scene: Scene, size: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``size``×``size``; ``rng`` adds faint background noise when given."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw.polygon(_outline(obj, big), fill=COLOURS[obj.colour])
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    if rng is not None:
        noise = rng.normal(0, 3, size=(size, size, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8))
    return image


def _outline(obj: Shape, side: int) -> list[tuple[float, float]]:
    cx, cy, r = obj.x * side, obj.y * side, obj.radius * side
    if obj.shape == "circle":
        angles = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        radii = np.full_like(angles, r)
    elif obj.shape == "square":
        angles = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
        radii = np.full_like(angles, r * 1.1)
    elif obj.shape == "triangle":
        angles = -math.pi / 2 + np.array([0, 2, 4]) * math.pi / 3
        radii = np.full_like(angles, r * 1.15)
    else:  # star: ten points alternating outer and inner radius
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r * 1.2, r * 0.5)
    return [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for a, rad in zip(angles, radii)]


def caption(scene: Scene) -> str:
    """The reference caption, e.g. 'a large red circle left of a small blue triangle'."""
    phrases = [obj.phrase for obj in scene.objects]
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        return f"{phrases[0]} {scene.relation} {phrases[1]}"
    return f"{phrases[0]}, {phrases[1]} and {phrases[2]}"


def record_scene(record: dict, background: tuple[int, int, int] = (0, 0, 0)) -> Scene:
    """The scene an index record describes (its objects in caption order, its relation read off the caption)."""
    relation = next((r for r in ("left of", "above") if f" {r} " in record["caption"]), None)
    return Scene(tuple(Shape(**o) for o in record["objects"]), background, relation)


def swapped_scene(record: dict, background: tuple[int, int, int], rng: np.random.Generator) -> Scene:
    """A record's scene with each object's look (shape, colour) moved to the next object's place; a lone object,
    or objects that all look alike, get another colour. Same words, other binding: the hard negative that an
    encoder reading a bag of attributes cannot tell from the original."""
    scene = record_scene(record, background)
    looks = [(o.shape, o.colour) for o in scene.objects]
    moved = looks[1:] + looks[:1]
    if moved == looks:
        shape, colour = looks[0]
        moved[0] = (shape, str(rng.choice([c for c in COLOURS if c != colour])))
    return replace(
        scene, objects=tuple(replace(o, shape=s, colour=c) for o, (s, c) in zip(scene.objects, moved))
    )


def questions(scene: Scene, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Question-answer pairs about colour, shape, count, relative position, and yes/no presence; ``refers`` lists
    the objects (indices into ``scene.objects``) a question names, in the order it names them."""
    objs = scene.objects
    qa = [{"question": "how many shapes are there?", "answer": NUMBERS[len(objs)], "type": "count"}]
    for i, obj in enumerate(objs):
        if sum(o.shape == obj.shape for o in objs) == 1:
            qa.append(
                {
                    "question": f"what colour is the {obj.shape}?",
                    "answer": obj.colour,
                    "type": "colour",
                    "refers": [i],
                }
            )
        if sum(o.colour == obj.colour for o in objs) == 1:
            qa.append(
                {
                    "question": f"what shape is the {obj.colour} object?",
                    "answer": obj.shape,
                    "type": "shape",
                    "refers": [i],
                }
            )
    if scene.relation is not None:
        first, second = objs  # in caption order: first is left of / above second
        flipped = {"left of": "right of", "above": "below"}[scene.relation]
        # either object may be named first, so the answer never follows from the word order alone; two objects
        # that look the same ("is the red circle left of the red circle?") get no position question, which would
        # be ill-posed. The random draws are made either way, so every other question stays as it was.
        alike = (first.colour, first.shape) == (second.colour, second.shape)
        swapped = bool(rng.integers(2)) and not alike
        truth = flipped if swapped else scene.relation
        if swapped:
            first, second = second, first
        asked = str(rng.choice([scene.relation, flipped]))
        if not alike:
            qa.append(
                {
                    "question": f"is the {first.colour} {first.shape} {asked} the {second.colour} {second.shape}?",
                    "answer": "yes" if asked == truth else "no",
                    "type": "position",
                    "refers": [1, 0] if swapped else [0, 1],
                }
            )
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    present = [i for i, o in enumerate(objs) if o.colour == colour and o.shape == shape]
    qa.append(
        {
            "question": f"is there a {colour} {shape}?",
            "answer": "yes" if present else "no",
            "type": "yesno",
            "refers": present,
        }
    )
    return qa


CELL_ATTRIBUTES = (("colour", tuple(COLOURS)), ("shape", SHAPES), ("size", tuple(SIZES)))


def object_cells(objects: list[dict], grid: int) -> np.ndarray:
    """``(len(objects), grid * grid)`` bool: which cells of the ``grid`` x ``grid`` cut (row by row) each object's
    disc covers at the cell's centre."""
    centres = (np.arange(grid) + 0.5) / grid
    covered = [
        np.hypot(centres[None, :] - shape.x, centres[:, None] - shape.y) < shape.radius  # (row, col)
        for shape in (Shape(**obj) for obj in objects)
    ]
    return (
        np.stack(covered).reshape(len(objects), grid * grid) if covered else np.zeros((0, grid * grid), bool)
    )


def object_centres(objects: list[dict]) -> np.ndarray:
    """``(len(objects), 2)`` float: each object's centre (x, y), fractions of the image side."""
    return np.array([[obj["x"], obj["y"]] for obj in objects], dtype=np.float64).reshape(-1, 2)


def cell_labels(objects: list[dict], grid: int) -> np.ndarray:
    """``(grid * grid, 3)`` int64 dense targets of a record's image cut into ``grid`` x ``grid`` cells, row by row:
    for each cell, 1 + the index of the colour, shape and size (``CELL_ATTRIBUTES``) of the object whose disc
    covers the cell's centre, 0 for background. A tower trained to predict these from its own tokens learns what
    is where in a few hundred steps, instead of waiting for the language model's loss to reach it."""
    labels = np.zeros((grid * grid, len(CELL_ATTRIBUTES)), dtype=np.int64)
    for obj, covered in zip(objects, object_cells(objects, grid), strict=True):
        shape = Shape(**obj)
        labels[covered] = [1 + names.index(getattr(shape, key)) for key, names in CELL_ATTRIBUTES]
    return labels


def read_objects(path: Path) -> dict[str, list[dict]]:
    """The ``objects`` of every image of a shapes JSONL file, by the image's path as the file names it."""
    objects = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if not isinstance(item.get("objects"), list):
            raise MmwbInputError(
                f"{path}:{n}: no 'objects' list; cell targets need shapes data ('mmwb data shapes')"
            )
        objects[item["image"]] = item["objects"]
    return objects


def practice_questions(scene: Scene, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Training-only questions for the skills the standard mix leaves rare: a presence question about each object
    (answer yes: the standard one asks about a random look, present ~7 % of the time, so saying "no" scores 93 %
    and teaches nothing) and, in a three-object scene, whether one object is left or right of another (the
    standard position question exists only in two-object scenes, ~6 % of all questions). Issue 19: with them,
    yes/no accuracy 0.927 (always "no") -> 0.977 after 12 minutes of training."""
    objs = scene.objects
    qa = [
        {"question": f"is there a {o.colour} {o.shape}?", "answer": "yes", "type": "yesno", "refers": [i]}
        for i, o in enumerate(objs)
    ]
    if len(objs) == 3:  # told apart left to right (sample_scene keeps their x at least 0.08 apart)
        named = [int(i) for i in rng.permutation(3)[:2]]
        first, second = (objs[i] for i in named)
        looks = [(o.colour, o.shape) for o in objs]
        asked = str(rng.choice(["left of", "right of"]))
        if looks.count((first.colour, first.shape)) == looks.count((second.colour, second.shape)) == 1:
            truth = "left of" if first.x < second.x else "right of"
            qa.append(
                {
                    "question": f"is the {first.colour} {first.shape} {asked} the {second.colour} {second.shape}?",
                    "answer": "yes" if asked == truth else "no",
                    "type": "position",
                    "refers": named,
                }
            )
    return qa


def split_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one example: splits draw from disjoint streams of the same seed."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def make_example(
    seed: int, split: str, index: int, size: int = 64, practice: bool = False
) -> tuple[Image.Image, dict]:
    """One image and its index record (caption, QA pairs, objects). ``practice`` appends ``practice_questions``,
    drawn from a stream of their own: everything else in the record stays as it is without them."""
    rng = split_rng(seed, split, index)
    scene = sample_scene(rng)
    record = {
        "caption": caption(scene),
        "qa": questions(scene, rng),
        "objects": [asdict(obj) for obj in scene.objects],
    }
    image = render(scene, size, rng)
    if practice:
        extra = np.random.default_rng([seed, SPLITS.index(split), index, 1])
        record["qa"] += practice_questions(scene, extra)
    for qa in record["qa"]:
        if qa.get("refers"):
            qa["anchors"] = naming_ends(qa["question"], [scene.objects[i] for i in qa["refers"]])
    return image, record


def caption_words(caption: str) -> list[list[int]]:
    """Where, in a ``caption``, each object's four words ("a", size, colour, shape) start, object by object in the
    order the caption names them, which is the order of the scene's ``objects``. Attention supervision
    (``mmwb.train.grounding``) has the positions that predict them look at that object."""
    sizes = "|".join(SIZES)
    return [[m.start(k) for k in range(1, 5)] for m in re.finditer(rf"\b(a) ({sizes}) (\w+) (\w+)", caption)]


def asked_relation(question: str) -> tuple[int, bool] | None:
    """The ``RELATIONS`` entry of the relation a question asks about ("is the A left of the B?"), or None."""
    return next((fact for words, fact in RELATIONS.items() if f" {words} " in question), None)


def naming_ends(question: str, named: list[Shape]) -> list[int]:
    """Where, in ``question``, the words naming each of ``named`` (in naming order) end: "red circle", else
    "circle", else "red" (as in "what shape is the red object?"), each looked for after the previous one; objects
    that look alike ("is there a red circle?" with two red circles) share one. The answer's attention supervision
    (``mmwb.train.grounding``) anchors each object's lookup at that word."""
    ends, start = [], 0
    for n, obj in enumerate(named):
        if n and (obj.colour, obj.shape) == (named[n - 1].colour, named[n - 1].shape):
            ends.append(ends[-1])
            continue
        for words in (f" {obj.colour} {obj.shape}", f" {obj.shape}", f" {obj.colour}"):
            at = question.find(words, start)
            if at >= 0:
                start = at + len(words)
                ends.append(start)
                break
        else:
            raise ValueError(f"{question!r} does not name the {obj.colour} {obj.shape}")
    return ends


def iter_split(seed: int, split: str, n: int, size: int = 64) -> Iterator[tuple[Image.Image, dict]]:
    for index in range(n):
        yield make_example(seed, split, index, size)


def read_index(root: Path, split: str) -> list[dict]:
    """The records of ``root/<split>.jsonl`` as written by ``write_dataset`` (``image`` is relative to ``root``)."""
    path = Path(root) / f"{split}.jsonl"
    if not path.is_file():
        raise MmwbInputError(f"{path}: no such index; make the data with 'mmwb data shapes --out {root}'")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_texts(record: dict) -> list[str]:
    """The plain text of one record: its caption and one 'question answer' line per QA pair."""
    return [record["caption"], *(f"{qa['question']} {qa['answer']}" for qa in record["qa"])]


def record_document(record: dict, rng: np.random.Generator) -> str:
    """One record as one text in the chat layout of mmwb's VLMs: its caption, then its QA pairs in a random order
    as turns ("... circle<|user|>what colour is the circle?<|assistant|> red<|user|>..."). A language model
    pretrained on these learns the turn markers and to answer by looking back at the description, which is where
    the image's tokens stand later."""
    turns = [f"{USER}{qa['question']}{ASSISTANT} {qa['answer']}" for qa in record["qa"]]
    return record["caption"] + "".join(turns[i] for i in rng.permutation(len(turns)))


def write_dataset(
    out: Path,
    n: int,
    seed: int = 0,
    size: int = 64,
    n_eval: int | None = None,
    progress: bool = True,
    workers: int | None = None,
    block: int = WRITE_BLOCK,
    practice: bool = False,
) -> dict[str, int]:
    """Write PNGs under ``out/<split>/`` and one index ``out/<split>.jsonl`` per split; returns split sizes.
    ``practice`` adds ``practice_questions`` to the train split (val and test keep the standard mix).

    ``workers`` processes (default: one per CPU, none for a single block) render ``block`` images at a time;
    every example depends only on (seed, split, index), so the files are the same for any number of workers."""
    from tqdm.auto import tqdm

    counts = {"train": n, "val": n_eval if n_eval is not None else max(1, n // 5)}
    counts["test"] = counts["val"]
    out.mkdir(parents=True, exist_ok=True)
    if workers is None:
        workers = 1 if sum(counts.values()) <= block else os.cpu_count() or 1
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        for split, count in counts.items():
            (out / split).mkdir(exist_ok=True)
            blocks = [range(start, min(start + block, count)) for start in range(0, count, block)]
            write = partial(
                _write_examples, out, seed, split, size=size, practice=practice and split == "train"
            )
            done = pool.map(write, blocks) if pool is not None else map(write, blocks)
            bar = tqdm(total=count, desc=split, disable=not progress)
            lines = []
            for block_lines in done:  # in block order
                lines += block_lines
                bar.update(len(block_lines))
            bar.close()
            (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    meta = {"dataset": "mmwb-shapes", "seed": seed, "size": size, "splits": counts, "practice": practice}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return counts


def _write_examples(
    out: Path, seed: int, split: str, indices: range, size: int, practice: bool = False
) -> list[str]:
    """Render and save one block of a split's images (a worker's share); returns their index lines."""
    lines = []
    for index in indices:
        image, record = make_example(seed, split, index, size, practice)
        name = f"{split}/{index:06d}.png"
        image.save(out / name)
        lines.append(json.dumps({"image": name, "split": split, **record}))
    return lines
