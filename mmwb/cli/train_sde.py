"""``mmwb train sde``: a score model (MLP for 2-D toy data, UNet for digits) from a YAML config."""

from __future__ import annotations

import argparse
from typing import Any

HELP = (
    "Train a score-based SDE model with denoising score matching (EMA of the weights on). The final model "
    "folder OUT_DIR/model (config.json + model.safetensors, EMA weights) is what 'mmwb sample --model' and "
    "'mmwb likelihood --model' take; every checkpoint folder loads the same way."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmwb.cli.train import add_config_arguments

    add_config_arguments(parser, "YAML config (configs/train/sde_*.yaml)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from mmwb.cli.train import load_train_config
    from mmwb.runtime.config import to_dict
    from mmwb.train.sde import SDETrainConfig, train_sde

    config = load_train_config(SDETrainConfig, args)
    result, final = train_sde(config)
    if not args.json:
        evals = ", ".join(f"{k} {v:.4g}" for k, v in result.final_eval.items())
        print(f"trained {result.step} steps (last loss {result.last_loss:.4g}; {evals}); model in {final}")
    return {"model": str(final), "config": to_dict(config), **dataclasses.asdict(result)}
