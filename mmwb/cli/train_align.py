"""``mmwb train align``: LLaVA stage 1, the projector trained on image-caption pairs with tower and decoder frozen."""

from __future__ import annotations

import argparse
from typing import Any

HELP = (
    "Align a VLM's projector (LLaVA stage 1): vision tower and decoder frozen, loss on caption tokens only. The "
    "frozen tower's features are computed once into an on-disk cache (feature_cache.root) that later epochs and "
    "runs reuse. Checkpoints hold only the projector; the aligned VLM and alignment_health.json go to out_dir."
)


def add_arguments(parser: argparse.ArgumentParser, config_glob: str = "align_*") -> None:
    """``--config``, overrides, ``--resume`` and ``--no-feature-cache`` (shared with ``mmwb train instruct``)."""
    from mmwb.cli.train import add_config_arguments

    add_config_arguments(parser, f"YAML config (configs/train/{config_glob}.yaml)")
    parser.add_argument(
        "--no-feature-cache",
        action="store_true",
        help="encode every image every step instead of caching features",
    )


def load_vlm_train_config(cls: type, args: argparse.Namespace) -> Any:
    """The trainer's config with the common flags and ``--no-feature-cache`` applied."""
    from mmwb.cli.train import load_train_config

    config = load_train_config(cls, args)
    if args.no_feature_cache:
        config.feature_cache.enabled = False
    return config


def run(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from mmwb.runtime.config import to_dict
    from mmwb.train.align import AlignConfig, train_align

    config = load_vlm_train_config(AlignConfig, args)
    result, report = train_align(config)
    if not args.json:
        print(
            f"trained {result.step} steps (last loss {result.last_loss:.4g}, {result.skipped_items} items skipped); "
            f"VLM in {config.out_dir}; {report.get('verdict', '')}"
        )
    health = {"model": str(config.out_dir), "health": report}
    return {**health, "config": to_dict(config), **dataclasses.asdict(result)}
