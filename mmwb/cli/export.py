"""``mmwb export``: turn a training run into a model folder that ``mmwb.from_pretrained`` loads."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mmwb.cli.args import add_quantize_arguments
from mmwb.errors import MmwbCheckpointError

HELP = (
    "Export a checkpoint. --merge-lora folds an instruct run's LoRA adapter into the decoder's weights and writes "
    "a plain VLM folder (with the run's projector) that mmwb.from_pretrained and every verb load without peft. "
    "--quantize int8|int4 writes a weight-only quantized copy of an mmwb VLM or decoder folder, which loads back "
    "as it was written (no second quantization)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--merge-lora", action="store_true", help="merge the LoRA adapter into the base weights"
    )
    add_quantize_arguments(parser, what, "write an int8 / int4 copy of an mmwb model folder (CPU)")
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="DIR",
        help="an instruct run folder or its adapter/ (--merge-lora); an mmwb VLM or decoder folder (--quantize)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model to")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmwb.train.checkpoint import save_model_folder

    if args.quantize:
        import mmwb

        model = mmwb.from_pretrained(
            args.model, device="cpu", quantize=args.quantize, group_size=args.group_size
        )
        if not hasattr(model, "save_pretrained"):
            raise MmwbCheckpointError(
                f"{args.model}: only mmwb's own VLM and decoder folders export quantized"
            )
        save_model_folder(model, args.out)
        if not args.json:
            print(f"wrote {args.quantize} {args.model} to {args.out}")
        return {"model": str(args.out), "source": str(args.model), "quantize": args.quantize}
    from mmwb.train.instruct import load_adapter, merged

    save_model_folder(merged(*load_adapter(args.model)), args.out)
    if not args.json:
        print(f"merged {args.model} into {args.out}")
    return {"model": str(args.out), "source": str(args.model)}
