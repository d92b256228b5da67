"""``mmwb train dpo``: preference tuning (DPO, IPO, hinge) of a VLM or text decoder on chosen/rejected pairs."""

from __future__ import annotations

import argparse
from typing import Any

HELP = (
    "Preference-tune a VLM or a text decoder on chosen/rejected pairs (mmwb data preferences makes them): loss "
    "sigmoid (DPO, with label smoothing for conservative DPO), ipo or hinge, strength beta. With LoRA (default) the "
    "reference is the model with its adapters off; without (lora: null) the whole language model trains and the "
    "reference log-probabilities are computed once and cached. Logs reward accuracy, margin and a KL estimate per "
    "step; saves the merged model in out_dir and scores it on the shapes test split."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmwb.cli.train_align import add_arguments as add_vlm_arguments

    add_vlm_arguments(parser, "dpo_*")


def run(args: argparse.Namespace) -> dict[str, Any]:

    from mmwb.cli.train_align import load_vlm_train_config
    from mmwb.runtime.config import to_dict
    from mmwb.train.dpo import DPOConfig, run_dpo_stage

    config = load_vlm_train_config(DPOConfig, args)
    metrics = run_dpo_stage(config)
    if not args.json:
        scores = {k: v for k, v in metrics.items() if k.startswith("test_") and isinstance(v, float)}
        print(
            f"trained {metrics['steps']} steps (last loss {metrics['last_loss']:.4g}); model in {config.out_dir}"
            + "".join(
                f"; {k} {v:.3f}" for k, v in scores.items() if k.endswith(("exact_match", "vqa_accuracy"))
            )
        )
    return {"model": str(config.out_dir), "metrics": metrics, "config": to_dict(config)}
