"""Argument types the verbs share, so bad numbers stop at the parser (exit 2) instead of reaching a model."""

from __future__ import annotations

import argparse
import math


def add_quantize_arguments(
    parser: argparse.ArgumentParser,
    modes: argparse._ActionsContainer | None = None,
    help: str = "weight-only quantization on load (CPU)",
) -> None:
    """``--quantize int8|int4`` (added to ``modes``: export's mutually exclusive group) and ``--group-size``: the
    model's linear layers and experts stored so."""
    (modes or parser).add_argument("--quantize", choices=["int8", "int4"], default=None, help=help)
    parser.add_argument(
        "--group-size",
        type=int,
        choices=[32, 64, 128],
        default=64,
        help="int4 inputs per scale (default: 64)",
    )


def finite_float(text: str) -> float:
    """A float flag: ``nan`` and ``inf`` are refused (``--guidance-scale nan`` used to write NaN images)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value
