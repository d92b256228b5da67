"""The data a score model is trained and evaluated on, named by its ``DataSpec``, and the way back to pixels.

Toy sets are drawn once from a seed (the test set from ``seed + 1``, so it never repeats a training point).
Digits are scikit-learn's fixed split, kept as integer levels so each batch is dequantised afresh (uniform
noise inside each of the 17 levels, Theis et al. 2016) and mapped to ``[-1, 1]``; the model then samples
continuous values, which ``to_unit_images`` maps back to grey levels in ``[0, 1]`` at the native 8x8.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from mmwb.data.digits import NATIVE_SIZE, NUM_LEVELS, VALUE_RANGES, load_digits_tensors
from mmwb.data.toy2d import BOUNDED_SUPPORT, LOG_PROBS, toy2d
from mmwb.models.sde.likelihood import dequantize
from mmwb.models.sde.trained import DataSpec
from mmwb.runtime import make_generator

VALUE_RANGE = "symmetric"  # digits live in [-1, 1] for the SDEs, as images do in score_sde
TEST_SEED_OFFSET = 1


def dataset(spec: DataSpec, split: str = "train", seed: int = 0, n: int | None = None) -> torch.Tensor:
    """Toy points ``(n, 2)``, or digit levels ``(N, 1, S, S)`` uint8 (images in ``[-1, 1]`` without dequantising).

    ``n`` caps the size (toy sets: default ``spec.n_train`` for train, 10 000 for test).
    """
    if not spec.is_image:
        size = n if n is not None else (spec.n_train if split == "train" else 10_000)
        offset = 0 if split == "train" else TEST_SEED_OFFSET
        return toy2d(spec.name, size, make_generator(seed + offset))
    digits = load_digits_tensors(split, spec.size, spec.resize, VALUE_RANGE)
    data = digits.levels if spec.dequantize else digits.images
    return data[:n] if n is not None else data


def digit_labels(split: str = "test") -> torch.Tensor:
    """Labels of a digits split, aligned with ``dataset``."""
    return load_digits_tensors(split).labels


def to_model_space(
    spec: DataSpec, batch: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A batch of ``dataset`` as the SDE sees it: digit levels dequantised to ``[-1, 1]``, the rest as is."""
    if spec.is_image and spec.dequantize:
        return dequantize(batch, NUM_LEVELS, VALUE_RANGES[VALUE_RANGE], generator)
    return batch.float()


def to_unit_images(spec: DataSpec, x: torch.Tensor) -> torch.Tensor:
    """Samples ``(B, 1, S, S)`` in model space -> grey levels ``(B, 1, 8, 8)`` in ``[0, 1]`` (inverse of the above)."""
    lo, hi = VALUE_RANGES[VALUE_RANGE]
    unit = (x - lo) / (hi - lo)
    if spec.dequantize:  # bin k holds (k + U) / 17: its centre is level k
        unit = (unit * NUM_LEVELS - 0.5) / (NUM_LEVELS - 1)
    unit = unit.clamp(0, 1)
    if spec.size == NATIVE_SIZE:
        return unit
    if spec.resize == "nearest":
        return F.avg_pool2d(unit, spec.size // NATIVE_SIZE)
    start = (spec.size - NATIVE_SIZE) // 2
    return unit[..., start : start + NATIVE_SIZE, start : start + NATIVE_SIZE]


def log_prob(spec: DataSpec, x: torch.Tensor) -> torch.Tensor | None:
    """The exact data log-density ``(N,)`` where it is known (checkerboard, 8 gaussians), else ``None``."""
    fn = LOG_PROBS.get(spec.name)
    return fn(x) if fn is not None else None


def density_metrics(spec: DataSpec, samples: torch.Tensor) -> dict[str, float]:
    """How samples score under the exact data density, where it is known.

    A density positive everywhere (8 gaussians) gives the samples' mean NLL in nats per point, to compare with the
    data's own NLL (its entropy); a bounded support (checkerboard) gives the share of samples inside it.
    """
    logp = log_prob(spec, samples.double())
    if logp is None:
        return {}
    if spec.name in BOUNDED_SUPPORT:
        return {"in_support": float(logp.isfinite().double().mean())}
    return {"sample_nll": float(-logp.mean())}
