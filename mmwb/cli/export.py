"""``mmwb export``: turn a training run into a model folder that ``mmwb.from_pretrained`` loads."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = (
    "Export a checkpoint. --merge-lora folds an instruct run's LoRA adapter into the decoder's weights and writes "
    "a plain VLM folder (with the run's projector) that mmwb.from_pretrained and every verb load without peft."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--merge-lora",
        action="store_true",
        required=True,
        help="merge the LoRA adapter into the base weights",
    )
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="RUN_DIR",
        help="an instruct run folder (or its adapter/ folder)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write the merged model to")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmwb.train.checkpoint import save_model_folder
    from mmwb.train.instruct import load_adapter, merged

    save_model_folder(merged(*load_adapter(args.model)), args.out)
    if not args.json:
        print(f"merged {args.model} into {args.out}")
    return {"model": str(args.out), "source": str(args.model)}
