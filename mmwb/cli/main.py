"""Entry point of the ``mmwb`` command.

Verbs are registered by module path and imported only when used, so ``mmwb --help`` stays instant and one verb's
heavy dependencies (diffusers, open_clip) are never loaded by another. A verb module provides ``HELP``,
``add_arguments(parser)`` and ``run(args) -> dict``; this module adds the flags every verb shares, turns
``MmwbError`` into a one-line message with exit code 2, and prints the returned dict under ``--json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence

from mmwb.errors import MmwbError

# verb -> (module, one-line summary)
VERBS: dict[str, tuple[str, str]] = {
    "env": ("mmwb.cli.env", "print versions, devices, supported dtypes and thread counts"),
    "caption": ("mmwb.cli.caption", "caption images with a vision-language model"),
    "ask": ("mmwb.cli.ask", "answer a question about an image"),
    "generate": ("mmwb.cli.generate", "generate images with ControlNet-conditioned Stable Diffusion"),
    "sample": ("mmwb.cli.sample", "sample a score-based SDE model"),
    "likelihood": ("mmwb.cli.likelihood", "bits/dim of data under a score-based SDE model"),
    "train": ("mmwb.cli.train", "train a model: align, instruct, controlnet, sde, ..."),
    "data": ("mmwb.cli.data", "make datasets: shapes, ..."),
    "recipe": ("mmwb.cli.recipe", "run a whole training recipe: tiny-shapes, ..."),
    "eval": ("mmwb.cli.eval", "score a model on a data set: vlm, ..."),
    "export": ("mmwb.cli.export", "export a checkpoint (e.g. merge LoRA adapters)"),
    "bench": ("mmwb.cli.bench", "benchmark mmwb against the reference: decoder, vlm, align, generate, sde"),
}

EXIT_BAD_INPUT = 2
log = logging.getLogger("mmwb")


def common_flags(nested: bool = False) -> argparse.ArgumentParser:
    """The flags every verb takes, as a parent parser so they can follow the verb (``mmwb env --json``).

    Verbs with sub-commands (``mmwb data shapes``) add ``common_flags(nested=True)`` to each sub-command: its
    defaults are suppressed so they never overwrite a value given before the sub-command.
    """
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("common options")
    flags = [
        ("--device", {"help": "cpu, cuda, cuda:N or mps (default: $MMWB_DEVICE, else the best available)"}),
        ("--dtype", {"choices": ["fp32", "bf16", "fp16"], "help": "precision (default: fp32)"}),
        ("--seed", {"type": int, "help": "seed python, numpy and torch for reproducible runs"}),
        ("--json", {"action": "store_true", "help": "print one JSON document on stdout (logs go to stderr)"}),
        ("--debug", {"action": "store_true", "help": "show tracebacks and debug logs"}),
    ]
    for flag, options in flags:
        default = False if options.get("action") == "store_true" else None
        group.add_argument(flag, default=argparse.SUPPRESS if nested else default, **options)
    return parent


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The full parser; only the verb (and sub-command) named in ``argv`` has its module imported."""
    parser = argparse.ArgumentParser(
        prog="mmwb",
        description="mmwb, a multimodal model workbench: vision-language models, ControlNet Stable Diffusion "
        "and score-based SDE models on one runtime.",
        epilog="Run 'mmwb VERB --help' for a verb's options.",
    )
    from mmwb import __version__

    parser.add_argument("--version", action="version", version=f"mmwb {__version__}")
    add_verbs(parser, VERBS, argv, path="", parent=common_flags())
    return parser


def add_verbs(
    parser: argparse.ArgumentParser,
    registry: dict[str, tuple[str, str]],
    argv: Sequence[str],
    path: str,
    parent: argparse.ArgumentParser,
) -> None:
    """Add one sub-parser per registry entry, importing only the module of the one named in ``argv``.

    A verb module either defines ``add_arguments(parser)`` and ``run(args)``, or ``SUBCOMMANDS``, a registry of
    its own (``mmwb train sde``, ``mmwb bench decoder``) handled the same way one level down.
    """
    dest, metavar = ("verb", "VERB") if not path else (f"{path}_command", "COMMAND")
    subparsers = parser.add_subparsers(dest=dest, metavar=metavar, required=True)
    chosen = next((arg for arg in argv if arg in registry), None)
    for name, (module_path, summary) in registry.items():
        sub = subparsers.add_parser(name, help=summary, description=summary, parents=[parent])
        if name != chosen:
            continue
        module = importlib.import_module(module_path)
        sub.description = module.HELP
        if hasattr(module, "SUBCOMMANDS"):
            rest = argv[list(argv).index(name) + 1 :]
            add_verbs(
                sub, module.SUBCOMMANDS, rest, path=f"{path} {name}".strip(), parent=common_flags(nested=True)
            )
        else:
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="mmwb: %(message)s", stream=sys.stderr
    )
    try:
        return _run(args)
    except MmwbError as err:
        if args.debug:
            raise
        print(f"mmwb {args.verb}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"mmwb {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mmwb ... | head` closed stdout early; not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        return 0


def _run(args: argparse.Namespace) -> int:
    from mmwb.runtime import resolve_device, resolve_precision, seed_everything

    if args.device is not None or args.dtype is not None:  # refuse an unusable device/dtype before any work
        resolve_precision(args.dtype, resolve_device(args.device))
    if args.seed is not None:
        seed_everything(args.seed)
    result = args.run(args)
    if args.json:
        json.dump(result, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    return int(result.get("exit_code", 0)) if isinstance(result, dict) else 0


if __name__ == "__main__":
    sys.exit(main())
