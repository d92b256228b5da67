"""``mmwb data``: make the datasets mmwb's recipes train on."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = (
    "Make datasets. 'mmwb data shapes' writes the synthetic shapes set (images, captions, QA pairs, splits); "
    "'mmwb data preferences' chosen/rejected pairs for DPO from a VLM's own mistakes on it."
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

    add_preference_arguments(kinds, common_flags(nested=True))


def add_preference_arguments(kinds, common: argparse.ArgumentParser) -> None:
    prefs = kinds.add_parser(
        "preferences",
        parents=[common],
        help="DPO pairs: a VLM's wrong sampled captions/answers on shapes images, plus rule-made hard negatives",
        description="Chosen/rejected pairs as JSONL (OUT/preferences.jsonl, summary in OUT/summary.json): the "
        "model captions each image and answers one of its questions SAMPLES times (greedy once, then sampled); "
        "every output the exact-match checker marks wrong is rejected against the reference (source on_policy). "
        "Rule-made hard negatives are added: attributes swapped between objects, an object repeated, a wrong "
        "count, a flipped relation or yes/no.",
    )
    prefs.add_argument(
        "--model", type=Path, required=True, help="the VLM folder whose mistakes are collected"
    )
    prefs.add_argument("--data", type=Path, required=True, help="a shapes folder (mmwb data shapes)")
    prefs.add_argument("--out", type=Path, required=True, help="output directory")
    prefs.add_argument("--split", default="train", help="the split to read (default: train)")
    prefs.add_argument(
        "--max-images", type=int, default=2000, help="the split's first N images (default: 2000)"
    )
    prefs.add_argument("--samples", type=int, default=4, help="outputs per image and prompt (default: 4)")
    prefs.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    prefs.add_argument("--no-questions", action="store_true", help="captions only")
    prefs.add_argument("--no-rules", action="store_true", help="on-policy pairs only")
    prefs.add_argument("--no-on-policy", action="store_true", help="rule-made pairs only (no model run)")
    prefs.add_argument("--batch-size", type=int, default=64)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.kind == "preferences":
        return run_preferences(args)
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


def run_preferences(args: argparse.Namespace) -> dict[str, Any]:
    from mmwb.data.preferences import write_preferences
    from mmwb.errors import MmwbInputError
    from mmwb.models.vlm import load_any_vlm
    from mmwb.pipelines.preferences import PreferenceSettings, make_preferences

    if args.max_images < 1 or args.samples < 1 or args.temperature <= 0:
        raise MmwbInputError("--max-images and --samples must be at least 1 and --temperature positive")
    settings = PreferenceSettings(
        split=args.split, max_images=args.max_images, samples=args.samples, temperature=args.temperature,
        questions=not args.no_questions, rules=not args.no_rules, on_policy=not args.no_on_policy,
        batch_size=args.batch_size, seed=0 if args.seed is None else args.seed,
    )  # fmt: skip
    vlm = load_any_vlm(args.model, device=args.device)
    pairs, summary = make_preferences(vlm, args.data, settings, progress=not args.json)
    if not pairs:
        raise MmwbInputError(f"{args.model}: no pairs (no wrong outputs and no rules): nothing to write")
    summary = {**summary, "model": str(args.model), "data": str(args.data), "out": str(args.out)}
    write_preferences(pairs, args.out / "preferences.jsonl", summary)
    if not args.json:
        print(f"wrote {len(pairs)} pairs to {args.out / 'preferences.jsonl'} ({summary['by_source']})")
    return summary
