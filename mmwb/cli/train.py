"""``mmwb train``: one sub-command per trainer, all on the shared engine (mmwb.train.engine)."""

from __future__ import annotations

from typing import Any

HELP = (
    "Train a model from a YAML config (dotted overrides such as train.lr=1e-4 follow it). Every trainer "
    "checkpoints atomically and continues a killed run with --resume."
)
# sub-command -> (module, summary)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "align": (
        "mmwb.cli.train_align",
        "LLaVA stage 1: train the projector with vision tower and decoder frozen",
    ),
    "instruct": (
        "mmwb.cli.train_instruct",
        "stage 2: LoRA on the decoder plus the projector, loss on assistant turns",
    ),
    "dpo": (
        "mmwb.cli.train_dpo",
        "preference tuning (DPO, IPO, hinge) on chosen/rejected pairs; reference = adapters off, or cached",
    ),
    "controlnet": ("mmwb.cli.train_controlnet", "train a ControlNet on a frozen Stable Diffusion"),
    "sde": ("mmwb.cli.train_sde", "train a score-based SDE model"),
}


def add_config_arguments(parser: Any, config_help: str) -> None:
    """The arguments every trainer takes: ``--config``, dotted overrides and ``--resume [CKPT]``."""
    from pathlib import Path

    parser.add_argument("--config", type=Path, required=True, help=config_help)
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-4"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CKPT",
        help="continue the run (default: its latest checkpoint)",
    )


def load_train_config(cls: type, args: Any) -> Any:
    """The trainer's config from ``--config`` and the overrides, with the common flags (``--device``,
    ``--dtype``, ``--seed``, ``--resume``; progress bars off under ``--json``) applied to its ``train`` section."""
    import dataclasses

    from mmwb.runtime.config import load_config

    config = load_config(cls, args.config, args.overrides)
    given = {"device": args.device, "precision": args.dtype, "seed": args.seed, "resume": args.resume}
    given = {key: value for key, value in given.items() if value is not None}
    config.train = dataclasses.replace(
        config.train, **given, progress=config.train.progress and not args.json
    )
    return config
