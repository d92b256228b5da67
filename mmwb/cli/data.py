"""``mmwb data``: make the datasets mmwb's recipes train on."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = (
    "Make datasets. 'mmwb data shapes' writes the synthetic shapes set (images, captions, QA pairs, splits)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmwb.cli.main import common_flags

    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    shapes = kinds.add_parser(
        "shapes",
        parents=[common_flags(nested=True)],
        help="images of 1-3 coloured shapes with reference captions and QA pairs",
        description="Deterministic synthetic shapes: train/val/test splits from disjoint streams of one seed, "
        "PNGs under OUT/<split>/ and an index OUT/<split>.jsonl (image, caption, qa, objects).",
    )
    shapes.add_argument("--out", type=Path, required=True, help="output directory")
    shapes.add_argument("--n", type=int, default=1000, help="training images (default: 1000)")
    shapes.add_argument("--n-eval", type=int, default=None, help="images in val and in test (default: n/5)")
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    shapes.add_argument(
        "--practice",
        action="store_true",
        help="add training-only questions to the train split: 'is there a ...?' about each object (yes) and "
        "left/right questions in three-object scenes (val and test keep the standard mix)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmwb.data.shapes import write_dataset
    from mmwb.errors import MmwbInputError

    if args.n < 1 or args.size < 16 or (args.n_eval is not None and args.n_eval < 1):
        raise MmwbInputError("--n and --n-eval must be at least 1 and --size at least 16")
    seed = 0 if args.seed is None else args.seed
    counts = write_dataset(
        args.out,
        args.n,
        seed=seed,
        size=args.size,
        n_eval=args.n_eval,
        progress=not args.json,
        practice=args.practice,
    )
    if not args.json:
        print(
            f"wrote {sum(counts.values())} images to {args.out} ({', '.join(f'{k} {v}' for k, v in counts.items())})"
        )
    return {
        "out": str(args.out),
        "seed": seed,
        "size": args.size,
        "splits": counts,
        "practice": args.practice,
    }
