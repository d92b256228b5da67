"""``mmwb train controlnet``: a ControlNet on a frozen Stable Diffusion, from a YAML config."""

from __future__ import annotations

import argparse
from typing import Any

HELP = (
    "Train a ControlNet (initialised from the UNet, zero convolutions) on a frozen Stable Diffusion from JSONL "
    "records of image, conditioning_image and caption. Validation grids go to OUT_DIR/validation, the final "
    "ControlNet to OUT_DIR/controlnet; every checkpoint folder also loads as a ControlNet."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmwb.cli.train import add_config_arguments

    add_config_arguments(parser, "YAML config (configs/train/controlnet_*.yaml)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from mmwb.cli.train import load_train_config
    from mmwb.runtime.config import to_dict
    from mmwb.train.controlnet import ControlNetTrainConfig, train_controlnet

    config = load_train_config(ControlNetTrainConfig, args)
    result, final = train_controlnet(config)
    if not args.json:
        print(
            f"trained {result.step} steps (last loss {result.last_loss:.4g}, {result.skipped_items} items "
            f"skipped); ControlNet in {final}, checkpoint {result.checkpoint}"
        )
    return {"controlnet": str(final), "config": to_dict(config), **dataclasses.asdict(result)}
