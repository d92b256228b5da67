"""Reproduce the shipped default: shapes data, canny conditions and the tiny Stable Diffusion it runs on.

    mmwb data shapes --out runs/shapes-default/data --n 4000 --n-eval 200 --size 32
    python pipelines/make_shapes_default.py --data runs/shapes-default/data --out runs/shapes-default
    mmwb train controlnet --config configs/train/controlnet_shapes.yaml

The first step draws the images, this script adds canny conditioning images plus ``<split>_controlnet.jsonl``
and pre-trains the base model into ``runs/shapes-default/model`` (copied to assets/models/shapes-sd), and the
last step trains the canny ControlNet on it (copied to assets/models/shapes-controlnet-canny).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mmwb.data.controlnet import build_canny_jsonl
from mmwb.runtime.config import load_config
from mmwb.train.controlnet import ControlNetDataConfig
from mmwb.train.shapes_sd import ShapesSDConfig, train_shapes_sd


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="output folder of 'mmwb data shapes'")
    parser.add_argument("--out", type=Path, default=Path("runs/shapes-default"))
    parser.add_argument("--config", type=Path, default=Path("configs/train/shapes_sd.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. unet.max_steps=100")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for split in ("train", "val"):
        build_canny_jsonl(args.data, split)
    config = load_config(ShapesSDConfig, args.config, args.overrides)
    config.out_dir = args.out
    config.data = ControlNetDataConfig(args.data / "train_controlnet.jsonl", args.data, size=config.data.size)
    print(f"base model written to {train_shapes_sd(config)}")


if __name__ == "__main__":
    main()
