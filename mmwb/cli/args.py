"""Argument types the verbs share, so bad numbers stop at the parser (exit 2) instead of reaching a model."""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """A float flag: ``nan`` and ``inf`` are refused (``--guidance-scale nan`` used to write NaN images)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value
