"""Seeds that really seed: the global RNGs for code we do not own, explicit generators for code we do."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) for third-party code that reads the global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A private ``torch.Generator`` on ``device``, so one call's randomness does not depend on any other's."""
    return torch.Generator(device=device).manual_seed(seed)
