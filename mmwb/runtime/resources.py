"""Where mmwb's shipped files are (the models under ``assets/``, the recipe configs under ``configs/``), whether mmwb
runs from a source checkout or from an installed wheel.

One order for every caller: ``$MMWB_HOME`` (a folder laid out like the checkout: a user's own copies win), then the
checkout this module runs from, then the copy a wheel carries inside the package (``mmwb/_shipped/``, written by
``setup.py``). ``$MMWB_HOME`` is read when a module asks, which for mmwb's defaults is when it is imported.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

HOME_ENV = "MMWB_HOME"
PACKAGE_COPY = "_shipped"  # inside the installed package; setup.py copies the checkout's files there


def resource_roots() -> list[Path]:
    """The folders searched, in order: ``$MMWB_HOME``, the source checkout, the installed package's copy."""
    roots = [Path(home)] if (home := os.environ.get(HOME_ENV)) else []
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "mmwb").is_dir():
        roots.append(checkout)
    roots.append(Path(str(importlib.resources.files("mmwb"))) / PACKAGE_COPY)
    return roots


def shipped(relative: str | Path) -> Path:
    """``relative`` (``assets/models/tiny-shapes-vlm``, ``configs/recipes``) under the first root that holds it;
    under the first root when none does, so that an error names where it was expected."""
    roots = resource_roots()
    for root in roots:
        if (root / relative).exists():
            return root / relative
    return roots[0] / relative


def shipped_model(name: str) -> Path:
    """A model mmwb ships (``tiny-shapes-vlm``, ``sde-digits``, ...)."""
    return shipped(Path("assets") / "models" / name)
