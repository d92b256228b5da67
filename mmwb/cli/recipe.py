"""``mmwb recipe``: run a whole training recipe (data, then every stage), resumably."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = (
    "Run a whole training recipe: make its data, then train each stage from its YAML config under "
    "configs/recipes/NAME/. Every stage prints and saves its metric (OUT/STAGE/metrics.json); run again on the "
    "same --out to skip finished stages and resume an interrupted one."
)
NAMES = (
    "tiny-shapes",
    "tiny-shapes-llava",
)  # mirrors mmwb.train.recipes.RECIPES without importing torch for --help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name",
        choices=NAMES,
        help="tiny-shapes: the default VLM (LM pretraining, then tower, projector and decoder end to end); "
        "tiny-shapes-llava: the classic LLaVA recipe (CLIP, LM, align, LoRA instruct), for comparison",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/recipes/NAME)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage on a few images (tests)")
    parser.add_argument(
        "--config-dir", type=Path, default=None, help="stage configs (default: configs/recipes/NAME)"
    )
    parser.add_argument(
        "--stages", type=int, default=None, metavar="N", help="run only the first N stages (default: all)"
    )
    parser.add_argument(
        "--dpo",
        action="store_true",
        help="tiny-shapes: also run the optional stage3_dpo (preference pairs from the stage 2 model's own "
        "mistakes, then DPO with the chosen answers' NLL on the whole model; figures in the model card)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dotted override for every stage (train.lr=1e-3) or one (stage1_lm.train.max_steps=200); repeatable",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmwb.train.recipes import format_metrics, run_recipe

    overrides = list(args.overrides)
    given = {"train.device": args.device, "train.precision": args.dtype, "train.seed": args.seed}
    overrides += [f"{key}={value}" for key, value in given.items() if value is not None]
    result = run_recipe(
        args.name,
        args.out or Path("runs/recipes") / args.name,
        quick=args.quick,
        config_dir=args.config_dir,
        overrides=tuple(overrides),
        data_seed=args.seed,
        stages=args.stages,
        progress=not args.json,
        optional=("stage3_dpo",) if args.dpo else (),
    )
    if not args.json:
        for name, stage in result["stages"].items():
            print(f"{name} [{stage['status']}]: {format_metrics(stage['metrics'])}")
        print(f"recipe {args.name} in {result['out']} ({result['seconds']:.0f} s)")
    return result
